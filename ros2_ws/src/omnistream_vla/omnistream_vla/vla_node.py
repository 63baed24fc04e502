"""``vla_node``: StreamFeatures + an instruction -> the OmniStream VLA policy -> 7-DoF end-effector actions.

The behaviour (every safety rule) lives in the rclpy-free :class:`omnistream_vla.controller.VLAController`;
this node declares the parameters, subscribes, publishes and runs two timers: the control timer
(``control_rate``) and a watchdog (every 50 ms, its own callback group) that sends a stop as soon as features
go stale, even while a slow policy holds the control timer.

Inputs (relative names, remap them):
* ``features`` (omnistream_msgs/StreamFeatures, best-effort depth 1; the perception node's ``~/features``).
  A policy with several cameras reads ``<camera>/features`` for each. Their age is measured from their header
  stamp (the camera image's), so the camera's clock must agree with this node's within ``max_clock_skew``.
* ``instruction`` (std_msgs/String, reliable + transient-local by default). Control characters are removed and
  special-token text (``<|im_end|>``) stays plain text. ROS strings end at a NUL on the sender's side.
* ``joint_states`` (sensor_msgs/JointState): for a policy with robot-state input (``state_names``: entry i of its
  state is ``position[name.index(state_names[i])]`` of the newest message), or with ``use_joint_states``.

Outputs, one per control period:
* ``~/action`` (omnistream_msgs/EndEffectorAction): metres and radians (roll-pitch-yaw) = the policy's output x
  the policy's action convention (``translation_scale`` m and ``rotation_scale`` rad per unit, mode, frame;
  saved with the policy, e.g. CALVIN/tabletop policies 0.02 m and 0.05 rad per unit). Gripper +1 open / -1
  close (a policy value of exactly 0 opens). A stop has ``stop=True``, zero motion in relative mode and, in
  absolute mode, the last commanded target (never a zero target; before any target no ~/action is sent).
* ``~/twist`` (geometry_msgs/TwistStamped, relative mode only): linear = delta x rate, angular = the rotation
  vector of the roll-pitch-yaw delta x rate (a true angular velocity); zero on a stop.
* ``~/gripper`` (std_msgs/Float32), ``/diagnostics`` (control: received feature messages, rate of published
  commands including stops, ``stops``, the last stop reason) and ``~/reset`` (std_srvs/Trigger: clears the queue).
"""

from __future__ import annotations

import threading
from typing import Any

from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import TwistStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import Float32, String
from std_srvs.srv import Trigger

from omnistream_msgs.msg import EndEffectorAction, StreamFeatures
from omnistream_perception.diagnostics import DiagnosticsPublisher
from omnistream_perception.features_codec import decode_patch_tokens, stamp_seconds
from omnistream_perception.node_main import run_node
from omnistream_perception.node_params import declare_parameters, parameter_value

from .action_convention import policy_convention, resolve_convention
from .controller import ERROR, OK, WARN, Command, ControllerSettings, VLAController
from .vla_parameters import PARAMETERS, WATCHDOG_PERIOD_S

NODE_NAME = "vla_node"
FEATURES_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
_LEVEL = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}


class VLANode(Node):
    """The VLA node; construct it in any process (``parameter_overrides`` for tests and bring-up)."""

    def __init__(self, node_name: str = NODE_NAME, policy=None, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        try:
            self._setup(policy)
        except BaseException:
            Node.destroy_node(self)  # bad parameters or policy: leave nothing behind in the context
            raise

    def _setup(self, policy) -> None:
        declare_parameters(self, PARAMETERS, skip=("policy",) if policy is not None else ())
        self.add_post_set_parameters_callback(self._after_set_parameters)
        self.policy = policy if policy is not None else self._load_policy()
        self.policy.eval()
        self.policy.use_prefix_cache = bool(self._param("prefix_cache"))
        conv = resolve_convention(
            policy_convention(self.policy),
            self._param("translation_scale"),
            self._param("rotation_scale"),
            self._param("action_mode"),
        )
        settings = ControllerSettings(
            translation_scale=conv.translation_scale,
            rotation_scale=conv.rotation_scale,
            mode=conv.mode,
            initial_gripper=self._param("initial_gripper"),
            features_pooled=bool(self._param("features_pooled")),
            **self._live_settings(),
        )
        self.controller = VLAController(self.policy, settings, clock=self._now)
        self.cameras = self.controller.cameras
        self._publish_lock, self._published_seq = threading.Lock(), 0
        self.joint_states_received = 0
        self.diagnostics = DiagnosticsPublisher(self, period_s=self._param("diagnostics_period"))
        self.control_stats = self.diagnostics.stats("control")
        self.feature_stats = self.diagnostics.stats("features")
        self.control_stats.set_level(DiagnosticStatus.OK, "idle: no instruction yet")
        self.control_stats.set_value("action_convention", conv.describe())

        intake = MutuallyExclusiveCallbackGroup()
        self._control_group = MutuallyExclusiveCallbackGroup()
        for cam in self.cameras:
            topic = "features" if len(self.cameras) == 1 else f"{cam}/features"
            self.create_subscription(
                StreamFeatures, topic, lambda m, c=cam: self._on_features(c, m), FEATURES_QOS, callback_group=intake
            )
        durable = self._param("instruction_durability") == "transient_local"
        instruction_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if durable else DurabilityPolicy.VOLATILE,
        )  # fmt: skip
        self.create_subscription(String, "instruction", self._on_instruction, instruction_qos, callback_group=intake)
        if self._param("use_joint_states") or self.controller.state_names:
            self.create_subscription(JointState, "joint_states", self._on_joint_states, 10, callback_group=intake)
        self.action_pub = self.create_publisher(EndEffectorAction, "~/action", OUTPUT_QOS)
        self.twist_pub = self.create_publisher(TwistStamped, "~/twist", OUTPUT_QOS)
        self.gripper_pub = self.create_publisher(Float32, "~/gripper", OUTPUT_QOS)
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=intake)
        self._timer = self._make_timer()
        self.create_timer(WATCHDOG_PERIOD_S, self._on_watchdog, callback_group=MutuallyExclusiveCallbackGroup())
        self.get_logger().info(
            f"VLA policy ({self.policy.config.llm}) on camera(s) {', '.join(self.cameras)} at "
            f"{self._param('control_rate')} Hz; max feature age {self._param('max_feature_age')} s; {conv.describe()}"
        )

    # -- parameters ---------------------------------------------------------------------------------------------
    def _param(self, name: str) -> Any:
        return parameter_value(self, name, PARAMETERS)

    def _live_settings(self) -> dict[str, Any]:
        names = ("control_rate", "max_feature_age", "max_clock_skew", "max_instruction_chars")
        return {name: self._param(name) for name in names}

    def _after_set_parameters(self, params) -> None:
        self.controller.update(**self._live_settings())
        if any(p.name == "control_rate" for p in params):
            self.destroy_timer(self._timer)
            self._timer = self._make_timer()

    def _make_timer(self):
        period = 1.0 / self._param("control_rate")
        return self.create_timer(period, self._on_control, callback_group=self._control_group)

    def _load_policy(self):
        from .policy import OmniStreamVLAPolicy

        return OmniStreamVLAPolicy.from_pretrained(self._param("policy"), device=self._param("device"))

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

    def _on_reset(self, request, response):
        self.controller.reset()
        response.success, response.message = True, "action chunk queue cleared"
        self.get_logger().info("reset: action chunk queue cleared")
        return response

    # -- control ------------------------------------------------------------------------------------------------
    def _on_control(self) -> None:
        command = self.controller.step(self._now())
        if command is not None:
            self._publish(command)

    def _on_watchdog(self) -> None:
        command = self.controller.watchdog(self._now())
        if command is not None:
            self.get_logger().warning(f"watchdog: {command.reason}: stop", throttle_duration_sec=1.0)
            self._publish(command)

    def _publish(self, command: Command) -> None:
        with self._publish_lock:  # the watchdog and the control timer publish from two threads
            if command.seq <= self._published_seq:
                return  # issued before a command already sent (a stop overtook it): superseded
            self._published_seq = command.seq
            self._send(command)

    def _send(self, command: Command) -> None:
        stats = self.control_stats
        if command.stop:
            log = self.get_logger().error if command.level == ERROR else self.get_logger().warning
            log(f"{command.reason}: stop", throttle_duration_sec=2.0)
            if command.level == ERROR:
                stats.error(command.reason)
            stats.set_level(_LEVEL[command.level], f"{command.reason}: stopped")
        else:
            stats.set_level(DiagnosticStatus.OK, "running")
        stats.processed(latency_s=command.latency_s)
        stats.set_value("actions", self.controller.actions)
        stats.set_value("stops", self.controller.stops)
        stats.set_value("last_stop_reason", self.controller.last_reason)
        header_stamp, frame_id = self.get_clock().now().to_msg(), self._param("frame_id")
        if command.publish_action:
            msg = EndEffectorAction(mode=command.mode, stop=command.stop, gripper=command.gripper)
            msg.header.stamp, msg.header.frame_id = header_stamp, frame_id
            msg.translation.x, msg.translation.y, msg.translation.z = (float(v) for v in command.translation)
            msg.rotation.x, msg.rotation.y, msg.rotation.z = (float(v) for v in command.rotation)
            self.action_pub.publish(msg)
        if command.linear_velocity is not None:
            twist = TwistStamped()
            twist.header.stamp, twist.header.frame_id = header_stamp, frame_id
            linear, angular = twist.twist.linear, twist.twist.angular
            linear.x, linear.y, linear.z = (float(v) for v in command.linear_velocity)
            angular.x, angular.y, angular.z = (float(v) for v in command.angular_velocity)
            self.twist_pub.publish(twist)
        self.gripper_pub.publish(Float32(data=command.gripper))


def main(args: list[str] | None = None) -> int:
    return run_node(VLANode, NODE_NAME, args, num_threads=4)


if __name__ == "__main__":
    raise SystemExit(main())
