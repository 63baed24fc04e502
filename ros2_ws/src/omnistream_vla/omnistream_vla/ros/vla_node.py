"""``vla_node``: StreamFeatures + an instruction -> the OmniStream VLA policy -> 7-DoF end-effector actions.

A managed (lifecycle) node. The behaviour (safety rules, queue/ensemble execution, limits, emergency stop, camera
matching) lives in the rclpy-free :class:`omnistream_vla.controller.VLAController`, its parameters in
``vla_parameters``, its messages in ``vla_messages``; the subscriptions and what each input does in ``vla_inputs``,
the publishing in ``vla_output``. This node runs the lifecycle, the services, the control timer (``control_rate``)
and a watchdog (every 50 ms, own callback group) that stops as soon as features go stale.

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

from typing import Any

from diagnostic_msgs.msg import DiagnosticStatus
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from std_srvs.srv import Trigger

from omnistream_perception.ros.diagnostics import DiagnosticsPublisher
from omnistream_perception.ros.managed_node import ManagedNode
from omnistream_perception.ros.node_main import exit_process, run_node
from omnistream_perception.ros.node_params import declare_parameters, parameter_value

from ..action_convention import policy_convention, resolve_convention
from ..controller import Command, VLAController
from .vla_inputs import ControllerInputs
from .vla_output import CommandOutput
from .vla_parameters import PARAMETERS, WATCHDOG_PERIOD_S, controller_settings, live_settings

NODE_NAME = "vla_node"


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
        self._given_policy, self.policy, self.controller, self.output = policy, None, None, None
        self._estop, self._timer = None, None
        self.inputs = ControllerInputs(self)
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
        self.controller = VLAController(self.policy, settings, clock=self.now)
        if self._estop is not None:
            self.controller.emergency_stop(self._estop)
        self.cameras = self.controller.cameras
        self.dry_run = bool(self._param("dry_run"))
        self.output = CommandOutput(self, self.control_stats, self._param("frame_id"), self.dry_run)
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
        self.inputs.open(self._param)
        self._control_group = MutuallyExclusiveCallbackGroup()
        self._timer = self.keep_input(self._make_timer())
        self.keep_input(self.create_timer(WATCHDOG_PERIOD_S, self._on_watchdog, MutuallyExclusiveCallbackGroup()))
        self.output.active = True

    def deactivate(self) -> None:
        self.output.active = False  # from here no control step publishes; the stop below is the last command
        self._publish(self.controller.stop_now("deactivated"), force=True)

    def release(self) -> None:
        self.output, self.controller, self.policy = None, None, None

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
        if any(p.name == "control_rate" for p in params) and self._timer is not None and self._outputting():
            self.drop_input(self._timer)
            self._timer = self.keep_input(self._make_timer())

    def _make_timer(self):
        period = 1.0 / self._param("control_rate")
        return self.create_timer(period, self._on_control, callback_group=self._control_group)

    def _outputting(self) -> bool:
        output = self.output
        return output is not None and output.active

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    @property
    def joint_states_received(self) -> int:
        return self.inputs.joint_states_received

    @property
    def actions_published(self) -> int:
        return self.controller.actions

    @property
    def stops_published(self) -> int:
        return self.controller.stops

    # -- services ---------------------------------------------------------------------------------------------
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
        command = controller.step(self.now()) if controller is not None and self._outputting() else None
        if command is not None:
            self._publish(command)

    def _on_watchdog(self) -> None:
        controller = self.controller
        command = controller.watchdog(self.now()) if controller is not None else None
        if command is not None:
            self.get_logger().warning(f"watchdog: {command.reason}: stop", throttle_duration_sec=1.0)
            self._publish(command)

    def _publish(self, command: Command, force: bool = False) -> None:
        output, controller = self.output, self.controller
        if output is not None and controller is not None:
            output.publish(command, controller.counters(), force)


def main(args: list[str] | None = None) -> None:
    exit_process(run_node(VLANode, NODE_NAME, args, num_threads=4))


if __name__ == "__main__":
    main()
