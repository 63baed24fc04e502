"""The transport settings the stack ships for camera images between processes (rclpy-free).

Stock Fast DDS loses most best-effort images above about 0.5 MB between processes, and only the sending
process's settings can fix that (see ``config/fastdds_large_data.xml``). Every process our launch files and
``omnistream bringup`` start (a camera driver included) gets :func:`large_data_env` in its environment:

    env = {**os.environ, **large_data_env()}
    subprocess.Popen(command, env=env)

A user who already points Fast DDS at a profiles file keeps it: the function then returns nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PROFILE_FILE_NAME = "fastdds_large_data.xml"
# Fast DDS 3 (Kilted on) reads the first and warns about the second; Fast DDS 2 (Humble, Jazzy) reads the second.
PROFILE_ENV_VARS = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")
FAST_DDS_2_DISTROS = ("humble", "iron", "jazzy")
# Samples above this travel fragmented over UDP with stock Fast DDS (its shared-memory segment is 512 kB).
STOCK_LARGE_SAMPLE_BYTES = 512 * 1024


def large_data_profile_path() -> Path:
    """The shipped Fast DDS profile: next to the package sources, or in the installed share directory."""
    beside = Path(__file__).resolve().parents[1] / "config" / PROFILE_FILE_NAME
    if beside.is_file():
        return beside
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:  # no ROS: the source path is the only candidate
        return beside
    try:
        return Path(get_package_share_directory("omnistream_perception")) / "config" / PROFILE_FILE_NAME
    except PackageNotFoundError:
        return beside


def large_data_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables that apply the shipped profile to a process; {} when ``environ`` (default: this
    process's) already names a Fast DDS profiles file (the user's settings win) or the file is missing."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in PROFILE_ENV_VARS):
        return {}
    path = large_data_profile_path()
    if not path.is_file():
        return {}
    old_fast_dds = environ.get("ROS_DISTRO", "").lower() in FAST_DDS_2_DISTROS
    return {PROFILE_ENV_VARS[1 if old_fast_dds else 0]: str(path)}


def large_data_settings_active(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a Fast DDS profiles file is set for this process (ours or the user's)."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in PROFILE_ENV_VARS)


def best_effort_advice(topic: str, image_bytes: int | None, received: int, expected: int | None) -> str:
    """What to change when a best-effort camera publisher loses frames on their way to the node."""
    size = f"{image_bytes / 1e6:.1f} MB images" if image_bytes else "images"
    seen = f"{received} of about {expected} frames arrived" if expected else f"{received} frame(s) arrived"
    return (
        f"the publisher of {topic} is best-effort and {seen}: best-effort {size} between processes need larger "
        f"Fast DDS buffers in the camera process as well as here. Set the camera driver's QoS reliability to "
        f"reliable, or start both processes with {PROFILE_ENV_VARS[0]}={large_data_profile_path()} "
        f"(our launch files and `omnistream bringup` set it for what they start)"
    )
