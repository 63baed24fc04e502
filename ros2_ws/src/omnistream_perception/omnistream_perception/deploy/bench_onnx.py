"""`omnistream bench stream --backend onnxruntime`: the exported step timed beside the torch step.

For each context length T the step of frame T runs over a cache of min(T-1, window) frames, in onnxruntime (a
float32 backbone graph with exactly that many slots, timed through ``OnnxStreamSession`` so the copy of the new
frame's keys/values into its slot counts) and in torch (``OmniStreamSession``, the cache restored before each repeat,
as the torch benchmark does). The two alternate repeat by repeat, so load from other processes hits both alike
and their ratio stays meaningful on a busy machine.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..model.streaming import OmniStreamSession
from .onnx_export import export_stream_step
from .onnx_session import OnnxStreamSession


def _timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def _torch_step_at(model, t: int, resolution: int, window: int | None, sink: int, generator):
    """(restore, step): ``restore()`` puts back the cache torch holds after ``t - 1`` frames, ``step()`` steps frame t."""
    p = next(model.parameters())
    stream = OmniStreamSession(model, window=window, sink=sink)
    # The cache after t-1 frames, reached with as few frames as possible: a full ring needs window + 1.
    prefill = t - 1 if window is None else min(t - 1, window + 1)
    while stream.frames_seen < prefill:
        k = min(16, prefill - stream.frames_seen)
        stream.step(torch.randn(1, k, 3, resolution, resolution, generator=generator).to(p.device, p.dtype))
    saved, frame = stream.cache, torch.randn(1, 3, resolution, resolution, generator=generator).to(p.device, p.dtype)

    def restore() -> None:
        stream.cache, stream.frames_seen = copy.deepcopy(saved), t - 1

    return restore, lambda: stream.step(frame)


def add_onnxruntime_timings(
    model,
    results: list[dict],
    resolution: int,
    *,
    window: int | None,
    sink: int = 1,
    repeats: int = 5,
    threads: int | None = None,
    console=None,
) -> list[dict]:
    """Adds ``onnxruntime_ms``, ``torch_paired_ms`` (torch timed alternately with it) and ``onnxruntime_vs_torch``
    (torch_paired_ms / onnxruntime_ms, > 1: onnxruntime is faster) to each row of ``benchmark_stream``."""
    threads = threads or torch.get_num_threads()
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    sessions: dict[int, OnnxStreamSession] = {}
    with tempfile.TemporaryDirectory(prefix="omnistream_onnx_bench_") as tmp:
        for row in results:
            t = row["frames"]
            slots = max(1, min(t - 1, window) if window is not None else t - 1)
            if slots not in sessions:
                path = Path(tmp) / f"step_w{slots}.onnx"
                export_stream_step(model, path, window=slots, sink=min(sink, slots), resolution=(resolution,) * 2)
                sessions[slots] = OnnxStreamSession(path, threads=threads)
            session = sessions[slots]
            session.reset()
            session._keys[:] = rng.standard_normal(session._keys.shape, dtype=np.float32)
            session._values[:] = rng.standard_normal(session._values.shape, dtype=np.float32)
            session._valid[:] = t > 1
            frame = rng.standard_normal((1, 3, resolution, resolution), dtype=np.float32)
            with torch.inference_mode():
                restore, torch_step = _torch_step_at(model, t, resolution, window, sink, generator)
                ort_times, torch_times = [], []
                for i in range(repeats + 1):  # the first pair is a warm-up
                    session.frames_seen = t - 1
                    ort_ms = _timed_ms(lambda s=session, f=frame: s._step_one(f))
                    restore()
                    torch_ms = _timed_ms(torch_step)
                    if i:
                        ort_times.append(ort_ms)
                        torch_times.append(torch_ms)
            ort_ms, torch_ms = statistics.median(ort_times), statistics.median(torch_times)
            row.update(
                onnxruntime_ms=round(ort_ms, 3),
                torch_paired_ms=round(torch_ms, 3),
                onnxruntime_vs_torch=round(torch_ms / ort_ms, 2),
            )
            if console is not None:
                console.print(
                    f"  T={t}: onnxruntime {ort_ms:.1f} ms vs torch {torch_ms:.1f} ms, alternating "
                    f"(torch/onnxruntime {torch_ms / ort_ms:.2f}x; float32 graph, {threads} threads)",
                    highlight=False,
                )
    return results
