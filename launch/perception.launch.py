"""Perception only: `ros2 launch launch/perception.launch.py image:=/camera/image_raw [params_file:=FILE]`.

Thin on purpose: the behaviour lives in the node. `omnistream bringup` runs the same node declarations in one
process where `ros2 launch` is not available (pip-only ROS).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def generate_launch_description():
    params = os.path.join(get_package_share_directory("omnistream_perception"), "config", "perception.yaml")
    return LaunchDescription(
        [
            DeclareLaunchArgument("params_file", default_value=params, description="perception_node parameters"),
            DeclareLaunchArgument("image", default_value="image", description="camera image topic"),
            Node(
                package="omnistream_perception",
                executable="perception_node",
                name="perception_node",
                parameters=[LaunchConfiguration("params_file")],
                remappings=[
                    ("image", LaunchConfiguration("image")),
                    ("image/compressed", [LaunchConfiguration("image"), "/compressed"]),
                ],
                output="screen",
            ),
        ]
    )
