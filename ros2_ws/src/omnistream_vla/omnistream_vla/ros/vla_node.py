"""``vla_node``: StreamFeatures + an instruction -> the OmniStream VLA policy -> 7-DoF end-effector actions.

A managed (lifecycle) node. The behaviour (safety rules, queue/ensemble execution, limits, emergency stop, camera
matching) lives in the rclpy-free :class:`omnistream_vla.controller.VLAController`, its parameters in
``vla_parameters``, its messages in ``vla_messages``; this node subscribes, publishes and runs the control timer
(``control_rate``) and a watchdog (every 50 ms, own callback group) that stops as soon as features go stale.

Lifecycle (``~/change_state``, ``~/get_state``): configure loads the policy and creates the outputs; activate
subscribes and starts the timers; deactivate sends a stop, then ends output; cleanup frees the policy. With
``autostart`` (default) it configures and activates itself at start. ``~/emergency_stop`` and
``~/clear_emergency_stop`` (std_srvs/Trigger) exist in every state; the stop latches until cleared.

Inputs (relative names, remap them): ``features`` (StreamFeatures; ``<camera>/features`` per camera for a
several-camera policy), ``instruction`` (std_msgs/String, transient-local), ``joint_states`` (robot state by name,
``ee_position_joints``), the ``ee_pose_topic`` PoseStamped. Outputs, one per control period: ``~/action``
(EndEffectorAction, metres and radians), ``~/twist`` (relative mode), ``~/gripper`` - or, with ``dry_run``, only
``~/proposed_action``; ``/diagnostics``; ``~/reset`` (Trigger). The README's vla_node section has the details.
"""

from __future__ import annotations

import threading
from typing import Any

from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger

from omnistream_msgs.msg import StreamFeatures
from omnistream_perception.features_codec import decode_patch_tokens, stamp_seconds
from omnistream_perception.ros.diagnostics import DiagnosticsPublisher
from omnistream_perception.ros.node_main import exit_process, run_node
from omnistream_perception.ros.node_params import declare_parameters, parameter_value

from ..action_convention import policy_convention, resolve_convention
from ..action_execution import quaternion_to_rpy
from ..controller import ERROR, OK, WARN, Command, VLAController
from .managed_node import ManagedNode
from .vla_messages import TYPES, command_messages, output_topics
from .vla_parameters import PARAMETERS, WATCHDOG_PERIOD_S, controller_settings, live_settings

NODE_NAME = "vla_node"
FEATURES_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
_LEVEL = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}


class VLANode(ManagedNode):
    """The VLA node; construct it in any process (``parameter_overrides`` for tests and bring-up)."""

    def __init__(self, node_name: str = NODE_NAME, policy=None, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        try:
            self._setup(policy)
        except BaseException:
            ManagedNode.destroy_node(self)  # bad parameters or policy: leave nothing behind in the context
            raise

    def _setup(self, policy) -> None:
        declare_parameters(self, PARAMETERS, skip=("policy",) if policy is not None else ())
        self.add_on_set_parameters_callback(self._check_change)
        self.add_post_set_parameters_callback(self._after_set_parameters)
        self._given_policy, self.policy, self.controller, self.pubs = policy, None, None, {}
        self._active, self._estop, self._timer = False, None, None
        self._publish_lock, self._published_seq = threading.Lock(), 0
        self.joint_states_received = 0
        self.diagnostics = DiagnosticsPublisher(self, period_s=self._param("diagnostics_period"))
        self.control_stats = self.diagnostics.stats("control")
        self.feature_stats = self.diagnostics.stats("features")
        self.state_changed("unconfigured")
        always = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, "~/emergency_stop", self._on_emergency_stop, callback_group=always)
        self.create_service(Trigger, "~/clear_emergency_stop", self._on_clear_emergency_stop, callback_group=always)
        if self._param("autostart"):
            self.autostart()

    # -- lifecycle (managed_node does the bookkeeping) -----------------------------------------------------------
    def configure(self) -> None:
        if self._given_policy is not None:
            self.policy = self._given_policy
        else:
            from ..policy import OmniStreamVLAPolicy

            self.policy = OmniStreamVLAPolicy.from_pretrained(self._param("policy"), device=self._param("device"))
        self.policy.eval()
        self.policy.use_prefix_cache = bool(self._param("prefix_cache"))
        conv = resolve_convention(policy_convention(self.policy), self._param("translation_scale"),
                                  self._param("rotation_scale"), self._param("action_mode"))  # fmt: skip
        settings = controller_settings(self._param, conv)
        self.controller = VLAController(self.policy, settings, clock=self._now)
        if self._estop is not None:
            self.controller.emergency_stop(self._estop)
        self.cameras = self.controller.cameras
        self.dry_run = bool(self._param("dry_run"))
        self.pubs = {
            n: self.keep_output(self.create_publisher(TYPES[n], n, OUTPUT_QOS)) for n in output_topics(self.dry_run)
        }
        self.keep_output(self.create_service(Trigger, "~/reset", self._on_reset))
        for key, value in (("action_convention", conv.describe()), ("execution", settings.execution),
                           ("dry_run", self.dry_run)):  # fmt: skip
            self.control_stats.set_value(key, value)
        self.get_logger().info(
            f"VLA policy ({self.policy.config.llm}) on camera(s) {', '.join(self.cameras)} at "
            f"{self._param('control_rate')} Hz; max feature age {self._param('max_feature_age')} s; {conv.describe()}; "
            f"execution {settings.execution}{'; DRY RUN: nothing on the command topics' if self.dry_run else ''}"
        )

    def activate(self) -> None:
        intake = MutuallyExclusiveCallbackGroup()

        def subscribe(msg_type, topic, callback, qos) -> None:
            self.keep_input(self.create_subscription(msg_type, topic, callback, qos, callback_group=intake))

        for cam in self.cameras:
            topic = "features" if len(self.cameras) == 1 else f"{cam}/features"
            subscribe(StreamFeatures, topic, lambda m, c=cam: self._on_features(c, m), FEATURES_QOS)
        durable = self._param("instruction_durability") == "transient_local"
        subscribe(String, "instruction", self._on_instruction, QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if durable else DurabilityPolicy.VOLATILE))  # fmt: skip
        if self._param("use_joint_states") or self.controller.state_names or self._param("ee_position_joints"):
            subscribe(JointState, "joint_states", self._on_joint_states, 10)
        if self._param("ee_pose_topic"):
            subscribe(PoseStamped, self._param("ee_pose_topic"), self._on_ee_pose, 10)
        self._control_group = MutuallyExclusiveCallbackGroup()
        self._timer = self.keep_input(self._make_timer())
        self.keep_input(self.create_timer(WATCHDOG_PERIOD_S, self._on_watchdog, MutuallyExclusiveCallbackGroup()))
        self._active = True

    def deactivate(self) -> None:
        self._active = False  # from here no control step publishes; the stop below is the last command
        self._publish(self.controller.stop_now("deactivated"), force=True)

    def release(self) -> None:
        self._active, self.pubs, self.controller, self.policy = False, {}, None, None

    def state_changed(self, label: str) -> None:
        self.control_stats.set_value("lifecycle_state", label)
        if label != "active":
            self.control_stats.set_level(DiagnosticStatus.OK, f"{label}: no output")

    # -- parameters ---------------------------------------------------------------------------------------------
    def _param(self, name: str) -> Any:
        return parameter_value(self, name, PARAMETERS)

    def _check_change(self, params) -> SetParametersResult:
        """Values that pass one by one but not together (a workspace box with min > max)."""
        changed = {p.name: p.value for p in params}
        try:
            live_settings(lambda name: changed.get(name, self._param(name)))
        except (ValueError, TypeError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, params) -> None:
        if self.controller is None:
            return
        self.controller.update(**live_settings(self._param))
        if any(p.name == "control_rate" for p in params) and self._timer is not None and self._active:
            self._inputs.remove(self._timer)
            self.destroy_timer(self._timer)
            self._timer = self.keep_input(self._make_timer())

    def _make_timer(self):
        period = 1.0 / self._param("control_rate")
        return self.create_timer(period, self._on_control, callback_group=self._control_group)

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    @property
    def actions_published(self) -> int:
        return self.controller.actions

    @property
    def stops_published(self) -> int:
        return self.controller.stops

    # -- inputs -------------------------------------------------------------------------------------------------
    def _on_features(self, camera: str, msg: StreamFeatures) -> None:
        self.feature_stats.received()
        self.control_stats.received()
        try:
            problem = self.controller.on_features(camera, decode_patch_tokens(msg), stamp_seconds(msg), self._now())
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            self.feature_stats.error(problem)
            self.feature_stats.dropped()
            self.get_logger().warning(f"dropped StreamFeatures ({camera}): {problem}", throttle_duration_sec=2.0)
            return
        self.feature_stats.processed()

    def _on_instruction(self, msg: String) -> None:
        update = self.controller.on_instruction(msg.data)
        for warning in update.warnings:
            self.get_logger().warning(warning)
        if update.error is not None:
            self.get_logger().warning(f"instruction rejected: {update.error}")
            self.control_stats.error(f"instruction rejected: {update.error}")
        elif update.changed:
            self.get_logger().info(f"new instruction: {update.text!r}")
            self.control_stats.set_value("instruction", update.text)

    def _on_joint_states(self, msg: JointState) -> None:
        self.controller.on_joint_state(list(msg.name), list(msg.position), self._now())
        self.joint_states_received += 1
        self.control_stats.set_value("joint_states", len(msg.position))

    def _on_ee_pose(self, msg: PoseStamped) -> None:
        p, q, frame = msg.pose.position, msg.pose.orientation, self._param("frame_id")
        try:
            if msg.header.frame_id and msg.header.frame_id != frame:
                raise ValueError(f"ee_pose in frame {msg.header.frame_id!r}, the actions are in {frame!r}")
            self.controller.on_ee_pose((p.x, p.y, p.z), quaternion_to_rpy(q.x, q.y, q.z, q.w), self._now())
        except ValueError as exc:
            self.control_stats.error(f"ee_pose dropped: {exc}")
            self.get_logger().warning(f"dropped ee_pose: {exc}", throttle_duration_sec=2.0)

    def _on_reset(self, request, response):
        self.controller.reset()
        response.success, response.message = True, "action chunk queue cleared"
        self.get_logger().info("reset: action chunk queue cleared")
        return response

    def _on_emergency_stop(self, request, response):
        self._estop = "emergency stop (~/emergency_stop)"
        if self.controller is not None:
            self._publish(self.controller.emergency_stop(self._estop))
        self.get_logger().error("EMERGENCY STOP latched: actions stop until ~/clear_emergency_stop")
        response.success, response.message = True, "emergency stop latched until ~/clear_emergency_stop"
        return response

    def _on_clear_emergency_stop(self, request, response):
        response.success, self._estop = self._estop is not None, None
        if self.controller is not None:
            self.controller.clear_emergency_stop()
        response.message = "cleared" if response.success else "no emergency stop was latched"
        self.get_logger().warning(f"clear_emergency_stop: {response.message}")
        return response

    # -- control ------------------------------------------------------------------------------------------------
    def _on_control(self) -> None:
        controller = self.controller
        command = controller.step(self._now()) if controller is not None and self._active else None
        if command is not None:
            self._publish(command)

    def _on_watchdog(self) -> None:
        controller = self.controller
        command = controller.watchdog(self._now()) if controller is not None else None
        if command is not None:
            self.get_logger().warning(f"watchdog: {command.reason}: stop", throttle_duration_sec=1.0)
            self._publish(command)

    def _publish(self, command: Command, force: bool = False) -> None:
        with self._publish_lock:  # the watchdog, the control timer and the services publish from several threads
            if command.seq <= self._published_seq or not (self._active or force):
                return  # superseded by a command already sent (a stop overtook it), or output has ended
            self._published_seq = command.seq
            self._send(command)

    def _send(self, command: Command) -> None:
        stats, c = self.control_stats, self.controller
        if command.stop:
            if command.level == ERROR:  # one call site per severity (rclpy's rule for throttled logs)
                self.get_logger().error(f"{command.reason}: stop", throttle_duration_sec=2.0)
            else:
                self.get_logger().warning(f"{command.reason}: stop", throttle_duration_sec=2.0)
            if command.new_error:
                stats.error(command.reason)
            stats.set_level(_LEVEL[command.level], f"{command.reason}: stopped")
        else:
            stats.set_level(DiagnosticStatus.OK, "running")
        stats.processed(latency_s=command.latency_s)
        for key, value in c.counters().items():
            stats.set_value(key, value)
        stamp = self.get_clock().now().to_msg()
        for topic, msg in command_messages(command, stamp, self._param("frame_id"), self.dry_run):
            self.pubs[topic].publish(msg)


def main(args: list[str] | None = None) -> None:
    exit_process(run_node(VLANode, NODE_NAME, args, num_threads=4))


if __name__ == "__main__":
    main()
