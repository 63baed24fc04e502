"""Perception only: `ros2 launch omnistream_perception perception.launch.py image:=/camera/color/image_raw`.

Launch arguments (`ros2 launch ... --show-args`): `image`, `camera_info` (default: `camera_info` beside the image,
e.g. `/camera/color/camera_info`), `checkpoint` and `device` (default: the params file's), `params_file`. Thin on
purpose: the behaviour lives in the node. perception_node is a lifecycle node started with `autostart: false`; this
launch drives it: configure (the model loads), then activate once it is inactive (the standard launch_ros events),
so a lifecycle manager could drive it instead. `omnistream bringup` runs the same declarations in one process where
`ros2 launch` is not available (pip-only ROS), the transitions through the node's lifecycle services. Every process
this launch starts (a camera driver included in it too) gets the stack's transport settings for large images.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    OpaqueFunction,
    RegisterEventHandler,
    SetEnvironmentVariable,
)
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from launch import LaunchDescription
from omnistream_perception.ros.launch_support import camera_info_topic
from omnistream_perception.transport import large_data_env


def _perception_node(context):
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    image = arg("image")
    overrides = {name: arg(name) for name in ("checkpoint", "device") if arg(name)}
    node = LifecycleNode(
        package="omnistream_perception",
        executable="perception_node",
        name="perception_node",
        namespace="",
        # autostart false: the transitions below drive the node
        parameters=[arg("params_file"), *([overrides] if overrides else []), {"autostart": False}],
        remappings=[
            ("image", image),
            ("image/compressed", image + "/compressed"),
            ("camera_info", arg("camera_info") or camera_info_topic(image)),
        ],
        output="screen",
    )
    return [node, *_configure_then_activate(node)]


def _configure_then_activate(node):
    def change(transition_id):
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node), transition_id=transition_id))

    activate = OnStateTransition(
        target_lifecycle_node=node,
        start_state="configuring",
        goal_state="inactive",
        entities=[change(Transition.TRANSITION_ACTIVATE)],
    )
    return [RegisterEventHandler(activate), change(Transition.TRANSITION_CONFIGURE)]


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
