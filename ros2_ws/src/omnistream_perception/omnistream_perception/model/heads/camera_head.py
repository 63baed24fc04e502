"""The camera head: an MLP on the camera token -> pose encoding (quaternion 4, translation 3, fov 2)."""

from __future__ import annotations

import math

import torch
from torch import nn


class CameraHead(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 9),
        )
        # Start at the identity rotation, zero translation and a 60 degree field of view: a sensible pose
        # before any training, so untrained heads still give finite, well-formed outputs.
        last = self.mlp[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([0, 0, 0, 1, 0, 0, 0, math.pi / 3, math.pi / 3]))

    def forward(self, camera_token: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., 9): the quaternion is normalised, the fov kept in (0, pi)."""
        raw = self.mlp(camera_token)
        quat = nn.functional.normalize(raw[..., :4], dim=-1)
        fov = raw[..., 7:9].clamp(1e-3, math.pi - 1e-3)
        return torch.cat([quat, raw[..., 4:7], fov], -1)
