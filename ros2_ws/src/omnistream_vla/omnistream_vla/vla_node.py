"""``vla_node``: StreamFeatures + an instruction -> the OmniStream VLA policy -> 7-DoF end-effector actions.

Inputs (relative names, remap them):
* ``features`` (omnistream_msgs/StreamFeatures, best-effort depth 1; the perception node's ``~/features``).
  A policy with several cameras reads ``<camera>/features`` for each.
* ``instruction`` (std_msgs/String, reliable + transient-local by default, so a node started late still
  gets the last instruction; publish it transient-local too, e.g. ``ros2 topic pub --qos-durability
  transient_local``).
* ``joint_states`` (sensor_msgs/JointState): always for a policy with robot-state input (``state_names`` in its
  config), otherwise only with ``use_joint_states: true`` (then only reported). The policy's state is read BY NAME:
  entry i of ``observation.state`` is ``position[name.index(state_names[i])]`` of the newest message (so a robot
  driver publishes its joints and any extra named entries, e.g. the tabletop harness publishes the simulator's
  15-D state named by ``omnistream_sim.tabletop.env.STATE_NAMES``: TCP pose, gripper opening, 7 joints, last
  gripper command). A missing name, a non-finite value or a state older than ``max_feature_age`` -> stop action.

Outputs, one per control period (``control_rate`` Hz):
* ``~/action`` (omnistream_msgs/EndEffectorAction): translation [m] and rotation [rad, roll-pitch-yaw] =
  the policy's action (dataset units) x ``translation_scale`` / ``rotation_scale``; gripper +1 open / -1 close.
* ``~/twist`` (geometry_msgs/TwistStamped): the same motion as a velocity (delta x control_rate), for servo
  controllers such as MoveIt Servo; zero on a stop.
* ``~/gripper`` (std_msgs/Float32): the gripper command.
* ``/diagnostics`` and the ``~/reset`` service (std_srvs/Trigger: clears the action chunk queue).

Safety rules:
* no instruction yet -> idle: nothing is published;
* features older than ``max_feature_age`` (or none yet) -> a stop action (zero motion, gripper held, stop=True)
  and a diagnostics warning; the chunk queue is cleared so no action planned on old features is executed;
* NaN/inf from the policy -> a stop action, an error in the log and diagnostics, queue cleared;
* a new (different) instruction or ``~/reset`` clears the chunk queue;
* an empty instruction is rejected (the previous one stays), an overlong one truncated, both with a warning;
* malformed StreamFeatures (wrong sizes, unknown dtype, wrong width, NaN) are logged, counted and dropped.

Threads: subscriptions store the newest message only; the control timer runs the policy in its own callback
group, so a slow policy never blocks the intake of features.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import TwistStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import Float32, String
from std_srvs.srv import Trigger

from omnistream_msgs.msg import EndEffectorAction, StreamFeatures
from omnistream_perception.diagnostics import DiagnosticsPublisher
from omnistream_perception.node_main import run_node

from .stream_features import decode_patch_tokens

NODE_NAME = "vla_node"
FEATURES_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)


@dataclass(frozen=True)
class ParamSpec:
    default: Any
    description: str
    read_only: bool = False


PARAMETERS: dict[str, ParamSpec] = {
    "policy": ParamSpec("", "policy directory (`omnistream vla init` / training output)", True),
    "device": ParamSpec("cpu", "torch device: cpu | cuda | cuda:N | mps", True),
    "control_rate": ParamSpec(10.0, "actions published per second (Hz, > 0)"),
    "max_feature_age": ParamSpec(0.5, "seconds; older features -> stop action (> 0)"),
    "features_pooled": ParamSpec(True, "features are already pooled by the perception node (feature_pooling)", True),
    "max_instruction_chars": ParamSpec(512, "longer instructions are truncated with a warning (>= 1)"),
    "translation_scale": ParamSpec(1.0, "policy action (dataset units) x scale = translation in metres"),
    "rotation_scale": ParamSpec(1.0, "policy action (dataset units) x scale = rotation in radians"),
    "action_mode": ParamSpec("relative", "EndEffectorAction.mode: relative | absolute"),
    "frame_id": ParamSpec("base_link", "frame_id of ~/action and ~/twist"),
    "initial_gripper": ParamSpec(1.0, "gripper held by stop actions before the first command: 1 open | -1 close"),
    "prefix_cache": ParamSpec(False, "reuse the system prompt's K/V across steps (equal up to float rounding)", True),
    "use_joint_states": ParamSpec(False, "subscribe to joint_states (reported in diagnostics)", True),
    "instruction_durability": ParamSpec("transient_local", "instruction QoS: transient_local | volatile", True),
    "diagnostics_period": ParamSpec(1.0, "seconds between /diagnostics reports (> 0)", True),
}


def validate_parameter(name: str, value: Any) -> str | None:
    """A reason why ``value`` is bad for parameter ``name``, or None when it is fine."""
    if name == "policy" and not str(value).strip():
        return "policy is required: a policy directory written by `omnistream vla init` or training"
    if name in ("control_rate", "max_feature_age", "diagnostics_period") and not value > 0:
        return f"{name} must be > 0, got {value}"
    if name == "control_rate" and value > 1000:
        return f"control_rate must be <= 1000 Hz, got {value}"
    if name == "max_instruction_chars" and value < 1:
        return f"max_instruction_chars must be >= 1, got {value}"
    if name in ("translation_scale", "rotation_scale") and not np.isfinite(value):
        return f"{name} must be finite, got {value}"
    if name == "action_mode" and value not in ("relative", "absolute"):
        return f"action_mode must be relative or absolute, got {value!r}"
    if name == "initial_gripper" and value not in (1.0, -1.0):
        return f"initial_gripper must be 1.0 (open) or -1.0 (close), got {value}"
    if name == "instruction_durability" and value not in ("transient_local", "volatile"):
        return f"instruction_durability must be transient_local or volatile, got {value!r}"
    return None


class VLANode(Node):
    """The VLA node; construct it in any process (``parameter_overrides`` for tests and bring-up)."""

    def __init__(self, node_name: str = NODE_NAME, policy=None, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        for name, spec in PARAMETERS.items():
            self.declare_parameter(
                name, spec.default, ParameterDescriptor(description=spec.description, read_only=spec.read_only)
            )
        names = [n for n in PARAMETERS if not (n == "policy" and policy is not None)]
        problems = [p for n in names if (p := validate_parameter(n, self._param(n)))]
        if problems:
            raise ValueError("bad vla_node parameters: " + "; ".join(problems))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

        self.policy = policy if policy is not None else self._load_policy()
        self.policy.eval()
        self.policy.use_prefix_cache = bool(self._param("prefix_cache"))
        self.cameras = list(self.policy.config.cameras)
        self._lock = threading.Lock()  # state shared by the callbacks
        self._policy_lock = threading.Lock()  # a reset never interleaves with an inference
        self._instruction: str | None = None
        self._features: dict[str, tuple[np.ndarray, float]] = {}  # camera -> (tokens, monotonic receipt time)
        self._gripper = float(self._param("initial_gripper"))
        self._joint_state: JointState | None = None
        self._joint_state_time = 0.0
        self.joint_states_received = 0
        self.state_names = list(getattr(self.policy.config, "state_names", ()))
        self._was_stale = False
        self.actions_published = 0
        self.stops_published = 0

        self.diagnostics = DiagnosticsPublisher(self, period_s=self._param("diagnostics_period"))
        self.control_stats = self.diagnostics.stats("control")
        self.feature_stats = self.diagnostics.stats("features")
        self.control_stats.set_level(DiagnosticStatus.OK, "idle: no instruction yet")

        intake = MutuallyExclusiveCallbackGroup()
        self._control_group = MutuallyExclusiveCallbackGroup()
        for cam in self.cameras:
            topic = "features" if len(self.cameras) == 1 else f"{cam}/features"
            self.create_subscription(
                StreamFeatures, topic, lambda m, c=cam: self._on_features(c, m), FEATURES_QOS, callback_group=intake
            )
        durability = (
            DurabilityPolicy.TRANSIENT_LOCAL
            if self._param("instruction_durability") == "transient_local"
            else DurabilityPolicy.VOLATILE
        )
        instruction_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=durability
        )
        self.create_subscription(String, "instruction", self._on_instruction, instruction_qos, callback_group=intake)
        if self._param("use_joint_states") or self.state_names:
            self.create_subscription(JointState, "joint_states", self._on_joint_states, 10, callback_group=intake)
        self.action_pub = self.create_publisher(EndEffectorAction, "~/action", OUTPUT_QOS)
        self.twist_pub = self.create_publisher(TwistStamped, "~/twist", OUTPUT_QOS)
        self.gripper_pub = self.create_publisher(Float32, "~/gripper", OUTPUT_QOS)
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=intake)
        self._timer = self._make_timer()
        self.get_logger().info(
            f"VLA policy ({self.policy.config.llm}) on camera(s) {', '.join(self.cameras)} at "
            f"{self._param('control_rate')} Hz; max feature age {self._param('max_feature_age')} s"
        )

    # -- parameters ---------------------------------------------------------------------------------------------
    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _on_set_parameters(self, params) -> SetParametersResult:
        for p in params:
            if p.name in PARAMETERS and (reason := validate_parameter(p.name, p.value)) is not None:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, params) -> None:
        if any(p.name == "control_rate" for p in params):
            self.destroy_timer(self._timer)
            self._timer = self._make_timer()

    def _make_timer(self):
        return self.create_timer(
            1.0 / self._param("control_rate"), self._on_control, callback_group=self._control_group
        )

    def _load_policy(self):
        from .policy import OmniStreamVLAPolicy

        return OmniStreamVLAPolicy.from_pretrained(self._param("policy"), device=self._param("device"))

    # -- inputs -------------------------------------------------------------------------------------------------
    def _on_features(self, camera: str, msg: StreamFeatures) -> None:
        self.feature_stats.received()
        try:
            tokens = decode_patch_tokens(msg, expected_dim=self.policy.config.vision_hidden_size)
        except ValueError as exc:
            self.feature_stats.error(str(exc))
            self.feature_stats.dropped()
            self.get_logger().warning(f"dropped StreamFeatures ({camera}): {exc}", throttle_duration_sec=2.0)
            return
        with self._lock:
            self._features[camera] = (tokens, time.monotonic())
        self.feature_stats.processed()

    def _on_instruction(self, msg: String) -> None:
        from .policy.processor_omnistream_vla import clean_instruction

        try:
            text = clean_instruction(msg.data)
        except ValueError as exc:
            self.get_logger().warning(f"instruction rejected: {exc}; keeping {self._instruction!r}")
            self.control_stats.error(f"instruction rejected: {exc}")
            return
        limit = self._param("max_instruction_chars")
        if len(text) > limit:
            self.get_logger().warning(f"instruction of {len(text)} characters truncated to {limit}")
            text = text[:limit].rstrip()
        if self.policy.processor.encode_instruction(text).truncated:
            self.get_logger().warning(
                f"instruction truncated to the policy's {self.policy.config.max_instruction_tokens} tokens"
            )
        with self._lock:
            changed = text != self._instruction
            self._instruction = text
        if changed:
            self._clear_queue()
            self.get_logger().info(f"new instruction: {text!r}")
            self.control_stats.set_value("instruction", text)

    def _on_joint_states(self, msg: JointState) -> None:
        with self._lock:
            self._joint_state = msg
            self._joint_state_time = time.monotonic()
            self.joint_states_received += 1
        self.control_stats.set_value("joint_states", len(msg.position))

    def _on_reset(self, request, response):
        self._clear_queue()
        response.success = True
        response.message = "action chunk queue cleared"
        self.get_logger().info("reset: action chunk queue cleared")
        return response

    def _clear_queue(self) -> None:
        with self._policy_lock:
            self.policy.reset()

    def _policy_state(self, msg: JointState | None, age: float, max_age: float) -> tuple[np.ndarray | None, str | None]:
        """The policy's state vector from the newest JointState, by name; or the reason it cannot be built."""
        if msg is None:
            return None, "no joint_states yet (the policy reads the robot state)"
        if age > max_age:
            return None, f"joint_states older than {max_age} s"
        names = list(msg.name)
        missing = [n for n in self.state_names if n not in names]
        if missing or len(msg.position) < len(names):
            return None, f"joint_states lacks {missing or 'positions for its names'}"
        state = np.array([msg.position[names.index(n)] for n in self.state_names], dtype=np.float32)
        if not np.isfinite(state).all():
            return None, "joint_states holds NaN/inf"
        return state, None

    # -- control loop -------------------------------------------------------------------------------------------
    def _on_control(self) -> None:
        with self._lock:
            instruction = self._instruction
            features = dict(self._features)
            joint_state, joint_state_time = self._joint_state, self._joint_state_time
        if instruction is None:
            return  # idle: nothing to do, nothing to command
        now = time.monotonic()
        max_age = self._param("max_feature_age")
        stale = [c for c in self.cameras if c not in features or now - features[c][1] > max_age]
        if stale:
            if not self._was_stale:
                self.get_logger().warning(f"features of {stale} older than {max_age} s: stop action")
            self._was_stale = True
            self._clear_queue()
            self.control_stats.set_level(DiagnosticStatus.WARN, f"stale features ({', '.join(stale)}): stopped")
            self._publish(None)
            return
        if self._was_stale:
            self.get_logger().info("features fresh again: resuming")
            self._was_stale = False
        observation: dict[str, Any] = {"task": [instruction]}
        key = "observation.features" if self._param("features_pooled") else "observation.patch_tokens"
        for cam in self.cameras:
            tokens = features[cam][0]
            observation[f"{key}.{cam}"] = (
                tokens.reshape(1, -1, tokens.shape[-1]) if key.endswith("features") else tokens[None]
            )
        if self.state_names:
            state, problem = self._policy_state(joint_state, now - joint_state_time, max_age)
            if problem is not None:
                self.get_logger().warning(f"{problem}: stop action", throttle_duration_sec=2.0)
                self.control_stats.set_level(DiagnosticStatus.WARN, f"{problem}: stopped")
                self._clear_queue()
                self._publish(None)
                return
            observation["observation.state"] = state[None]
        start = time.perf_counter()
        try:
            with self._policy_lock:
                action = self.policy.select_action(observation)[0].float().cpu().numpy()
        except Exception as exc:  # a policy failure must end in a stop, never in a dead control loop
            self.get_logger().error(f"policy failed: {exc}: stop action")
            self.control_stats.error(f"policy failed: {exc}")
            self._clear_queue()
            self._publish(None)
            return
        if not np.isfinite(action).all():
            self.get_logger().error(
                f"the policy produced NaN/inf ({action.tolist()}): stop action", throttle_duration_sec=1.0
            )
            self.control_stats.set_level(DiagnosticStatus.ERROR, "the policy produced NaN/inf: stopped")
            self.control_stats.error("NaN/inf action")
            self._clear_queue()
            self._publish(None)
            return
        self.control_stats.processed(latency_s=time.perf_counter() - start)
        self.control_stats.set_level(DiagnosticStatus.OK, "running")
        self._publish(action)

    def _publish(self, action: np.ndarray | None) -> None:
        """Publishes ``action`` (7,) in dataset units, or a stop action (zero motion, gripper held) for None."""
        stamp = self.get_clock().now().to_msg()
        frame_id = self._param("frame_id")
        msg = EndEffectorAction()
        msg.header.stamp, msg.header.frame_id = stamp, frame_id
        msg.mode = self._param("action_mode")
        twist = TwistStamped()
        twist.header.stamp, twist.header.frame_id = stamp, frame_id
        if action is None:
            msg.stop = True
            self.stops_published += 1
        else:
            translation = action[:3] * self._param("translation_scale")
            rotation = action[3:6] * self._param("rotation_scale")
            msg.translation.x, msg.translation.y, msg.translation.z = (float(v) for v in translation)
            msg.rotation.x, msg.rotation.y, msg.rotation.z = (float(v) for v in rotation)
            self._gripper = 1.0 if action[6] > 0 else -1.0
            rate = self._param("control_rate")
            twist.twist.linear.x, twist.twist.linear.y, twist.twist.linear.z = (float(v * rate) for v in translation)
            twist.twist.angular.x, twist.twist.angular.y, twist.twist.angular.z = (float(v * rate) for v in rotation)
            self.actions_published += 1
        msg.gripper = self._gripper
        self.action_pub.publish(msg)
        self.twist_pub.publish(twist)
        self.gripper_pub.publish(Float32(data=self._gripper))


def main(args: list[str] | None = None) -> int:
    return run_node(VLANode, NODE_NAME, args, num_threads=3)


if __name__ == "__main__":
    raise SystemExit(main())
