"""vla_node's output messages from one controller :class:`~omnistream_vla.controller.Command` (message building
only: no node, no rclpy). ``dry_run`` sends the action on ``~/proposed_action`` and nothing on the command topics."""

from __future__ import annotations

from typing import Any

from geometry_msgs.msg import TwistStamped
from std_msgs.msg import Float32

from omnistream_msgs.msg import EndEffectorAction

from ..controller import Command

PROPOSED, ACTION, TWIST, GRIPPER = "~/proposed_action", "~/action", "~/twist", "~/gripper"
TYPES = {PROPOSED: EndEffectorAction, ACTION: EndEffectorAction, TWIST: TwistStamped, GRIPPER: Float32}


def output_topics(dry_run: bool) -> tuple[str, ...]:
    return (PROPOSED,) if dry_run else (ACTION, TWIST, GRIPPER)


def action_message(command: Command, stamp, frame_id: str) -> EndEffectorAction:
    msg = EndEffectorAction(mode=command.mode, stop=command.stop, gripper=command.gripper)
    msg.header.stamp, msg.header.frame_id = stamp, frame_id
    msg.translation.x, msg.translation.y, msg.translation.z = (float(v) for v in command.translation)
    msg.rotation.x, msg.rotation.y, msg.rotation.z = (float(v) for v in command.rotation)
    return msg


def twist_message(command: Command, stamp, frame_id: str) -> TwistStamped:
    twist = TwistStamped()
    twist.header.stamp, twist.header.frame_id = stamp, frame_id
    linear, angular = twist.twist.linear, twist.twist.angular
    linear.x, linear.y, linear.z = (float(v) for v in command.linear_velocity)
    angular.x, angular.y, angular.z = (float(v) for v in command.angular_velocity)
    return twist


def command_messages(command: Command, stamp, frame_id: str, dry_run: bool) -> list[tuple[str, Any]]:
    """(topic, message) pairs to publish for ``command``, in order."""
    out: list[tuple[str, Any]] = []
    if command.publish_action:
        out.append((PROPOSED if dry_run else ACTION, action_message(command, stamp, frame_id)))
    if dry_run:
        return out
    if command.linear_velocity is not None:
        out.append((TWIST, twist_message(command, stamp, frame_id)))
    out.append((GRIPPER, Float32(data=command.gripper)))
    return out
