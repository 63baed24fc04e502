"""Explicit action-convention converters, used by every environment's rollout loop (never inside a model).

Conventions (see ``../shared/specs/simulators.md``):

* CALVIN relative actions: the env multiplies position by 0.02 and orientation by 0.05, so a policy outputs
  ``delta_metres * 50`` and ``delta_radians * 20`` clipped to [-1, 1]; the gripper is exactly -1 (close) or
  +1 (open). The built-in tabletop uses the same convention.
* The VLA head's CALVIN normalisation: arm dims clipped to +-0.65 and rescaled to [-1, 1]; gripper {-1, 1}
  becomes a {0, 1} target for the binary cross-entropy.
* Bridge / SimplerEnv-WidowX: the env wants a base-aligned xyz delta (metres), an axis-angle rotation
  delta and a gripper +1 open / -1 close; Bridge-trained policies predict euler deltas (roll, pitch, yaw;
  static x-y-z axes, i.e. ``R = Rz(yaw) @ Ry(pitch) @ Rx(roll)``) and a gripper in [0, 1], converted with
  ``2 * (g > 0.5) - 1``. Bridge actions are normalised with their 1st/99th percentile bounds.
* Gripper in sign convention: negative closes, anything else opens, so exactly 0 means open, here and in
  vla_node (one rule: ``omnistream_vla.action_convention.gripper_to_sign``).

Every function accepts a single action ``(7,)`` or a batch ``(..., 7)`` (or ``(..., 3)`` for rotations) and
returns float32 (float64 for the rotation maths) arrays without modifying its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omnistream_vla.action_convention import gripper_to_sign as _gripper_to_sign
from omnistream_vla.action_convention import rpy_to_rotation_vector

# --------------------------------------------------------------------------------------------------- CALVIN
CALVIN_POSITION_SCALE = 50.0  # 1 / 0.02: the env's multiplier on the relative position action
CALVIN_ORIENTATION_SCALE = 20.0  # 1 / 0.05: the env's multiplier on the relative orientation action
CALVIN_VLA_CLIP = 0.65  # the VLM4VLA recipe clips CALVIN actions to +-0.65 before rescaling to [-1, 1]


def _as_actions(action, name: str = "action", dims: int = 7) -> np.ndarray:
    arr = np.asarray(action, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != dims:
        raise ValueError(f"{name} must have a last dimension of {dims}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf: {arr}")
    return arr


def calvin_delta_to_rel_action(delta, clip: bool = True) -> np.ndarray:
    """World-frame ``(dx, dy, dz [m], droll, dpitch, dyaw [rad], gripper +-1)`` -> CALVIN ``rel_actions``."""
    d = _as_actions(delta, "delta").copy()
    d[..., :3] *= CALVIN_POSITION_SCALE
    d[..., 3:6] *= CALVIN_ORIENTATION_SCALE
    if clip:
        d[..., :6] = np.clip(d[..., :6], -1.0, 1.0)
    d[..., 6] = gripper_to_sign(d[..., 6])
    return d.astype(np.float32)


def calvin_rel_action_to_delta(rel_action) -> np.ndarray:
    """CALVIN ``rel_actions`` -> world-frame deltas in metres / radians (what the env applies), gripper +-1."""
    a = _as_actions(rel_action, "rel_action").copy()
    a[..., :6] = np.clip(a[..., :6], -1.0, 1.0)
    a[..., :3] /= CALVIN_POSITION_SCALE
    a[..., 3:6] /= CALVIN_ORIENTATION_SCALE
    a[..., 6] = gripper_to_sign(a[..., 6])
    return a.astype(np.float32)


def calvin_env_action(rel_action) -> np.ndarray:
    """What CALVIN's ``env.step`` accepts: arm clipped to [-1, 1], gripper exactly -1 or +1 (the env asserts it)."""
    a = _as_actions(rel_action, "rel_action").copy()
    a[..., :6] = np.clip(a[..., :6], -1.0, 1.0)
    a[..., 6] = gripper_to_sign(a[..., 6])
    return a.astype(np.float32)


def calvin_normalize_for_vla(rel_action, clip: float = CALVIN_VLA_CLIP) -> np.ndarray:
    """CALVIN action -> the VLA training target: arm clipped to +-clip and rescaled to [-1, 1]; gripper {0, 1}."""
    a = _as_actions(rel_action, "rel_action").copy()
    a[..., :6] = np.clip(a[..., :6], -clip, clip) / clip
    a[..., 6] = gripper_sign_to_binary(a[..., 6])
    return a.astype(np.float32)


def calvin_unnormalize_from_vla(normalized, clip: float = CALVIN_VLA_CLIP) -> np.ndarray:
    """Inverse of :func:`calvin_normalize_for_vla`: arm in [-1, 1] -> +-clip; gripper probability -> +-1."""
    a = _as_actions(normalized, "normalized action").copy()
    a[..., :6] = np.clip(a[..., :6], -1.0, 1.0) * clip
    a[..., 6] = gripper_binary_to_sign(a[..., 6])
    return a.astype(np.float32)


# -------------------------------------------------------------------------------------------------- gripper
def gripper_to_sign(g) -> np.ndarray:
    """Any gripper command in sign convention -> exactly -1 (close) or +1 (open); 0 counts as open (the stack's
    one rule, shared with vla_node: ``omnistream_vla.action_convention.gripper_to_sign``)."""
    return _gripper_to_sign(g)


def gripper_sign_to_binary(g) -> np.ndarray:
    """Gripper -1 (close) / +1 (open) -> 0 / 1 (the BCE target; 1 = open)."""
    return (gripper_to_sign(g) > 0).astype(np.float64)


def gripper_binary_to_sign(g) -> np.ndarray:
    """Gripper in [0, 1] (a probability of 'open') -> +1 open / -1 close, i.e. ``2 * (g > 0.5) - 1``."""
    g = np.asarray(g, dtype=np.float64)
    return 2.0 * (g > 0.5) - 1.0


# ------------------------------------------------------------------------------------------------ rotations
def euler_to_matrix(euler) -> np.ndarray:
    """Static-axes x-y-z euler ``(roll, pitch, yaw)`` -> rotation matrix ``Rz(yaw) @ Ry(pitch) @ Rx(roll)``."""
    e = _as_actions(euler, "euler", 3)
    r, p, y = e[..., 0], e[..., 1], e[..., 2]
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    m = np.empty(e.shape[:-1] + (3, 3))
    m[..., 0, 0] = cy * cp
    m[..., 0, 1] = cy * sp * sr - sy * cr
    m[..., 0, 2] = cy * sp * cr + sy * sr
    m[..., 1, 0] = sy * cp
    m[..., 1, 1] = sy * sp * sr + cy * cr
    m[..., 1, 2] = sy * sp * cr - cy * sr
    m[..., 2, 0] = -sp
    m[..., 2, 1] = cp * sr
    m[..., 2, 2] = cp * cr
    return m


def matrix_to_euler(m) -> np.ndarray:
    """Inverse of :func:`euler_to_matrix` (pitch in [-pi/2, pi/2])."""
    m = np.asarray(m, dtype=np.float64)
    pitch = np.arcsin(np.clip(-m[..., 2, 0], -1.0, 1.0))
    roll = np.arctan2(m[..., 2, 1], m[..., 2, 2])
    yaw = np.arctan2(m[..., 1, 0], m[..., 0, 0])
    return np.stack([roll, pitch, yaw], axis=-1)


def matrix_to_quaternion(m) -> np.ndarray:
    """Rotation matrix -> unit quaternion ``(w, x, y, z)`` with w >= 0 (Shepperd's method: stable near pi)."""
    m = np.asarray(m, dtype=np.float64)
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # 4*q_i^2 for each component; take the largest as the pivot to avoid dividing by a tiny number.
    sq = np.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], axis=-1)
    pivot = np.argmax(sq, axis=-1)
    root = np.sqrt(np.clip(np.take_along_axis(sq, pivot[..., None], -1)[..., 0], 1e-30, None))
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    s21, s02, s10 = m[..., 2, 1] + m[..., 1, 2], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1]
    candidates = np.stack(
        [
            np.stack([root * root, d21, d02, d10], -1),
            np.stack([d21, root * root, s10, s02], -1),
            np.stack([d02, s10, root * root, s21], -1),
            np.stack([d10, s02, s21, root * root], -1),
        ],
        axis=-2,
    )
    q = np.take_along_axis(candidates, pivot[..., None, None], -2)[..., 0, :] / (2.0 * root[..., None])
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


def matrix_to_axis_angle(m) -> np.ndarray:
    """Rotation matrix -> rotation vector ``axis * angle`` (angle in [0, pi])."""
    q = matrix_to_quaternion(m)
    vec_norm = np.linalg.norm(q[..., 1:], axis=-1)
    angle = 2.0 * np.arctan2(vec_norm, q[..., 0])
    # angle / sin(angle/2) -> 2 as the rotation vanishes.
    scale = np.where(vec_norm < 1e-12, 2.0, angle / np.where(vec_norm < 1e-12, 1.0, vec_norm))
    return q[..., 1:] * scale[..., None]


def axis_angle_to_matrix(rotvec) -> np.ndarray:
    """Rotation vector ``axis * angle`` -> rotation matrix (Rodrigues)."""
    v = _as_actions(rotvec, "axis-angle", 3)
    angle = np.linalg.norm(v, axis=-1)
    small = angle < 1e-6
    safe = np.where(small, 1.0, angle)
    # R = I + A [v]x + B [v]x^2 with the unnormalised skew matrix; the series limits keep tiny angles exact.
    a = np.where(small, 1.0 - angle**2 / 6.0, np.sin(safe) / safe)[..., None, None]
    b = np.where(small, 0.5 - angle**2 / 24.0, (1.0 - np.cos(safe)) / safe**2)[..., None, None]
    vx, vy, vz = v[..., 0], v[..., 1], v[..., 2]
    zero = np.zeros_like(vx)
    skew = np.stack([zero, -vz, vy, vz, zero, -vx, -vy, vx, zero], axis=-1).reshape(v.shape[:-1] + (3, 3))
    eye = np.broadcast_to(np.eye(3), skew.shape)
    return eye + a * skew + b * (skew @ skew)


def euler_to_axis_angle(euler) -> np.ndarray:
    """Bridge euler delta ``(roll, pitch, yaw)`` -> SimplerEnv's axis-angle rotation vector (the same maths as
    vla_node's angular velocity: ``omnistream_vla.action_convention.rpy_to_rotation_vector``)."""
    return rpy_to_rotation_vector(_as_actions(euler, "euler", 3))


def axis_angle_to_euler(rotvec) -> np.ndarray:
    """SimplerEnv axis-angle rotation vector -> Bridge euler ``(roll, pitch, yaw)``."""
    return matrix_to_euler(axis_angle_to_matrix(rotvec))


# --------------------------------------------------------------------------------------------------- Bridge
def _convert_action(action, rotation, gripper) -> np.ndarray:
    """``(xyz, rotation, gripper)`` actions with the rotation and gripper mapped; the translation unchanged."""
    a = _as_actions(action)
    out = np.empty(a.shape, dtype=np.float64)
    out[..., :3] = a[..., :3]
    out[..., 3:6] = rotation(a[..., 3:6])
    out[..., 6] = gripper(a[..., 6])
    return out.astype(np.float32)


def bridge_to_simpler_action(action) -> np.ndarray:
    """Bridge policy output ``(xyz, euler, gripper in [0, 1])`` -> SimplerEnv ``(xyz, axis-angle, +-1)``."""
    return _convert_action(action, euler_to_axis_angle, gripper_binary_to_sign)


def simpler_to_bridge_action(action) -> np.ndarray:
    """Inverse of :func:`bridge_to_simpler_action` (gripper +1 -> 1.0, -1 -> 0.0)."""
    return _convert_action(action, axis_angle_to_euler, gripper_sign_to_binary)


@dataclass
class PercentileBounds:
    """Per-dimension 1st/99th percentile bounds used to map Bridge actions to [-1, 1] and back."""

    low: np.ndarray
    high: np.ndarray

    def __post_init__(self):
        self.low = np.asarray(self.low, dtype=np.float64)
        self.high = np.asarray(self.high, dtype=np.float64)
        if self.low.shape != self.high.shape or self.low.ndim != 1:
            raise ValueError(f"low/high must be 1-D of equal shape, got {self.low.shape} and {self.high.shape}")
        if np.any(self.high < self.low):
            raise ValueError("percentile bounds need high >= low in every dimension")

    @classmethod
    def from_actions(cls, actions, low_q: float = 1.0, high_q: float = 99.0) -> PercentileBounds:
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim != 2 or len(a) == 0:
            raise ValueError(f"actions must be a non-empty (N, D) array, got shape {a.shape}")
        return cls(np.percentile(a, low_q, axis=0), np.percentile(a, high_q, axis=0))

    def to_dict(self) -> dict:
        return {"low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> PercentileBounds:
        return cls(d["low"], d["high"])

    def _span(self) -> np.ndarray:
        # A constant dimension (high == low) maps to 0 instead of dividing by zero.
        return np.where(self.high - self.low < 1e-8, 1.0, self.high - self.low)

    def normalize(self, x, dims: slice | None = None) -> np.ndarray:
        """Map to [-1, 1] with the bounds (clipped), ``2 * (x - low) / (high - low) - 1``."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.low.shape[0]:
            raise ValueError(f"action has {x.shape[-1]} dims but the bounds have {self.low.shape[0]}")
        out = 2.0 * (x - self.low) / self._span() - 1.0
        out = np.where(self.high - self.low < 1e-8, 0.0, out)
        return np.clip(out, -1.0, 1.0).astype(np.float32)

    def unnormalize(self, y) -> np.ndarray:
        """Inverse of :meth:`normalize` for values in [-1, 1]."""
        y = np.clip(np.asarray(y, dtype=np.float64), -1.0, 1.0)
        if y.shape[-1] != self.low.shape[0]:
            raise ValueError(f"action has {y.shape[-1]} dims but the bounds have {self.low.shape[0]}")
        return ((y + 1.0) / 2.0 * (self.high - self.low) + self.low).astype(np.float32)
