"""`omnistream bench stream`: the T-th frame's latency and peak memory, streaming vs recomputing (Table 9).

For each context length T, the streaming side steps one frame over a KV cache of T-1 frames; the
baseline recomputes the frame-causal pass over all T frames. Both run in the same process on the same
random frames, so the ratio is like for like. Memory counts the weights, the cache and activations.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from .bench_report import device_label, write_json_report
from .memory import measure_peak, resident_bytes
from .model import OmniStreamModel
from .model.streaming import as_dtype

PAPER_H800 = {  # paper Table 9, ViT-L/16 at 224, one H800: T -> (stream s, recompute s)
    16: (0.042, 0.125),
    32: (0.057, 0.329),
    64: (0.067, 0.998),
    128: (0.115, None),
    256: (0.216, None),
    512: (0.414, None),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), result


def _prefill(stream, frames: torch.Tensor, upto: int, chunk: int = 16) -> None:
    """Feeds frames [frames_seen, upto) in chunks (fast) so the next step is frame `upto`."""
    n = frames.shape[1]
    while stream.frames_seen < upto:
        k = min(chunk, upto - stream.frames_seen)
        idx = [(stream.frames_seen + i) % n for i in range(k)]
        stream.step(frames[:, idx])


def benchmark_stream(
    model: OmniStreamModel,
    frame_counts: list[int],
    resolution: int,
    *,
    window: int | None = None,
    sink: int = 1,
    cache_dtype=None,
    repeats: int = 5,
    recompute: bool = True,
    progress=None,
) -> list[dict]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.manual_seed(0)
    clip = torch.randn(1, min(max(frame_counts), 64), 3, resolution, resolution, device=device, dtype=dtype)
    results = []
    stream = model.stream(window=window, sink=sink, cache_dtype=cache_dtype)
    for t in sorted(frame_counts):
        _prefill(stream, clip, t - 1)
        frame = clip[:, (t - 1) % clip.shape[1]]
        # Every repeat steps the same T-th frame over the same cache: restore it (untimed) before each one.
        saved = copy.deepcopy(stream.cache) if stream.cache is not None else None
        saved_seen, saved_resolution = stream.frames_seen, stream._resolution

        def restore(saved=saved, saved_seen=saved_seen, saved_resolution=saved_resolution):
            stream.cache = copy.deepcopy(saved) if saved is not None else None
            stream.frames_seen, stream._resolution = saved_seen, saved_resolution

        def step(frame=frame):
            t0 = time.perf_counter()
            stream.step(frame)
            _sync(device)
            return (time.perf_counter() - t0) * 1000.0

        times = []
        for i in range(repeats + 1):  # the first is a warm-up
            restore()
            elapsed = step()
            if i:
                times.append(elapsed)
        stream_ms = statistics.median(times)
        restore()
        base = resident_bytes() if device.type == "cpu" else 0
        _, stream_peak = measure_peak(step, device)
        # CPU: resident growth during the step + what was already resident for streaming (weights, cache)
        stream_peak = stream_peak - base + (weights + stream.cache_bytes if device.type == "cpu" else 0)
        row = {
            "frames": t,
            "stream_ms": round(stream_ms, 3),
            "stream_peak_mb": round(stream_peak / 2**20, 1),
            "cached_frames": stream.cached_frames,
        }
        if recompute:
            full = clip[:, [i % clip.shape[1] for i in range(t)]]
            with torch.inference_mode():
                run = lambda full=full: model(full, output_hidden_states=False)  # noqa: E731
                # Long recomputations (seconds each) are timed inside the memory measurement, sampled coarsely
                # so the sampler costs nothing measurable; short ones are timed alone, then measured once more.
                long_run = t > 32
                rep = repeats if not long_run else max(1, min(repeats, 2))
                base = resident_bytes() if device.type == "cpu" else 0
                if long_run:
                    times, recompute_peak = [], 0
                    for _ in range(rep):
                        elapsed, peak = measure_peak(lambda run=run: _timed(run, device, 1)[0], device, interval=0.01)
                        times.append(elapsed)
                        recompute_peak = max(recompute_peak, peak)
                    recompute_ms = statistics.median(times)
                else:
                    recompute_ms, _ = _timed(run, device, rep)
                    _, recompute_peak = measure_peak(run, device)
            recompute_peak = recompute_peak - base + weights
            row.update(
                recompute_ms=round(recompute_ms, 3),
                speedup=round(recompute_ms / stream_ms, 2),
                recompute_peak_mb=round(recompute_peak / 2**20, 1),
            )
        else:
            row.update(recompute_ms=None, speedup=None, recompute_peak_mb=None)
        results.append(row)
        if progress is not None:
            progress(row)
        restore()
    return results


def run_stream_benchmark(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from omnistream_cli.main import UserError

    try:
        frames = sorted({int(f) for f in str(args.frames).split(",") if f.strip()})
    except ValueError as exc:
        raise UserError(f"--frames must be comma-separated integers, got {args.frames!r}") from exc
    if not frames or frames[0] < 1:
        raise UserError("--frames needs positive context lengths, e.g. 16,32,64,128")
    if args.resolution % 16:
        raise UserError(f"--resolution must be a multiple of the patch size 16, got {args.resolution}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = as_dtype(args.dtype)
    if args.checkpoint:
        model = OmniStreamModel.from_pretrained(args.checkpoint, device=device, dtype=dtype)
        preset = str(args.checkpoint)
    else:
        model = OmniStreamModel.from_preset(args.preset).to(device=device, dtype=dtype).eval()
        preset = args.preset
    console = Console()
    console.print(
        f"[bold]bench stream[/] preset={preset} resolution={args.resolution} device={device} dtype={args.dtype} "
        f"window={args.window} sink={args.sink} threads={torch.get_num_threads()}"
    )
    results = benchmark_stream(
        model,
        frames,
        args.resolution,
        window=args.window,
        sink=args.sink,
        cache_dtype=as_dtype(args.cache_dtype),
        repeats=args.repeats,
        recompute=not args.no_recompute,
        progress=lambda row: console.print(f"  T={row['frames']}: stream {row['stream_ms']:.1f} ms", highlight=False),
    )
    table = Table(title=f"T-th frame latency and peak memory ({device}, {preset}, {args.resolution}px)")
    for col in ("T", "cached", "stream ms", "recompute ms", "speedup", "stream MB", "recompute MB"):
        table.add_column(col, justify="right")
    for r in results:
        fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
        table.add_row(
            str(r["frames"]),
            str(r["cached_frames"]),
            fmt(r["stream_ms"]),
            fmt(r["recompute_ms"]),
            fmt(r["speedup"], "{:.1f}x"),
            fmt(r["stream_peak_mb"], "{:.0f}"),
            fmt(r["recompute_peak_mb"], "{:.0f}"),
        )
    console.print(table)
    report = {
        "device": device_label(device),
        "preset": preset,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "window": args.window,
        "sink": args.sink,
        "results": results,
    }
    write_json_report(report, args.json_path, console)
    return 0
