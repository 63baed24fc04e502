#!/usr/bin/env bash
# Builds the omnistream_msgs interface package against the ROS 2 wheels and installs it into the venv.
# On a robot use `colcon build` instead; this is for machines with pip-only ROS. README.md, "On a robot",
# says how to run colcon against this venv too (AMENT_PREFIX_PATH / CMAKE_PREFIX_PATH).
set -euo pipefail
VENV=${VENV:-.venv}
VENV=$(cd "$VENV" && pwd)
SRC=$(cd "$(dirname "$0")/../ros2_ws/src/omnistream_msgs" && pwd)
BUILD=${BUILD_DIR:-build/omnistream_msgs}
PY="$VENV/bin/python"

# Some CMake files in the wheels point at the wheel build machine's Python include dirs: rewrite them to
# this interpreter's (idempotent).
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NP_INC=$("$PY" -c 'import numpy; print(numpy.get_include())')
{ grep -rl --include="*.cmake" -e "/opt/python/cp311-cp311" "$VENV" 2>/dev/null || true; } | while read -r f; do
  sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#${PY_INC}#g" \
         -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#${NP_INC}#g" "$f"
done

export AMENT_PREFIX_PATH="$VENV"
export PATH="$VENV/bin:$PATH"
mkdir -p "$BUILD"
cmake -S "$SRC" -B "$BUILD" -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
  -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release >"$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" >"$BUILD/build.log" 2>&1 || { tail -50 "$BUILD/build.log"; exit 1; }
cmake --install "$BUILD" >/dev/null
"$PY" -c 'from omnistream_msgs.msg import StreamFeatures, EndEffectorAction; print("omnistream_msgs OK")'
