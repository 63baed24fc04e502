"""A streaming session: frames in one at a time (or in chunks), outputs equal to the full causal pass.

>>> stream = model.stream(batch_size=1, window=None, sink=1)
>>> out = stream.step(frame)          # (B, 3, H, W) one frame, or (B, k, 3, H, W) a chunk of k frames
>>> stream.frames_seen, stream.cached_frames
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .kv_cache import KVCache
from .modeling_omnistream import OmniStreamModel, OmniStreamOutput


class StreamResetWarning(UserWarning):
    """The stream was restarted because its input changed (for example the resolution)."""


_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[value]


class OmniStreamSession:
    """Persistent KV cache over ``batch_size`` streams that advance together.

    ``window=W, sink=S`` bounds memory for endless streams: the cache keeps the first ``S`` frames and the
    ``W - S`` most recent ones, while RoPE time keeps using the absolute frame index (the authors' code
    reuses the physical cache length, which freezes time after the first trim).
    """

    def __init__(
        self,
        model: OmniStreamModel,
        batch_size: int = 1,
        window: int | None = None,
        sink: int = 1,
        camera_token: bool = False,
        cache_dtype: torch.dtype | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if window is not None and (window < 1 or not 0 <= sink <= window):
            raise ValueError(f"need window >= 1 and 0 <= sink <= window, got window={window}, sink={sink}")
        self.model = model
        self.batch_size = batch_size
        self.window = window
        self.sink = sink
        self.camera_token = camera_token
        self.cache_dtype = as_dtype(cache_dtype)
        self.cache: KVCache | None = None
        self.frames_seen = 0
        self._resolution: tuple[int, int] | None = None

    @property
    def cached_frames(self) -> int:
        return 0 if self.cache is None else self.cache.num_cached

    @property
    def cache_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes

    def reset(self) -> None:
        """Forgets every frame: the next one is frame 0 again (first-frame tokens, time 0)."""
        self.cache = None
        self.frames_seen = 0
        self._resolution = None

    @torch.inference_mode()
    def step(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio: float | torch.Tensor | None = None,
        *,
        output_hidden_states: bool | Sequence[int] = False,
    ) -> OmniStreamOutput:
        """Encodes the next frame ``(B, 3, H, W)`` or the next ``k`` frames ``(B, k, 3, H, W)``."""
        model = self.model
        if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        pixel_values = model.check_pixel_values(pixel_values)
        b, k, _, h, w = pixel_values.shape
        if b != self.batch_size:
            raise ValueError(f"this stream was opened with batch_size={self.batch_size}, got a batch of {b}")
        if self._resolution is not None and self._resolution != (h, w):
            warnings.warn(
                f"input resolution changed from {self._resolution[0]}x{self._resolution[1]} to {h}x{w}: "
                "the stream restarts at frame 0",
                StreamResetWarning,
                stacklevel=2,
            )
            self.reset()
        p = model.config.patch_size
        grid = (h // p, w // p)
        device = pixel_values.device
        frames = torch.arange(self.frames_seen, self.frames_seen + k, device=device)
        tokens = model.embed_frames(pixel_values, frames, self.camera_token, aspect_ratio)
        if self.cache is None:
            cfg = model.config
            self.cache = KVCache(
                cfg.depth,
                b,
                cfg.num_attention_heads,
                cfg.head_dim,
                tokens.shape[2],
                window=self.window,
                sink=self.sink,
                dtype=self.cache_dtype or tokens.dtype,
                device=device,
            )
            self._resolution = (h, w)
        cos, sin = model.rope_tables(frames, grid[0], grid[1], self.camera_token)
        self.cache.begin_step(k)
        mask = self.cache.step_mask(device)
        x, hidden = model.run_blocks(tokens, cos, sin, mask, output_hidden_states, self.cache)
        self.cache.end_step()
        self.frames_seen += k
        return model.outputs_from(x, hidden, self.camera_token, grid, frames)
