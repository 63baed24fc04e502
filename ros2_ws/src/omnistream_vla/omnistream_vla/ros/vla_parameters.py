"""vla_node's parameters: names, defaults, documented ranges and checks (rclpy-free; ``vla_node`` declares them).

Safety parameters must be finite and in their range, at start and on every change: ``control_rate`` in
[0.5, 1000] Hz (an integer such as ``control_rate:=10`` is read as 10.0), ``max_feature_age`` in (0, 60] s,
``max_clock_skew`` in [0, 5] s. The action scales and mode default to the policy's action convention (0 /
``auto``); any other value must equal it (``action_convention.resolve_convention``).

Execution and limits (``action_execution``): ``action_execution`` queue | ensemble, ``ensemble_m`` (weights
``exp(-m * i)``, i = 0 the oldest prediction), ``query_period``; ``max_translation_step`` (m) and
``max_rotation_step`` (rad) per step, 0 = off; ``workspace_enabled`` with ``workspace_min``/``workspace_max``
(m, xyz in ``frame_id``). The box in relative mode, and the caps in absolute mode, need the end effector's
current pose: ``ee_pose_topic`` (geometry_msgs/PoseStamped in ``frame_id``) or ``ee_position_joints`` (three
joint_states names holding x, y, z). The caps, the box and ``camera_sync_tolerance`` may change at runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omnistream_perception.ros.node_params import ParamSpec, integer_in, non_empty, number_in, one_of

from ..action_execution import ActionLimits
from ..controller import ControllerSettings


def _box_corner(value: Any) -> str | None:
    if not isinstance(value, list | tuple) or len(value) != 3:
        return f"must be 3 numbers (x, y, z in metres), got {value!r}"
    if not all(isinstance(v, float | int) and math.isfinite(v) for v in value):
        return f"must be finite numbers, got {value!r}"
    return None


def _joint_names(value: Any) -> str | None:
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    return None if len(names) in (0, 3) else f"must name 3 joint_states entries (x,y,z) or none, got {value!r}"


# The watchdog's period: a stop follows stale features within max_feature_age + this, whatever the control rate.
WATCHDOG_PERIOD_S = 0.05

PARAMETERS: dict[str, ParamSpec] = {
    "policy": ParamSpec("", "policy directory (`omnistream vla init` / training output)", True,
                        non_empty("a policy directory written by `omnistream vla init` or training")),
    "device": ParamSpec("cpu", "torch device: cpu | cuda | cuda:N | mps", True),
    "control_rate": ParamSpec(10.0, "actions published per second, Hz in [0.5, 1000]", check=number_in(0.5, 1000)),
    "max_feature_age": ParamSpec(0.5, "s in (0, 60]; older features (by header stamp) -> stop",
                                 check=number_in(0, 60, low_open=True)),
    "max_clock_skew": ParamSpec(0.05, "s in [0, 5]: how far a features stamp may be ahead of this clock",
                                check=number_in(0, 5)),
    "features_pooled": ParamSpec(True, "features are already pooled by the perception node (feature_pooling)", True),
    "max_instruction_chars": ParamSpec(512, "longer instructions are truncated with a warning (>= 1)",
                                       check=integer_in(1)),
    "translation_scale": ParamSpec(0.0, "m per policy unit; 0 = the policy's convention (any other value must "
                                   "equal it)", True, number_in(0, 1000, low_open=True, zero_ok=True)),
    "rotation_scale": ParamSpec(0.0, "rad per policy unit; 0 = the policy's convention (any other value must "
                                "equal it)", True, number_in(0, 1000, low_open=True, zero_ok=True)),
    "action_mode": ParamSpec("auto", "auto (the policy's) | relative | absolute (must equal the policy's)", True,
                             one_of("auto", "relative", "absolute")),
    "frame_id": ParamSpec("base_link", "frame_id of ~/action and ~/twist (the policy's frame on this robot)"),
    "initial_gripper": ParamSpec(1.0, "gripper held by stops before the first command: 1 open | -1 close",
                                 check=one_of(1.0, -1.0)),
    "prefix_cache": ParamSpec(True, "reuse the prompt prefix's K/V across steps (same actions to rounding)", True),
    "use_joint_states": ParamSpec(False, "subscribe to joint_states (reported in diagnostics)", True),
    "instruction_durability": ParamSpec("transient_local", "instruction QoS: transient_local | volatile", True,
                                        one_of("transient_local", "volatile")),
    "diagnostics_period": ParamSpec(1.0, "s in (0, 3600] between /diagnostics reports", True,
                                    number_in(0, 3600, low_open=True)),
    "action_execution": ParamSpec("queue", "queue (execute chunks in turn) | ensemble (ACT temporal ensembling)",
                                  True, one_of("queue", "ensemble")),
    "ensemble_m": ParamSpec(0.01, "ensemble weights exp(-m * i), i = 0 the oldest prediction; in [-1, 10]",
                            check=number_in(-1, 10)),
    "query_period": ParamSpec(1, "ensemble: control steps between policy queries, in [1, chunk_size]", True,
                              integer_in(1, 1000)),
    "max_translation_step": ParamSpec(0.0, "m in [0, 1] per step (0 = off); longer steps are shortened",
                                      check=number_in(0, 1)),
    "max_rotation_step": ParamSpec(0.0, "rad in [0, pi] per step (0 = off); larger rotations are shortened",
                                   check=number_in(0, math.pi)),
    "workspace_enabled": ParamSpec(False, "clip commanded positions into workspace_min..workspace_max"),
    "workspace_min": ParamSpec([-1.0, -1.0, -1.0], "m, xyz corner of the workspace box in frame_id",
                               check=_box_corner),
    "workspace_max": ParamSpec([1.0, 1.0, 1.0], "m, xyz corner of the workspace box in frame_id", check=_box_corner),
    "ee_pose_topic": ParamSpec("", "geometry_msgs/PoseStamped of the end effector in frame_id ('' = none)", True),
    "ee_position_joints": ParamSpec("", "three joint_states names holding the end effector's x,y,z ('' = none)",
                                    True, _joint_names),
    "camera_sync_tolerance": ParamSpec(0.05, "s in [0, 1]: most the cameras' feature stamps of one step may differ",
                                       check=number_in(0, 1)),
    "dry_run": ParamSpec(False, "publish proposed actions on ~/proposed_action only, nothing on the command topics",
                         True),
    "autostart": ParamSpec(True, "configure and activate at start (false: wait for the lifecycle services)", True),
}  # fmt: skip


def joint_names(value: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in str(value).split(",") if n.strip())


def controller_settings(param: Callable[[str], Any], convention) -> ControllerSettings:
    """The controller's settings from the parameters and the policy's resolved action convention."""
    return ControllerSettings(
        translation_scale=convention.translation_scale, rotation_scale=convention.rotation_scale,
        mode=convention.mode, initial_gripper=param("initial_gripper"),
        features_pooled=bool(param("features_pooled")), execution=param("action_execution"),
        query_period=param("query_period"), ee_position_joints=joint_names(param("ee_position_joints")),
        **live_settings(param),
    )  # fmt: skip


def live_settings(param: Callable[[str], Any]) -> dict[str, Any]:
    """The controller settings that follow the live parameters (``param(name)`` reads one)."""
    box = tuple(tuple(float(v) for v in param(name)) for name in ("workspace_min", "workspace_max"))
    ActionLimits(workspace_min=box[0], workspace_max=box[1])  # a bad box is refused even while disabled
    enabled = param("workspace_enabled")
    limits = ActionLimits(
        max_translation=param("max_translation_step"),
        max_rotation=param("max_rotation_step"),
        workspace_min=box[0] if enabled else None,
        workspace_max=box[1] if enabled else None,
    )
    names = ("control_rate", "max_feature_age", "max_clock_skew", "max_instruction_chars", "ensemble_m",
             "camera_sync_tolerance")  # fmt: skip
    return {**{name: param(name) for name in names}, "limits": limits}
