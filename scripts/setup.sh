#!/usr/bin/env bash
# Creates .venv with everything the stack needs (idempotent: a second run with nothing changed returns at once).
# After `source .venv/bin/activate` rclpy, our ROS packages, the interfaces and the `omnistream` CLI all work,
# with nothing else to source.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PYTHON=${PYTHON:-python3.11}

# What the environment is made from; a change to any of these re-runs the setup.
fingerprint() {
  cat requirements.txt scripts/setup.sh scripts/build_msgs.sh pyproject.toml \
    ros2_ws/src/*/setup.py ros2_ws/src/omnistream_msgs/CMakeLists.txt ros2_ws/src/omnistream_msgs/msg/* \
    scripts/interfaces/*/CMakeLists.txt scripts/interfaces/*/package.xml scripts/interfaces/*/msg/* \
    2>/dev/null | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.omnistream-setup"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found; install Python 3.11 (ROS 2 wheels are cp311)" >&2; exit 1; }
command -v cmake >/dev/null || { echo "setup: cmake not found; install it (apt-get install cmake)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

echo "setup: installing pinned requirements into $VENV (first time: about 2 minutes)"
# torch first and alone, so nothing can pull a CUDA build in its place.
"${PIP[@]}" install "$(grep '^torch==' requirements.txt)"
"${PIP[@]}" install -r requirements.txt

echo "setup: building the interface packages (omnistream_msgs; tf2_msgs unless ROS has it)"
VENV="$VENV" scripts/build_msgs.sh

echo "setup: installing the OmniStream packages (editable)"
"${PIP[@]}" install --no-deps --no-build-isolation \
  -e ros2_ws/src/omnistream_perception -e ros2_ws/src/omnistream_vla -e .

# ament_index (and `ros2`-style lookups of our packages) needs AMENT_PREFIX_PATH; set it for every
# interpreter of the venv, activated or not.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import os, sys; os.environ.setdefault('AMENT_PREFIX_PATH', sys.prefix)" >"$SITE/omnistream_env.pth"
if ! grep -q 'omnistream-env' "$VENV/bin/activate"; then
  cat >>"$VENV/bin/activate" <<'ACT'
# omnistream-env: ROS 2 from wheels finds its packages (and ours) under the venv
export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
ACT
fi

"$VENV/bin/python" -c 'import rclpy, torch, transformers, omnistream_msgs.msg, tf2_msgs.msg, omnistream_perception.model; print("setup: OK, torch", torch.__version__)'
fingerprint >"$STAMP"
