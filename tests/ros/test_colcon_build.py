"""`colcon build` of a copy of `ros2_ws` against the pip ROS in this venv, as the README documents it: the
packages are self-contained (no file points out of the workspace), install their launch files, configuration
and console scripts, and run from the install space."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKSPACE = REPO / "ros2_ws"


def test_the_workspace_has_no_link_out_of_it():
    """A copy of ros2_ws (a robot's checkout, a Docker build context) must hold every file its packages install."""
    outside = [
        str(path.relative_to(WORKSPACE))
        for path in WORKSPACE.rglob("*")
        if path.is_symlink() and not path.resolve().is_relative_to(WORKSPACE.resolve())
    ]
    assert outside == [], f"links out of ros2_ws: {outside}"


@pytest.mark.slow
def test_colcon_build_of_a_copy_of_the_workspace(tmp_path):
    if shutil.which("colcon") is None:
        pytest.skip("colcon is not installed (pip install colcon-common-extensions)")
    workspace = tmp_path / "ws"
    shutil.copytree(WORKSPACE / "src", workspace / "src", symlinks=True)  # links copied as links, as git does
    venv = sys.prefix
    env = dict(os.environ, AMENT_PREFIX_PATH=venv, CMAKE_PREFIX_PATH=venv)
    build = subprocess.run(
        ["colcon", "build", "--cmake-args", "-DBUILD_TESTING=OFF", f"-DPython3_EXECUTABLE={sys.executable}"],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]

    install = workspace / "install"
    for relative in (
        "omnistream_perception/share/omnistream_perception/launch/perception.launch.py",
        "omnistream_perception/share/omnistream_perception/config/perception.yaml",
        "omnistream_perception/share/omnistream_perception/config/fastdds_large_data.xml",
        "omnistream_perception/lib/omnistream_perception/perception_node",
        "omnistream_vla/share/omnistream_vla/launch/omnistream.launch.py",
        "omnistream_vla/share/omnistream_vla/config/vla.yaml",
        "omnistream_vla/lib/omnistream_vla/vla_node",
        "omnistream_vla/lib/omnistream_vla/recorder_node",
    ):
        assert (install / relative).is_file(), f"not installed: {relative}"

    # From the install space (`source install/setup.bash` keeps the venv's prefix, so rclpy finds its middleware):
    # the installed packages import, their launch files read their installed configuration, a node runs.
    script = f"""
set -e
source install/setup.bash
python - <<'PY'
import omnistream_perception, omnistream_vla
from omnistream_perception.ros.bringup import load_launch_file
install = {str(install)!r}
assert omnistream_perception.__file__.startswith(install), omnistream_perception.__file__
(node,) = load_launch_file(install + "/omnistream_perception/share/omnistream_perception/launch/perception.launch.py")
assert node.parameters == [install + "/omnistream_perception/share/omnistream_perception/config/perception.yaml"]
print("launch OK")
PY
install/omnistream_perception/lib/omnistream_perception/perception_node --ros-args --params-file missing.yaml \
  && exit 1 || echo "node exit $?"
"""
    run = subprocess.run(["bash", "-c", script], cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "launch OK" in run.stdout
    assert "node exit 2" in run.stdout, run.stdout + run.stderr
