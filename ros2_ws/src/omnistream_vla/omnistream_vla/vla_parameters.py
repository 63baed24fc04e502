"""vla_node's parameters: names, defaults, documented ranges and checks (rclpy-free; ``vla_node`` declares them).

Safety parameters must be finite and in their range, at start and on every change: ``control_rate`` in
[0.5, 1000] Hz (an integer such as ``control_rate:=10`` is read as 10.0), ``max_feature_age`` in (0, 60] s,
``max_clock_skew`` in [0, 5] s. The action scales and mode default to the policy's action convention (0 /
``auto``); any other value must equal it (``action_convention.resolve_convention``).
"""

from __future__ import annotations

from omnistream_perception.node_params import ParamSpec, integer_in, non_empty, number_in, one_of

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
    "prefix_cache": ParamSpec(False, "reuse the system prompt's K/V across steps (equal up to float rounding)", True),
    "use_joint_states": ParamSpec(False, "subscribe to joint_states (reported in diagnostics)", True),
    "instruction_durability": ParamSpec("transient_local", "instruction QoS: transient_local | volatile", True,
                                        one_of("transient_local", "volatile")),
    "diagnostics_period": ParamSpec(1.0, "s in (0, 3600] between /diagnostics reports", True,
                                    number_in(0, 3600, low_open=True)),
}  # fmt: skip
