"""A preallocated key/value cache for frame-causal attention over an endless stream.

Keys are stored after the rotary embedding, so a cached frame never needs recomputation. Layout per
cache: one tensor ``(layers, 2, batch, heads, capacity_frames * tokens_per_frame, head_dim)``.

Slots are always used as a contiguous prefix so attention reads one view, no gather and no concatenation:

* without a window the prefix holds every frame seen, and the buffer grows by doubling (amortised O(1)
  copying instead of the authors' whole-cache concatenation every step);
* with ``window=W, sink=S`` the first ``S`` frames of the stream stay resident ("attention sinks"),
  the other ``W - S`` slots form a ring of the most recent frames, and the frames of the step being
  computed sit in scratch slots right after the resident ones. Order inside the cache does not matter:
  attention over cached keys is permutation invariant and time lives in the (already applied) RoPE,
  computed from the absolute frame index.

The cache is created empty, knowing only its policy (window, sink, storage dtype); the model's forward gives
it the frame layout and the buffer is allocated at the first keys written. What the forward calls on its
``past_key_values`` is :class:`StepCache`; the ONNX export passes its own object with the same calls.
"""

from __future__ import annotations

from typing import Protocol

import torch


class StepCache(Protocol):
    """The calls ``OmniStreamModel.forward`` makes on ``past_key_values`` for one step of ``num_frames`` frames."""

    num_cached: int

    def begin_step(self, num_frames: int, tokens_per_frame: int, num_layers: int) -> None: ...

    def step_mask(self, device: torch.device) -> torch.Tensor | None: ...

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def end_step(self) -> None: ...


class KVCache:
    """Keys/values of the frames of one stream (a batch of streams advancing together), bounded or not.

    ``dtype`` is the storage dtype (e.g. bfloat16 beside a float32 model); None stores what the model computes.
    """

    def __init__(
        self,
        *,
        window: int | None = None,
        sink: int = 1,
        dtype: torch.dtype | None = None,
        initial_frames: int = 16,
    ) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 frame or None, got {window}")
        if window is not None and not 0 <= sink <= window:
            raise ValueError(f"sink must be in [0, window={window}], got {sink}")
        self.window = window
        self.sink = sink if window is not None else 0
        self.dtype = dtype
        self.tokens_per_frame: int | None = None  # set by the first step
        self.num_layers: int | None = None
        self._initial_frames = initial_frames if window is None else window + 1
        self.buffer: torch.Tensor | None = None
        self.num_cached = 0  # frames resident in the cache
        self._full = False  # window reached: recent frames live in the ring
        self._ring_pos = 0
        self._step_start = 0
        self._step_frames = 0

    # -- bookkeeping ----------------------------------------------------------------------------------
    @property
    def capacity_frames(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[4] // self.tokens_per_frame

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def _ensure_capacity(self, frames: int, like: torch.Tensor) -> None:
        """Room for ``frames`` frames of keys shaped like ``like`` (batch, heads, tokens, head_dim)."""
        batch, heads, _, head_dim = like.shape
        if self.buffer is not None:
            held = (self.buffer.shape[2], self.buffer.shape[3], self.buffer.shape[5])
            if held != (batch, heads, head_dim):
                raise ValueError(f"this cache holds (batch, heads, head_dim) = {held}, got {(batch, heads, head_dim)}")
        if frames <= self.capacity_frames:
            return
        if self.window is None:
            frames = max(frames, 2 * self.capacity_frames, self._initial_frames)
        else:
            frames = max(frames, self._initial_frames)
        new = torch.empty(
            self.num_layers,
            2,
            batch,
            heads,
            frames * self.tokens_per_frame,
            head_dim,
            dtype=self.dtype or like.dtype,
            device=like.device,
        )
        if self.buffer is not None and self.num_cached:
            used = self.num_cached * self.tokens_per_frame
            new[..., :used, :].copy_(self.buffer[..., :used, :])
        self.buffer = new

    # -- one step -------------------------------------------------------------------------------------
    def begin_step(self, num_frames: int, tokens_per_frame: int, num_layers: int) -> None:
        """Reserves scratch slots for the ``num_frames`` frames about to be computed."""
        if self.num_cached and (tokens_per_frame, num_layers) != (self.tokens_per_frame, self.num_layers):
            raise ValueError(
                f"this cache holds frames of {self.tokens_per_frame} tokens in {self.num_layers} layers, got"
                f" {tokens_per_frame} tokens in {num_layers}: a new resolution or model needs a new cache"
            )
        self.tokens_per_frame, self.num_layers = tokens_per_frame, num_layers
        self._step_start = self.num_cached
        self._step_frames = num_frames

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this step's keys/values of one layer; returns the keys/values to attend over."""
        assert self.tokens_per_frame is not None, "begin_step() first"
        n = self.tokens_per_frame
        start, stop = self._step_start * n, (self._step_start + self._step_frames) * n
        if layer == 0:  # the first layer of a step allocates or grows the buffer, once for all layers
            self._ensure_capacity(self._step_start + self._step_frames, k)
        self.buffer[layer, 0, :, :, start:stop] = k
        self.buffer[layer, 1, :, :, start:stop] = v
        keys = self.buffer[layer, 0, :, :, :stop]
        values = self.buffer[layer, 1, :, :, :stop]
        if keys.dtype != k.dtype:
            keys, values = keys.to(k.dtype), values.to(k.dtype)
        return keys, values

    def end_step(self) -> None:
        """Commits the step's frames: keep all, or keep sinks + the most recent ones."""
        total = self._step_start + self._step_frames
        if self.window is None or total <= self.window:
            self.num_cached = total
            return
        recent = self.window - self.sink
        if not self._full:
            # Prefix still in temporal order: keep the first `sink` frames and the latest `recent`.
            self._move_frames(range(total - recent, total), range(self.sink, self.window))
            self._full, self._ring_pos = True, 0
        elif recent > 0:
            # Ring mode: this step's frames sit in scratch slots after the window; the newest replace the oldest.
            kept = range(max(self._step_start, total - recent), total)
            targets = []
            for _ in kept:
                targets.append(self.sink + self._ring_pos)
                self._ring_pos = (self._ring_pos + 1) % recent
            self._move_frames(kept, targets)
        self.num_cached = self.window

    def _move_frames(self, sources, targets) -> None:
        n = self.tokens_per_frame
        sources, targets = list(sources), list(targets)
        if not sources:
            return
        assert self.buffer is not None
        if sources == list(range(sources[0], sources[0] + len(sources))) and targets == list(
            range(targets[0], targets[0] + len(targets))
        ):
            src = self.buffer[..., sources[0] * n : (sources[-1] + 1) * n, :].clone()
            self.buffer[..., targets[0] * n : (targets[-1] + 1) * n, :] = src
            return
        for s, t in zip(sources, targets, strict=True):
            self.buffer[..., t * n : (t + 1) * n, :] = self.buffer[..., s * n : (s + 1) * n, :]

    def step_mask(self, device: torch.device) -> torch.Tensor | None:
        """Boolean mask (q, k) for a multi-frame step: cached frames are visible, scratch frames causally.

        ``None`` for a single frame: it sees everything, so no mask is built at all.
        """
        if self._step_frames == 1:
            return None
        n = self.tokens_per_frame
        q_frame = torch.arange(self._step_frames, device=device).repeat_interleave(n)
        k_frame = torch.arange(self._step_start + self._step_frames, device=device) - self._step_start
        k_frame = k_frame.repeat_interleave(n)  # negative for cached frames -> always visible
        return q_frame[:, None] >= k_frame[None, :]
