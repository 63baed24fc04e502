"""What our launch files and ``omnistream bringup`` derive from launch arguments (the transport environment every
launched process gets is ``omnistream_perception.transport.large_data_env``).

Importable without ``launch``, ``launch_ros`` or ``rclpy``: launch files run it under ``ros2 launch``; the
``bringup`` stand-ins and the tests run it here.
"""

from __future__ import annotations

import posixpath


def camera_info_topic(image_topic: str) -> str:
    """The CameraInfo topic that goes with ``image_topic``: ``camera_info`` in the image's namespace.

    ``/camera/color/image_raw`` -> ``/camera/color/camera_info`` (RealSense), ``/image_raw`` -> ``/camera_info``
    (usb_cam), ``image`` -> ``camera_info`` (relative names stay relative), as image_transport pairs them.
    """
    topic = image_topic.strip()
    if not topic or topic.endswith("/") or topic.startswith("~"):
        raise ValueError(f"cannot derive a camera_info topic from the image topic {image_topic!r}")
    return posixpath.join(posixpath.dirname(topic), "camera_info")
