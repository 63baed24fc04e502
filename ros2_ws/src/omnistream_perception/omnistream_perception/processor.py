"""Image preprocessing for the backbone: uint8 RGB -> resized, ImageNet-normalised float tensors.

The resize the published processor applies is unknown (training used 512x512); ours keeps the aspect ratio
and rounds both sides down to a multiple of ``multiple`` (the patch size, or patch x pooling so a pooled
feature grid is exact), after optionally limiting the longer side to ``max_side``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .model.modeling_omnistream import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class OmniStreamImageProcessor:
    max_side: int | None = None
    multiple: int = 16

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Output (H, W): aspect kept, longer side <= max_side, both multiples of ``multiple`` (>= one multiple)."""
        scale = 1.0
        if self.max_side is not None and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
        m = self.multiple
        h = max(m, int(round(height * scale)) // m * m)
        w = max(m, int(round(width * scale)) // m * m)
        return h, w

    def __call__(
        self, rgb: np.ndarray | torch.Tensor, device: str | torch.device = "cpu", dtype=torch.float32
    ) -> torch.Tensor:
        """One HxWx3 uint8 RGB image (or a batch NxHxWx3) -> (N, 3, H', W') normalised, on ``device``."""
        image = rgb
        if isinstance(rgb, np.ndarray):  # a read-only array (e.g. a ROS message buffer) is copied, not aliased
            image = torch.as_tensor(np.ascontiguousarray(rgb) if rgb.flags.writeable else np.array(rgb))
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[-1] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"expected an HxWx3 RGB image (or NxHxWx3), got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            raise ValueError(f"expected uint8 RGB pixels, got {image.dtype}")
        x = image.to(device).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        size = self.target_size(x.shape[-2], x.shape[-1])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(dtype)


def pool_patch_tokens(patch_tokens: torch.Tensor, grid: tuple[int, int], factor: int = 2) -> torch.Tensor:
    """(..., h*w, D) -> (..., h/f, w/f, D): per-frame f x f average pooling, as the paper feeds the LLM.

    A grid not divisible by ``factor`` gets ceil(h/f) x ceil(w/f) cells, the edge cells averaging the tokens
    they cover (the processor's ``multiple`` avoids that case for our own images).
    """
    h, w = grid
    if factor < 1:
        raise ValueError(f"the pooling factor must be >= 1, got {factor}")
    lead = patch_tokens.shape[:-2]
    d = patch_tokens.shape[-1]
    x = patch_tokens.reshape(-1, h, w, d).permute(0, 3, 1, 2)
    if factor > 1:
        x = F.avg_pool2d(x, factor, ceil_mode=True)
    return x.permute(0, 2, 3, 1).reshape(*lead, x.shape[-2], x.shape[-1], d)
