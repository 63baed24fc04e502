"""A streaming session: frames in one at a time (or in chunks), outputs equal to the full causal pass.

>>> stream = OmniStreamSession(model, batch_size=1, window=None, sink=1)
>>> out = stream.step(frame)          # (B, 3, H, W) one frame, or (B, k, 3, H, W) a chunk of k frames
>>> stream.frames_seen, stream.cached_frames

The session holds what a stream has beyond the network: its KV cache, its frame counter and the resolution it
runs at. Each step is one call of the model's forward with ``past_key_values`` and ``frame_offset``.
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


def warn_stream_restart(previous: tuple[int, int], new: tuple[int, int], stacklevel: int = 2) -> None:
    """The :class:`StreamResetWarning` of a stream that ran at ``previous`` (H, W) and gets a frame at ``new``.

    The cache holds the keys of one token grid and RoPE coordinates are relative to the grid, so a new resolution
    starts the stream again at frame 0. Shared by the torch session and the ONNX one. ``stacklevel`` as in
    ``warnings.warn``, seen from the caller: 2 names the line that called the session's step.
    """
    warnings.warn(
        f"input resolution changed from {previous[0]}x{previous[1]} to {new[0]}x{new[1]}: "
        "the stream restarts at frame 0",
        StreamResetWarning,
        stacklevel=stacklevel + 1,
    )


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
        self.reset()

    @property
    def cached_frames(self) -> int:
        return self.cache.num_cached

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    def _new_cache(self) -> KVCache:
        return KVCache(window=self.window, sink=self.sink, dtype=self.cache_dtype)

    def reset(self) -> None:
        """Forgets every frame: the next one is frame 0 again (first-frame tokens, time 0)."""
        self.cache = self._new_cache()
        self.frames_seen = 0
        self._resolution: tuple[int, int] | None = None

    @torch.inference_mode()
    def step(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio: float | torch.Tensor | None = None,
        *,
        output_hidden_states: bool | Sequence[int] = False,
    ) -> OmniStreamOutput:
        """Encodes the next frame ``(B, 3, H, W)`` or the next ``k`` frames ``(B, k, 3, H, W)``.

        A frame at a new resolution restarts the stream (with a :class:`StreamResetWarning`); a frame the model
        refuses raises its ValueError and leaves the stream as it was.
        """
        resolution = None
        if isinstance(pixel_values, torch.Tensor):
            if pixel_values.ndim == 4:
                pixel_values = pixel_values[:, None]
            if pixel_values.ndim == 5 and pixel_values.shape[0] != self.batch_size:
                raise ValueError(
                    f"this stream was opened with batch_size={self.batch_size}, got a batch of {pixel_values.shape[0]}"
                )
            resolution = tuple(pixel_values.shape[-2:])
        restart = self._resolution is not None and resolution != self._resolution
        # A restart gets a fresh cache, committed only once the model has accepted the frame.
        cache, offset = (self._new_cache(), 0) if restart else (self.cache, self.frames_seen)
        out = self.model(
            pixel_values,
            aspect_ratio,
            self.camera_token,
            output_hidden_states=output_hidden_states,
            past_key_values=cache,
            frame_offset=offset,
        )
        if restart:
            warn_stream_restart(self._resolution, resolution, stacklevel=3)  # past the inference_mode wrapper
        self.cache, self._resolution = cache, resolution
        self.frames_seen = offset + out.frame_indices.shape[0]
        return out
