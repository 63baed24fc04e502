"""Perception + VLA: `ros2 launch omnistream_vla omnistream.launch.py policy:=DIR image:=/camera/color/image_raw`.

perception_node turns camera images into StreamFeatures; vla_node turns features and the instruction (a
`std_msgs/String` on `instruction_topic`, transient-local) into EndEffectorAction. Launch arguments
(`ros2 launch ... --show-args`): `policy` (required: a directory from `omnistream vla init` or training),
`image`, `camera_info` (default: `camera_info` beside the image), `instruction_topic`, `checkpoint` and `device`
(default: the params files'), `perception_params_file`, `vla_params_file`. Both are lifecycle nodes started with
`autostart: false`; this launch configures each (models load) and activates it once it is inactive (the standard
launch_ros events). `omnistream bringup --with-vla` runs the same declarations in one process, the transitions
through the nodes' lifecycle services. Every process this launch starts gets the stack's transport settings.
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


def _nodes(context):
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    image = arg("image")
    device = {"device": arg("device")} if arg("device") else {}
    perception = {**({"checkpoint": arg("checkpoint")} if arg("checkpoint") else {}), **device}
    managed = {"autostart": False}  # the transitions below drive the nodes
    nodes = [
        LifecycleNode(
            package="omnistream_perception",
            executable="perception_node",
            name="perception_node",
            namespace="",
            parameters=[arg("perception_params_file"), *([perception] if perception else []), managed],
            remappings=[
                ("image", image),
                ("image/compressed", image + "/compressed"),
                ("camera_info", arg("camera_info") or camera_info_topic(image)),
            ],
            output="screen",
        ),
        LifecycleNode(
            package="omnistream_vla",
            executable="vla_node",
            name="vla_node",
            namespace="",
            parameters=[arg("vla_params_file"), {"policy": arg("policy"), **device}, managed],
            remappings=[("features", "/perception_node/features"), ("instruction", arg("instruction_topic"))],
            output="screen",
        ),
    ]
    return [*nodes, *[action for node in nodes for action in _configure_then_activate(node)]]


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
