"""Action normalisation from dataset statistics, outside the model (LeRobot's MIN_MAX / MEAN_STD / QUANTILES).

Only the arm dimensions are normalised; the gripper is a binary command (+1 open, -1 close) that the policy
predicts as a logit and never passes through statistics.

Modes (``x`` raw, ``y`` normalised):
* ``min_max``:   x clipped to [min, max], y = 2 (x - min) / (max - min) - 1 in [-1, 1]
                 (CALVIN: fixed bounds +-0.65 via ``ActionNormalizer.from_bounds``)
* ``quantiles``: as min_max with the 1st/99th percentiles (q01, q99) as bounds (Bridge)
* ``mean_std``:  y = (x - mean) / std
* ``identity``:  y = x

Statistics come from a LeRobot ``meta/stats.json`` (per feature ``min``, ``max``, ``mean``, ``std``, ``q01``,
``q99``...) and are saved with the policy as ``normalization.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

NORMALIZATION_MODES = ("identity", "min_max", "mean_std", "quantiles")
STATS_FILE = "normalization.safetensors"
_EPS = 1e-8
# Statistics each mode needs.
_REQUIRED = {"identity": (), "min_max": ("min", "max"), "quantiles": ("q01", "q99"), "mean_std": ("mean", "std")}


class ActionNormalizer:
    """Normalises/unnormalises the first ``arm_dims`` entries of the last axis of an action tensor/array."""

    def __init__(self, mode: str, arm_dims: int, stats: dict[str, torch.Tensor] | None = None) -> None:
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"normalization mode must be one of {NORMALIZATION_MODES}, got {mode!r}")
        stats = {k: torch.as_tensor(v, dtype=torch.float32).flatten() for k, v in (stats or {}).items()}
        missing = [k for k in _REQUIRED[mode] if k not in stats]
        if missing:
            raise ValueError(f"normalization mode {mode!r} needs action statistics {missing}; got {sorted(stats)}")
        for key in _REQUIRED[mode]:
            if stats[key].numel() < arm_dims:
                raise ValueError(f"action statistic {key!r} has {stats[key].numel()} values, need >= {arm_dims}")
            stats[key] = stats[key][:arm_dims]
        self.mode = mode
        self.arm_dims = arm_dims
        self.stats = stats

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def identity(cls, arm_dims: int) -> ActionNormalizer:
        return cls("identity", arm_dims)

    @classmethod
    def from_bounds(cls, low: float | list[float], high: float | list[float], arm_dims: int) -> ActionNormalizer:
        """min_max with fixed bounds, e.g. CALVIN's clip to +-0.65 then rescale to [-1, 1]."""
        low_t = torch.broadcast_to(torch.as_tensor(low, dtype=torch.float32), (arm_dims,)).clone()
        high_t = torch.broadcast_to(torch.as_tensor(high, dtype=torch.float32), (arm_dims,)).clone()
        return cls("min_max", arm_dims, {"min": low_t, "max": high_t})

    @classmethod
    def from_lerobot_stats(
        cls, stats: dict | str | Path, mode: str, arm_dims: int, key: str = "action"
    ) -> ActionNormalizer:
        """From a LeRobot ``meta/stats.json`` (path or parsed dict); uses the ``key`` feature's statistics."""
        if isinstance(stats, str | Path):
            stats = json.loads(Path(stats).read_text())
        if key not in stats:
            raise ValueError(f"the statistics have no {key!r} feature; features: {sorted(stats)}")
        feature = {k: v for k, v in stats[key].items() if k in ("min", "max", "mean", "std", "q01", "q99")}
        return cls(mode, arm_dims, {k: torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in feature.items()})

    # ------------------------------------------------------------------------------------------------------
    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = ("min", "max") if self.mode == "min_max" else ("q01", "q99")
        return self.stats[low], self.stats[high]

    def normalize_arm(self, arm: torch.Tensor) -> torch.Tensor:
        if self.mode == "identity":
            return arm
        if self.mode == "mean_std":
            mean, std = (self.stats[k].to(arm) for k in ("mean", "std"))
            return (arm - mean) / std.clamp_min(_EPS)
        low, high = (t.to(arm) for t in self._bounds())
        clipped = torch.maximum(torch.minimum(arm, high), low)
        return 2 * (clipped - low) / (high - low).clamp_min(_EPS) - 1

    def unnormalize_arm(self, arm: torch.Tensor) -> torch.Tensor:
        if self.mode == "identity":
            return arm
        if self.mode == "mean_std":
            mean, std = (self.stats[k].to(arm) for k in ("mean", "std"))
            return arm * std + mean
        low, high = (t.to(arm) for t in self._bounds())
        return (arm + 1) / 2 * (high - low) + low

    def normalize(self, action: torch.Tensor) -> torch.Tensor:
        """Raw (..., arm_dims + 1) -> normalised arm, gripper unchanged (+-1)."""
        arm = self.normalize_arm(action[..., : self.arm_dims])
        return torch.cat([arm, action[..., self.arm_dims :]], dim=-1)

    def unnormalize(self, action: torch.Tensor) -> torch.Tensor:
        arm = self.unnormalize_arm(action[..., : self.arm_dims])
        return torch.cat([arm, action[..., self.arm_dims :]], dim=-1)

    # ------------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        tensors = {f"action.{k}": v.contiguous() for k, v in self.stats.items()}
        if not tensors:  # safetensors cannot store an empty file meaningfully; keep a marker
            tensors = {"action.none": torch.zeros(0)}
        save_file(
            tensors, str(Path(directory) / STATS_FILE), metadata={"mode": self.mode, "arm_dims": str(self.arm_dims)}
        )

    @classmethod
    def load(cls, directory: str | Path) -> ActionNormalizer:
        from safetensors import safe_open

        path = Path(directory) / STATS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {STATS_FILE} in {directory}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        stats = {k.removeprefix("action."): v for k, v in tensors.items() if k != "action.none"}
        return cls(meta.get("mode", "identity"), int(meta.get("arm_dims", 6)), stats)

    def __repr__(self) -> str:
        return f"ActionNormalizer(mode={self.mode!r}, arm_dims={self.arm_dims}, stats={sorted(self.stats)})"
