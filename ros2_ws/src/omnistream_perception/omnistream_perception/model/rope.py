"""The 3D rotary position embedding of the published OmniStream backbone, reproduced exactly.

Layout for head dim ``d`` (see the checkpoint spec): four blocks of ``d/4`` angles ``[Y | Y | X | X]``
(frequencies 0..d/4-1 in each block), then every index ``i`` with ``i % 4 == 3`` is overwritten by the
time angle of frequency ``(i // 4) % (d / 8)``. This differs from DINOv3's ``[Y, X, Y, X]``; the released
weights were trained with this one, quirks included.

Only patch tokens are rotated. To keep one code path for all tokens of a frame, special tokens (CLS,
camera, registers) get ``cos = 1, sin = 0``, which leaves them bit-for-bit unchanged.
"""

from __future__ import annotations

import math

import torch


def rope_periods(head_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """``period[j] = base ** (4 j / head_dim)`` for ``j = 0 .. head_dim/4 - 1`` (float32)."""
    j = torch.arange(head_dim // 4, dtype=torch.float32, device=device)
    return base ** (4.0 * j / head_dim)


def rope_angles(
    frame_indices: torch.Tensor,
    grid_h: int,
    grid_w: int,
    head_dim: int,
    base: float,
    total_length: float,
    coord_scale: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Angles (T, h*w, head_dim) in float32 for the patches of the given absolute frame indices.

    ``coord_scale = (time_factor, space_factor)`` is the training-time jitter of the coordinates (the
    paper's RoPE rescaling); inference passes ``None``.
    """
    device = frame_indices.device
    periods = rope_periods(head_dim, base, device)
    quarter, eighth = head_dim // 4, head_dim // 8

    t = frame_indices.to(torch.float32) / total_length
    y = 2.0 * (torch.arange(grid_h, dtype=torch.float32, device=device) + 0.5) / grid_h - 1.0
    x = 2.0 * (torch.arange(grid_w, dtype=torch.float32, device=device) + 0.5) / grid_w - 1.0
    if coord_scale is not None:
        t = t * coord_scale[0]
        y = y * coord_scale[1]
        x = x * coord_scale[1]

    ang_y = 2 * math.pi * y[:, None] / periods[None, :]  # (h, d/4)
    ang_x = 2 * math.pi * x[:, None] / periods[None, :]  # (w, d/4)
    ang_t = 2 * math.pi * t[:, None] / periods[None, :eighth]  # (T, d/8)

    num_frames = t.shape[0]
    ay = ang_y[:, None, :].expand(grid_h, grid_w, quarter)
    ax = ang_x[None, :, :].expand(grid_h, grid_w, quarter)
    spatial = torch.cat([ay, ay, ax, ax], dim=-1).reshape(1, grid_h * grid_w, head_dim)
    angles = spatial.expand(num_frames, -1, -1).clone()

    time_slots = torch.arange(3, head_dim, 4, device=device)  # indices i with i % 4 == 3
    time_freq = (time_slots // 4) % eighth
    angles[:, :, time_slots] = ang_t[:, None, time_freq]
    return angles


def rope_cos_sin(
    frame_indices: torch.Tensor,
    grid_h: int,
    grid_w: int,
    num_special: int,
    head_dim: int,
    base: float,
    total_length: float,
    coord_scale: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T * tokens_per_frame, head_dim) in float32 covering every token of the frames.

    Special tokens get cos 1 / sin 0 so one elementwise rotation serves the whole sequence. Computed
    once per forward/step and shared by all layers.
    """
    angles = rope_angles(frame_indices, grid_h, grid_w, head_dim, base, total_length, coord_scale)
    num_frames = angles.shape[0]
    cos = torch.ones(num_frames, num_special + grid_h * grid_w, head_dim, device=angles.device)
    sin = torch.zeros_like(cos)
    cos[:, num_special:] = angles.cos()
    sin[:, num_special:] = angles.sin()
    return cos.reshape(-1, head_dim), sin.reshape(-1, head_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` (..., L, head_dim) with tables (L, head_dim); the math runs in float32."""
    if x.dtype == torch.float32:
        return x * cos + rotate_half(x) * sin
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
