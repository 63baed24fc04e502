"""Perception + VLA: `ros2 launch omnistream_vla omnistream.launch.py policy:=DIR image:=/camera/color/image_raw`.

perception_node turns camera images into StreamFeatures; vla_node turns features and the instruction (a
`std_msgs/String` on `instruction_topic`, transient-local) into EndEffectorAction. Launch arguments
(`ros2 launch ... --show-args`): `policy` (required: a directory from `omnistream vla init` or training),
`image`, `camera_info` (default: `camera_info` beside the image), `instruction_topic`, `checkpoint` and `device`
(default: the params files'), `perception_params_file`, `vla_params_file`. `omnistream bringup --with-vla` runs the
same declarations in one process. Every process this launch starts gets the stack's transport settings.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription
from omnistream_perception.ros.launch_support import camera_info_topic
from omnistream_perception.transport import large_data_env


def _nodes(context):
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    image = arg("image")
    device = {"device": arg("device")} if arg("device") else {}
    perception = {**({"checkpoint": arg("checkpoint")} if arg("checkpoint") else {}), **device}
    return [
        Node(
            package="omnistream_perception",
            executable="perception_node",
            name="perception_node",
            parameters=[arg("perception_params_file"), *([perception] if perception else [])],
            remappings=[
                ("image", image),
                ("image/compressed", image + "/compressed"),
                ("camera_info", arg("camera_info") or camera_info_topic(image)),
            ],
            output="screen",
        ),
        Node(
            package="omnistream_vla",
            executable="vla_node",
            name="vla_node",
            parameters=[arg("vla_params_file"), {"policy": arg("policy"), **device}],
            remappings=[("features", "/perception_node/features"), ("instruction", arg("instruction_topic"))],
            output="screen",
        ),
    ]


def generate_launch_description():
    perception_params = os.path.join(get_package_share_directory("omnistream_perception"), "config", "perception.yaml")
    vla_params = os.path.join(get_package_share_directory("omnistream_vla"), "config", "vla.yaml")
    return LaunchDescription(
        [
            *[SetEnvironmentVariable(name, value) for name, value in large_data_env().items()],
            DeclareLaunchArgument("perception_params_file", default_value=perception_params),
            DeclareLaunchArgument("vla_params_file", default_value=vla_params),
            DeclareLaunchArgument("policy", description="VLA policy directory (omnistream vla init / training)"),
            DeclareLaunchArgument("image", default_value="image", description="camera image topic"),
            DeclareLaunchArgument(
                "camera_info", default_value="", description="CameraInfo topic (default: camera_info beside image)"
            ),
            DeclareLaunchArgument("instruction_topic", default_value="/instruction", description="std_msgs/String"),
            DeclareLaunchArgument(
                "checkpoint", default_value="", description="backbone directory or hub id (default: params file's)"
            ),
            DeclareLaunchArgument(
                "device", default_value="", description="cpu | cuda | cuda:N | mps for both nodes (default: params)"
            ),
            OpaqueFunction(function=_nodes),
        ]
    )
