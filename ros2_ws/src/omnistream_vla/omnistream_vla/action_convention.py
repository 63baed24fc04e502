"""What a policy's action means (units, relative or absolute, frame) and the gripper rule (rclpy- and torch-free).

A policy outputs 7 numbers in its training data's units: ``(x, y, z, roll, pitch, yaw, gripper)``. The
convention saved in its ``config.json`` (``action_convention``) says how to read them:

* ``translation_scale``: metres per policy unit (CALVIN ``rel_actions`` and the built-in tabletop: 0.02;
  datasets already in metres, e.g. Bridge or bags recorded from ``~/action``: 1.0);
* ``rotation_scale``: radians per policy unit (CALVIN and tabletop: 0.05; radians: 1.0); rotations are
  roll-pitch-yaw (static x-y-z axes, ``R = Rz(yaw) Ry(pitch) Rx(roll)``);
* ``mode``: ``relative`` (a delta per control step) or ``absolute`` (a target pose);
* ``frame``: ``base`` (the robot base / world frame, as CALVIN and the tabletop) or ``tool`` (the end effector);
* ``source``: where it came from (``calvin``, ``tabletop``, ``lerobot``, ``derived: ...``), for the log.

Policies saved before the convention existed get one derived from their normalisation (see
:func:`derive_convention`). The gripper is one convention everywhere (the node, ``omnistream_sim.conventions``,
the policy's outputs): negative closes, anything else opens, so a value of exactly 0 means OPEN
(:func:`gripper_to_sign`). Policies themselves output exactly +-1; 0 only comes from other sources.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CALVIN_TRANSLATION_SCALE = 0.02  # metres per CALVIN rel_action unit (the env's multiplier)
CALVIN_ROTATION_SCALE = 0.05  # radians per CALVIN rel_action unit
MODES = ("relative", "absolute")
FRAMES = ("base", "tool")


@dataclass(frozen=True)
class ActionConvention:
    translation_scale: float
    rotation_scale: float
    mode: str = "relative"
    frame: str = "base"
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("translation_scale", "rotation_scale"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"action_convention.{name} must be a finite number > 0, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"action_convention.mode must be one of {MODES}, got {self.mode!r}")
        if self.frame not in FRAMES:
            raise ValueError(f"action_convention.frame must be one of {FRAMES}, got {self.frame!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActionConvention:
        unknown = sorted(set(data) - {"translation_scale", "rotation_scale", "mode", "frame", "source"})
        if unknown:
            raise ValueError(f"unknown action_convention fields: {unknown}")
        return cls(**data)

    def describe(self) -> str:
        return (
            f"{self.mode} actions in the {self.frame} frame, {self.translation_scale:g} m and "
            f"{self.rotation_scale:g} rad per unit ({self.source or 'policy config'})"
        )


def calvin_convention(source: str = "calvin") -> ActionConvention:
    """CALVIN ``rel_actions`` units (the built-in tabletop uses them too)."""
    return ActionConvention(CALVIN_TRANSLATION_SCALE, CALVIN_ROTATION_SCALE, "relative", "base", source)


def metric_convention(source: str) -> ActionConvention:
    """Actions already in metres and radians (Bridge, bags recorded from vla_node's ``~/action``)."""
    return ActionConvention(1.0, 1.0, "relative", "base", source)


def convention_for_dataset(kind: str) -> ActionConvention:
    """The convention of a training dataset format (``omnistream_train.vla.detect_format``'s kinds)."""
    if kind in ("calvin", "tabletop"):
        return calvin_convention(kind)
    return metric_convention(kind)


def derive_convention(normalization_mode: str, stats: dict[str, Any]) -> ActionConvention:
    """For a policy saved without a convention: its normalisation tells its data.

    Fixed bounds of +-0.65 (CALVIN, the recipe) or +-1 (tabletop), or no statistics at all (``vla init``
    without a dataset: arm actions assumed in [-1, 1]) are CALVIN units; statistics of a LeRobot dataset
    (quantiles, mean/std, other bounds) are taken as metres and radians."""
    if normalization_mode == "identity":
        return calvin_convention("derived: no action statistics, [-1, 1] CALVIN-style units assumed")
    if normalization_mode == "min_max" and "min" in stats and "max" in stats:
        low, high = (np.asarray(stats[k], dtype=np.float64).ravel() for k in ("min", "max"))
        for bound in (0.65, 1.0):
            if np.allclose(low, -bound, atol=1e-6) and np.allclose(high, bound, atol=1e-6):
                return calvin_convention(f"derived: fixed bounds +-{bound:g} (CALVIN/tabletop units)")
    return metric_convention(f"derived: {normalization_mode} dataset statistics (metres/radians assumed)")


def gripper_to_sign(g) -> np.ndarray:
    """Any gripper command -> exactly -1 (close) or +1 (open); 0 counts as open (the stack's one rule)."""
    return np.where(np.asarray(g, dtype=np.float64) < 0, -1.0, 1.0)


def rpy_to_rotation_vector(rpy) -> np.ndarray:
    """Static x-y-z euler ``(roll, pitch, yaw)`` -> rotation vector ``axis * angle`` (angle in [0, pi]) of the
    same rotation ``Rz(yaw) Ry(pitch) Rx(roll)``; works on ``(..., 3)``."""
    e = np.asarray(rpy, dtype=np.float64)
    hr, hp, hy = e[..., 0] / 2, e[..., 1] / 2, e[..., 2] / 2
    cr, sr, cp, sp, cy, sy = np.cos(hr), np.sin(hr), np.cos(hp), np.sin(hp), np.cos(hy), np.sin(hy)
    # q = qz(yaw) * qy(pitch) * qx(roll)
    w = cy * cp * cr + sy * sp * sr
    x = cy * cp * sr - sy * sp * cr
    y = cy * sp * cr + sy * cp * sr
    z = sy * cp * cr - cy * sp * sr
    sign = np.where(w < 0, -1.0, 1.0)  # the short way round: angle <= pi
    w, v = w * sign, np.stack([x, y, z], axis=-1) * sign[..., None]
    norm = np.linalg.norm(v, axis=-1)
    angle = 2.0 * np.arctan2(norm, w)
    # angle / sin(angle / 2) -> 2 as the rotation vanishes
    scale = np.where(norm < 1e-12, 2.0, angle / np.where(norm < 1e-12, 1.0, norm))
    return v * scale[..., None]


def policy_convention(policy) -> ActionConvention:
    """The convention a loaded policy acts in: saved in its config, or derived from its normaliser."""
    saved = getattr(policy.config, "action_convention", None)
    if saved:
        return ActionConvention.from_dict(dict(saved))
    normalizer = policy.normalizer
    stats = {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for k, v in normalizer.stats.items()}
    return derive_convention(normalizer.mode, stats)


def resolve_convention(
    convention: ActionConvention, translation_scale: float, rotation_scale: float, action_mode: str
) -> ActionConvention:
    """The convention a node acts in, given its parameters (0 / "auto" = the policy's). Raises ValueError when
    they contradict the policy's (a 1.0 m/unit scale on a CALVIN-units policy commands 50x the taught motion)."""
    wrong = [
        f"{name} {given:g} but the policy's action convention is {value:g} ({convention.describe()}); "
        f"leave {name} at 0 to use it"
        for name, given, value in (
            ("translation_scale", translation_scale, convention.translation_scale),
            ("rotation_scale", rotation_scale, convention.rotation_scale),
        )
        if given != 0 and not math.isclose(given, value, rel_tol=1e-6)
    ]
    if action_mode not in ("auto", convention.mode):
        wrong.append(f"action_mode {action_mode} but the policy outputs {convention.mode} actions")
    if wrong:
        raise ValueError("the configuration contradicts the policy: " + "; ".join(wrong))
    return convention
