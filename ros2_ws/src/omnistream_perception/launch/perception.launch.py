"""Perception only: `ros2 launch omnistream_perception perception.launch.py image:=/camera/color/image_raw`.

Launch arguments (`ros2 launch ... --show-args`): `image`, `camera_info` (default: `camera_info` beside the image,
e.g. `/camera/color/camera_info`), `checkpoint` and `device` (default: the params file's), `params_file`. Thin on
purpose: the behaviour lives in the node. `omnistream bringup` runs the same declarations in one process where
`ros2 launch` is not available (pip-only ROS). Every process this launch starts (a camera driver included in
it too) gets the stack's transport settings for large images.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription
from omnistream_perception.ros.launch_support import camera_info_topic
from omnistream_perception.transport import large_data_env


def _perception_node(context):
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    image = arg("image")
    overrides = {name: arg(name) for name in ("checkpoint", "device") if arg(name)}
    return [
        Node(
            package="omnistream_perception",
            executable="perception_node",
            name="perception_node",
            parameters=[arg("params_file"), *([overrides] if overrides else [])],
            remappings=[
                ("image", image),
                ("image/compressed", image + "/compressed"),
                ("camera_info", arg("camera_info") or camera_info_topic(image)),
            ],
            output="screen",
        )
    ]


def generate_launch_description():
    params = os.path.join(get_package_share_directory("omnistream_perception"), "config", "perception.yaml")
    return LaunchDescription(
        [
            *[SetEnvironmentVariable(name, value) for name, value in large_data_env().items()],
            DeclareLaunchArgument("params_file", default_value=params, description="perception_node parameters"),
            DeclareLaunchArgument("image", default_value="image", description="camera image topic"),
            DeclareLaunchArgument(
                "camera_info", default_value="", description="CameraInfo topic (default: camera_info beside image)"
            ),
            DeclareLaunchArgument(
                "checkpoint", default_value="", description="backbone directory or hub id (default: params file's)"
            ),
            DeclareLaunchArgument(
                "device", default_value="", description="cpu | cuda | cuda:N | mps (default: params file's)"
            ),
            OpaqueFunction(function=_perception_node),
        ]
    )
