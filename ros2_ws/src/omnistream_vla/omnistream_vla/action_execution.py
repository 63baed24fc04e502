"""How vla_node turns predicted chunks into one command per step, and the limits it holds them to (numpy only).

Execution (``action_execution`` parameter):

* ``queue`` (default): one chunk is predicted, its first ``n_action_steps`` actions are executed one per step,
  then the next chunk is predicted (the policy's own ``select_action``).
* ``ensemble``: temporal ensembling as in ACT (Zhao et al., 2023). The policy is queried every ``query_period``
  steps (1 = every step); each query predicts a chunk of ``chunk_size`` actions for this step and the next ones.
  The action executed at step t is the weighted mean of every prediction made for t that is still held,
  ``w_i = exp(-m * i)`` with ``i = 0`` the OLDEST prediction for t (``ensemble_m``; ACT uses m = 0.01). m > 0
  favours older predictions (slower to react to new observations), m = 0 is a plain mean, m < 0 favours the
  newest ones; m -> -inf executes the first action of every new chunk. Averaging overlapping predictions smooths
  the motion (scripts/compare_action_execution.py measures success and jerk).
  The gripper is averaged too and then read by the sign rule (``gripper_to_sign``: a tie opens).

Limits (:class:`ActionLimits`, in the robot's terms: metres and radians after the action convention's scaling):

* ``max_translation`` (m per step): a translation step longer than this is shortened along its direction;
* ``max_rotation`` (rad per step): a rotation step whose angle exceeds this is shortened about its axis;
* ``workspace_min``/``workspace_max`` (m, xyz in the action frame): the position the step leads to is clipped into
  the box. In relative mode this needs the end effector's current position (``position``): target = position +
  step. In absolute mode the target itself is clipped; the step caps then apply from the reference pose (the end
  effector's, else the previous target), and a rotation cap before any target needs the end effector's orientation.
0 (or no box) turns a limit off. Each limit that changed an action is reported, so the node can count it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EXECUTIONS = ("queue", "ensemble")


class TemporalEnsembler:
    """ACT's temporal ensemble over overlapping chunks: ``add`` a chunk predicted at the current step, ``pop``
    the current step's action (weighted mean over every held prediction for it) and advance one step."""

    def __init__(self, m: float = 0.01) -> None:
        if not math.isfinite(m):
            raise ValueError(f"ensemble m must be finite, got {m!r}")
        self.m = float(m)
        self._chunks: list[tuple[int, np.ndarray]] = []  # (step the chunk's first action is for, (k, dims))
        self._step = 0

    def add(self, chunk) -> None:
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or len(chunk) == 0:
            raise ValueError(f"a chunk must be (steps, dims), got shape {chunk.shape}")
        self._chunks.append((self._step, chunk))

    def predictions(self) -> np.ndarray:
        """Every held prediction for the current step, oldest first: (n, dims)."""
        rows = [chunk[self._step - start] for start, chunk in self._chunks if self._step - start < len(chunk)]
        return np.stack(rows) if rows else np.empty((0, 0))

    def has_action(self) -> bool:
        return any(self._step - start < len(chunk) for start, chunk in self._chunks)

    def pop(self) -> np.ndarray:
        preds = self.predictions()
        if len(preds) == 0:
            raise RuntimeError("no prediction held for this step (query the policy first)")
        weights = np.exp(-self.m * np.arange(len(preds)))
        action = (weights[:, None] * preds).sum(axis=0) / weights.sum()
        self._step += 1
        self._chunks = [(s, c) for s, c in self._chunks if self._step - s < len(c)]
        return action

    def reset(self) -> None:
        self._chunks.clear()
        self._step = 0

    def __len__(self) -> int:
        """How many chunks still hold a prediction for this step or a later one."""
        return len(self._chunks)


# -- rotations (roll-pitch-yaw = static x-y-z euler, R = Rz(yaw) Ry(pitch) Rx(roll), as action_convention) ----------
def rpy_to_matrix(rpy) -> np.ndarray:
    r, p, y = (float(v) for v in rpy)
    cr, sr, cp, sp, cy, sy = math.cos(r), math.sin(r), math.cos(p), math.sin(p), math.cos(y), math.sin(y)
    return np.array(
        [
            [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
            [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
            [-sp, cp * sr, cp * cr],
        ]
    )


def matrix_to_rpy(m: np.ndarray) -> np.ndarray:
    pitch = math.asin(max(-1.0, min(1.0, -m[2, 0])))
    if abs(m[2, 0]) < 1.0 - 1e-9:
        return np.array([math.atan2(m[2, 1], m[2, 2]), pitch, math.atan2(m[1, 0], m[0, 0])])
    return np.array([math.atan2(-m[1, 2], m[1, 1]), pitch, 0.0])  # gimbal lock: yaw folded into roll


def matrix_to_rotvec(m: np.ndarray) -> np.ndarray:
    angle = math.acos(max(-1.0, min(1.0, (np.trace(m) - 1.0) / 2.0)))
    if angle < 1e-9:
        return np.zeros(3)
    if math.pi - angle < 1e-6:  # a half turn: (R + I) / 2 = k k^T, its largest column is along the axis k
        b = (m + np.eye(3)) / 2.0
        col = b[:, int(np.argmax(np.linalg.norm(b, axis=0)))]
        return col / np.linalg.norm(col) * angle
    axis = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]]) / (2.0 * math.sin(angle))
    return axis * angle


def rotvec_to_matrix(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def _shorten(vector: np.ndarray, cap: float) -> tuple[np.ndarray, bool]:
    norm = float(np.linalg.norm(vector))
    if cap <= 0 or norm <= cap:
        return vector, False
    return vector * (cap / norm), True


@dataclass(frozen=True)
class EndEffector:
    """The robot's current end-effector pose in the action frame (orientation optional)."""

    position: np.ndarray
    rpy: np.ndarray | None = None


class LimitError(ValueError):
    """A limit cannot be checked (e.g. a workspace box without the end effector's position)."""


@dataclass(frozen=True)
class ActionLimits:
    max_translation: float = 0.0  # m per step, 0 = off
    max_rotation: float = 0.0  # rad per step, 0 = off
    workspace_min: tuple[float, float, float] | None = None
    workspace_max: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        for name in ("max_translation", "max_rotation"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        box = (self.workspace_min, self.workspace_max)
        if (box[0] is None) != (box[1] is None):
            raise ValueError("workspace_min and workspace_max are given together or not at all")
        if box[0] is not None:
            low, high = (np.asarray(b, dtype=np.float64) for b in box)
            if low.shape != (3,) or high.shape != (3,) or not np.isfinite([low, high]).all() or (low > high).any():
                raise ValueError(f"the workspace box must be 3 finite numbers each with min <= max, got {box}")

    @property
    def has_box(self) -> bool:
        return self.workspace_min is not None

    @property
    def active(self) -> bool:
        return self.has_box or self.max_translation > 0 or self.max_rotation > 0

    def needs_position(self, mode: str) -> bool:
        """Whether acting in ``mode`` needs the end effector's position (relative: a box; absolute: caps)."""
        if mode == "relative":
            return self.has_box
        return self.max_translation > 0 or self.max_rotation > 0

    def apply(
        self,
        mode: str,
        translation,
        rotation,
        ee: EndEffector | None = None,
        previous: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(translation, rotation, names of the limits that changed them). Relative mode: a step (delta);
        absolute mode: a target pose, ``previous`` the last commanded target. Raises :class:`LimitError` when a
        limit needs a reference that is not there."""
        t = np.asarray(translation, dtype=np.float64).copy()
        r = np.asarray(rotation, dtype=np.float64).copy()
        clipped: list[str] = []
        if not self.active:
            return t, r, clipped
        low = np.asarray(self.workspace_min, dtype=np.float64) if self.has_box else None
        high = np.asarray(self.workspace_max, dtype=np.float64) if self.has_box else None
        if mode == "relative":
            if self.has_box:
                if ee is None:
                    raise LimitError(
                        "the workspace box needs the end effector's position (ee_pose or ee_position_joints)"
                    )
                boxed = np.clip(ee.position + t, low, high) - ee.position
                if not np.allclose(boxed, t, atol=1e-12):
                    clipped.append("workspace")
                t = boxed
            t, cut = _shorten(t, self.max_translation)
            if cut:
                clipped.append("translation")
            if self.max_rotation > 0:
                v, cut = _shorten(matrix_to_rotvec(rpy_to_matrix(r)), self.max_rotation)
                if cut:
                    r = matrix_to_rpy(rotvec_to_matrix(v))
                    clipped.append("rotation")
            return t, r, clipped
        # absolute: clip the target into the box, then cap the step from the reference pose
        if self.has_box:
            boxed = np.clip(t, low, high)
            if not np.array_equal(boxed, t):
                clipped.append("workspace")
            t = boxed
        if self.max_translation > 0:
            ref = ee.position if ee is not None else (previous[0] if previous is not None else None)
            if ref is None:
                raise LimitError("max_translation_step in absolute mode needs the end effector's position first")
            step, cut = _shorten(t - ref, self.max_translation)
            if cut:
                t = ref + step
                clipped.append("translation")
        if self.max_rotation > 0:
            ref_rpy = ee.rpy if ee is not None and ee.rpy is not None else (previous[1] if previous else None)
            if ref_rpy is None:
                raise LimitError("max_rotation_step in absolute mode needs the end effector's orientation (ee_pose)")
            ref_m = rpy_to_matrix(ref_rpy)
            v, cut = _shorten(matrix_to_rotvec(ref_m.T @ rpy_to_matrix(r)), self.max_rotation)
            if cut:
                r = matrix_to_rpy(ref_m @ rotvec_to_matrix(v))
                clipped.append("rotation")
        return t, r, clipped


def quaternion_to_rpy(x: float, y: float, z: float, w: float) -> np.ndarray:
    """A (geometry_msgs) quaternion -> roll-pitch-yaw of the same rotation."""
    q = np.array([x, y, z, w], dtype=np.float64)
    n = float(np.linalg.norm(q))
    if not math.isfinite(n) or n < 1e-9:
        raise ValueError(f"not a rotation quaternion: {q.tolist()}")
    x, y, z, w = q / n
    m = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    return matrix_to_rpy(m)


def action_jerk(actions) -> float:
    """Mean norm of the third difference of a (steps, dims) action sequence (a smoothness measure; 0 if short)."""
    a = np.asarray(actions, dtype=np.float64)
    if len(a) < 4:
        return 0.0
    return float(np.linalg.norm(np.diff(a, n=3, axis=0), axis=-1).mean())
