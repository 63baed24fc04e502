#!/usr/bin/env bash
# Builds the interface packages against the ROS 2 wheels and installs them into the venv: omnistream_msgs, and
# tf2_msgs (TFMessage only, wire compatible) where no tf2_msgs is importable, since tf2_msgs has no wheel.
# On a robot use `colcon build` instead (its ROS has tf2_msgs); this is for machines with pip-only ROS. README.md,
# "On a robot", says how to run colcon against this venv too (AMENT_PREFIX_PATH / CMAKE_PREFIX_PATH).
set -euo pipefail
VENV=${VENV:-.venv}
VENV=$(cd "$VENV" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD_ROOT=${BUILD_DIR:-build}
PY="$VENV/bin/python"

# Some CMake files in the wheels point at the wheel build machine's Python include dirs: rewrite them to
# this interpreter's (idempotent).
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NP_INC=$("$PY" -c 'import numpy; print(numpy.get_include())')
{ grep -rl --include="*.cmake" -e "/opt/python/cp311-cp311" "$VENV" 2>/dev/null || true; } | while read -r f; do
  sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#${PY_INC}#g" \
         -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#${NP_INC}#g" "$f"
done

# Where tf2_msgs imports from now (empty when nowhere): a ROS installation's must win, never be shadowed.
TF2_FROM=$("$PY" -c 'import os, tf2_msgs; print(os.path.realpath(tf2_msgs.__path__[0]))' 2>/dev/null || true)

export AMENT_PREFIX_PATH="$VENV"
export PATH="$VENV/bin:$PATH"

build() {  # build <package source dir>: configure, build and install one ament_cmake interface package
  local src=$1 name build_dir
  name=$(basename "$src")
  build_dir="$BUILD_ROOT/$name"
  mkdir -p "$build_dir"
  cmake -S "$src" -B "$build_dir" -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release >"$build_dir/configure.log" 2>&1 \
    || { cat "$build_dir/configure.log"; exit 1; }
  cmake --build "$build_dir" -j "$(nproc)" >"$build_dir/build.log" 2>&1 || { tail -50 "$build_dir/build.log"; exit 1; }
  cmake --install "$build_dir" >/dev/null
}

build "$ROOT/ros2_ws/src/omnistream_msgs"
"$PY" -c 'from omnistream_msgs.msg import StreamFeatures, EndEffectorAction; print("omnistream_msgs OK")'

if [ -n "$TF2_FROM" ] && [[ "$TF2_FROM" != "$(cd "$VENV" && pwd -P)"/* ]]; then
  echo "tf2_msgs: using the installed one ($TF2_FROM)"
else
  build "$ROOT/scripts/interfaces/tf2_msgs"
  "$PY" -c 'from tf2_msgs.msg import TFMessage; print("tf2_msgs OK (TFMessage, built into the venv)")'
fi
