"""Perception + VLA: `ros2 launch launch/omnistream.launch.py image:=/camera/image_raw instruction:="..."`.

perception_node turns camera images into StreamFeatures; vla_node (omnistream_vla) turns features and an
instruction into EndEffectorAction. `omnistream bringup --with-vla` runs the same declarations in one process.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def generate_launch_description():
    perception_params = os.path.join(get_package_share_directory("omnistream_perception"), "config", "perception.yaml")
    vla_params = os.path.join(get_package_share_directory("omnistream_vla"), "config", "vla.yaml")
    return LaunchDescription(
        [
            DeclareLaunchArgument("perception_params_file", default_value=perception_params),
            DeclareLaunchArgument("vla_params_file", default_value=vla_params),
            DeclareLaunchArgument("image", default_value="image", description="camera image topic"),
            Node(
                package="omnistream_perception",
                executable="perception_node",
                name="perception_node",
                parameters=[LaunchConfiguration("perception_params_file")],
                remappings=[
                    ("image", LaunchConfiguration("image")),
                    ("image/compressed", [LaunchConfiguration("image"), "/compressed"]),
                ],
                output="screen",
            ),
            Node(
                package="omnistream_vla",
                executable="vla_node",
                name="vla_node",
                parameters=[LaunchConfiguration("vla_params_file")],
                remappings=[("features", "/perception_node/features")],
                output="screen",
            ),
        ]
    )
