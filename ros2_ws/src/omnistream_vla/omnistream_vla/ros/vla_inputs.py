"""vla_node's inputs (a ROS helper of the node): the subscriptions made at activate and what each message does to
the controller.

StreamFeatures per camera are decoded and checked against the policy (a bad one is dropped with its reason, on
/diagnostics and throttled in the log); the instruction (transient-local by default, so a latched one reaches a
node activated later); ``joint_states`` (the state by name); the end effector's PoseStamped in the actions' frame.
The subscriptions share one callback group, apart from the control timer and the watchdog.
"""

from __future__ import annotations

from geometry_msgs.msg import PoseStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import String

from omnistream_msgs.msg import StreamFeatures
from omnistream_perception.features_codec import decode_patch_tokens, stamp_seconds

from ..action_execution import quaternion_to_rpy

FEATURES_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)


class ControllerInputs:
    """The inputs of ``node`` (a ``VLANode``: its ``controller``, stats, clock and parameters)."""

    def __init__(self, node) -> None:
        self._node, self._param = node, None
        self.joint_states_received = 0

    def open(self, param) -> None:
        """Subscribes (as the node's lifecycle inputs) to what the controller and ``param`` (a reader) ask for."""
        node, intake, self._param = self._node, MutuallyExclusiveCallbackGroup(), param

        def subscribe(msg_type, topic, callback, qos) -> None:
            node.keep_input(node.create_subscription(msg_type, topic, callback, qos, callback_group=intake))

        cameras = node.controller.cameras
        for cam in cameras:
            topic = "features" if len(cameras) == 1 else f"{cam}/features"
            subscribe(StreamFeatures, topic, lambda m, c=cam: self._on_features(c, m), FEATURES_QOS)
        durable = param("instruction_durability") == "transient_local"
        subscribe(String, "instruction", self._on_instruction, QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if durable else DurabilityPolicy.VOLATILE))  # fmt: skip
        if param("use_joint_states") or node.controller.state_names or param("ee_position_joints"):
            subscribe(JointState, "joint_states", self._on_joint_states, 10)
        if param("ee_pose_topic"):
            subscribe(PoseStamped, param("ee_pose_topic"), self._on_ee_pose, 10)

    def _on_features(self, camera: str, msg: StreamFeatures) -> None:
        node = self._node
        node.feature_stats.received()
        node.control_stats.received()
        try:
            problem = node.controller.on_features(camera, decode_patch_tokens(msg), stamp_seconds(msg), node.now())
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            node.feature_stats.error(problem)
            node.feature_stats.dropped()
            node.get_logger().warning(f"dropped StreamFeatures ({camera}): {problem}", throttle_duration_sec=2.0)
            return
        node.feature_stats.processed()

    def _on_instruction(self, msg: String) -> None:
        node = self._node
        update = node.controller.on_instruction(msg.data)
        for warning in update.warnings:
            node.get_logger().warning(warning)
        if update.error is not None:
            node.get_logger().warning(f"instruction rejected: {update.error}")
            node.control_stats.error(f"instruction rejected: {update.error}")
        elif update.changed:
            node.get_logger().info(f"new instruction: {update.text!r}")
            node.control_stats.set_value("instruction", update.text)

    def _on_joint_states(self, msg: JointState) -> None:
        node = self._node
        node.controller.on_joint_state(list(msg.name), list(msg.position), node.now())
        self.joint_states_received += 1
        node.control_stats.set_value("joint_states", len(msg.position))

    def _on_ee_pose(self, msg: PoseStamped) -> None:
        node, p, q, frame = self._node, msg.pose.position, msg.pose.orientation, self._param("frame_id")
        try:
            if msg.header.frame_id and msg.header.frame_id != frame:
                raise ValueError(f"ee_pose in frame {msg.header.frame_id!r}, the actions are in {frame!r}")
            node.controller.on_ee_pose((p.x, p.y, p.z), quaternion_to_rpy(q.x, q.y, q.z, q.w), node.now())
        except ValueError as exc:
            node.control_stats.error(f"ee_pose dropped: {exc}")
            node.get_logger().warning(f"dropped ee_pose: {exc}", throttle_duration_sec=2.0)
