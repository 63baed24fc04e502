"""Views and masks for the SSL objective, driven by an explicit ``torch.Generator`` (exact resume).

* ``random_resized_crop``: one crop box per clip, shared by all its frames (a clip stays a coherent
  stream), resized with antialiasing, optional horizontal flip and brightness/contrast jitter.
* ``random_patch_masks``: images, DINOv2/iBOT style (a random subset of patches per view).
* ``multiblock_masks``: videos, V-JEPA's multi-block protocol (a few rectangles of the patch grid, the
  same in every frame, so a masked region cannot be copied from the neighbouring frame).
* ``random_shift``: VLA finetuning (the VLM4VLA recipe's random shift): each image moved by a whole number of
  pixels, the uncovered border filled with the edge pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def random_resized_crop(
    clips: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    gen: torch.Generator,
    flip: bool = True,
    jitter: float = 0.2,
) -> torch.Tensor:
    """clips (B, T, 3, H, W) in [0, 1] -> (B, T, 3, size, size) in [0, 1]."""
    b, t, c, h, w = clips.shape
    out = []
    for i in range(b):
        area = _uniform(gen, *scale) * h * w
        ratio = math.exp(_uniform(gen, math.log(3 / 4), math.log(4 / 3)))
        ch = min(h, max(1, round(math.sqrt(area / ratio))))
        cw = min(w, max(1, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
        crop = clips[i, :, :, top : top + ch, left : left + cw]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if flip and torch.rand((), generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        if jitter > 0:
            brightness = _uniform(gen, 1 - jitter, 1 + jitter)
            contrast = _uniform(gen, 1 - jitter, 1 + jitter)
            mean = crop.mean(dim=(-3, -2, -1), keepdim=True)
            crop = ((crop - mean) * contrast + mean) * brightness
        out.append(crop.clamp(0, 1))
    return torch.stack(out)


def random_patch_masks(
    batch: int, grid: tuple[int, int], gen: torch.Generator, ratio: tuple[float, float] = (0.1, 0.5), prob: float = 0.5
) -> torch.Tensor:
    """(B, h, w) bool; each view is masked with probability ``prob`` at a ratio drawn from ``ratio``."""
    h, w = grid
    masks = torch.zeros(batch, h * w, dtype=torch.bool)
    for i in range(batch):
        if torch.rand((), generator=gen).item() >= prob:
            continue
        count = max(1, round(_uniform(gen, *ratio) * h * w))
        count = min(count, h * w - 1) if h * w > 1 else 0  # never mask the whole view
        masks[i, torch.randperm(h * w, generator=gen)[:count]] = True
    return masks.reshape(batch, h, w)


def multiblock_masks(
    batch: int,
    frames: int,
    grid: tuple[int, int],
    gen: torch.Generator,
    blocks: int = 4,
    block_scale: tuple[float, float] = (0.1, 0.25),
    max_ratio: float = 0.75,
) -> torch.Tensor:
    """(B, T, h, w) bool: the union of ``blocks`` rectangles per clip, repeated over its frames."""
    h, w = grid
    masks = torch.zeros(batch, h, w, dtype=torch.bool)
    for i in range(batch):
        for _ in range(blocks):
            area = _uniform(gen, *block_scale) * h * w
            aspect = math.exp(_uniform(gen, math.log(0.5), math.log(2.0)))
            bh = min(h, max(1, round(math.sqrt(area * aspect))))
            bw = min(w, max(1, round(math.sqrt(area / aspect))))
            top = int(torch.randint(0, h - bh + 1, (), generator=gen))
            left = int(torch.randint(0, w - bw + 1, (), generator=gen))
            candidate = masks[i].clone()
            candidate[top : top + bh, left : left + bw] = True
            if candidate.float().mean() <= max_ratio:
                masks[i] = candidate
    return masks[:, None].expand(batch, frames, h, w).contiguous()


def rope_coordinate_scale(gen: torch.Generator) -> tuple[float, float]:
    """RoPE coordinate rescaling for training: (exp(U(-ln2, ln2)), exp(U(-ln2, ln2))) for (time, space)."""
    return (math.exp(_uniform(gen, -math.log(2), math.log(2))), math.exp(_uniform(gen, -math.log(2), math.log(2))))


def random_shift(images: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): image i moved by (dy, dx), each drawn uniformly from the integers in
    [-pad, pad] (independently per image and axis); pixels moved in from outside repeat the nearest edge pixel
    (replicate padding by ``pad``, then a crop of the original size at the drawn offset). ``pad`` 0 = unchanged.

    The recipe applies it to the resized (224 px) frames, pad 10 for the static camera and 4 for the gripper
    camera (VLM4VLA public code, CALVIN config); normalisation before or after does not matter (it is per
    channel, and the shift only copies pixels)."""
    if pad < 0:
        raise ValueError(f"random shift pad must be >= 0, got {pad}")
    if pad == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, top : top + h, left : left + w] for i, (top, left) in enumerate(offsets)])
