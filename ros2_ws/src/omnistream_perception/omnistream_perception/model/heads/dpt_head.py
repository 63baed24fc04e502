"""A DPT decoder: patch tokens of four backbone layers -> a dense map at the input resolution.

Each layer is projected and resampled to its own scale (x4, x2, x1, x0.5 of the patch grid), then fused
coarse-to-fine with residual convolution units, as in DPT / VGGT. The dual-DPT geometry head uses two of
these: depth + confidence, and the ray map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """Adds the skip connection, refines, then upsamples to the next (finer) level's size."""

    def __init__(self, features: int, has_skip: bool = True) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(features) if has_skip else None
        self.unit = ResidualConvUnit(features)
        self.out = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        if skip is not None and self.skip_unit is not None:
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out(x)


class DPTHead(nn.Module):
    def __init__(self, dim: int, out_dim: int, features: int, channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.projects = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in channels)
        self.resize = nn.ModuleList(
            [
                nn.ConvTranspose2d(channels[0], channels[0], 4, stride=4),
                nn.ConvTranspose2d(channels[1], channels[1], 2, stride=2),
                nn.Identity(),
                nn.Conv2d(channels[3], channels[3], 3, stride=2, padding=1),
            ]
        )
        self.layer_rn = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in channels)
        self.fusion = nn.ModuleList([FusionBlock(features, has_skip=i < 3) for i in range(4)])
        self.head_in = nn.Conv2d(features, features // 2, 3, padding=1)
        self.head_out = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, out_dim, 1)
        )

    def forward(
        self, layer_tokens: list[torch.Tensor], grid: tuple[int, int], image_size: tuple[int, int]
    ) -> torch.Tensor:
        """layer_tokens: 4 x (N, h*w, D) patch tokens -> (N, out_dim, H, W)."""
        h, w = grid
        levels = []
        for i, tokens in enumerate(layer_tokens):
            x = self.norm(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
            levels.append(self.layer_rn[i](self.resize[i](self.projects[i](x))))
        # coarse (index 3) to fine (index 0); the finest result is upsampled x2 once more
        x = self.fusion[3](levels[3], None, levels[2].shape[-2:])
        x = self.fusion[2](x, levels[2], levels[1].shape[-2:])
        x = self.fusion[1](x, levels[1], levels[0].shape[-2:])
        fine = levels[0].shape[-2:]
        x = self.fusion[0](x, levels[0], (fine[0] * 2, fine[1] * 2))
        x = F.interpolate(self.head_in(x), size=image_size, mode="bilinear", align_corners=True)
        return self.head_out(x)
