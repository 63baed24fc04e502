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

from omnistream_perception.memory import measure_peak, resident_bytes
from omnistream_perception.model import OmniStreamModel
from omnistream_perception.model.streaming import OmniStreamSession, as_dtype

from .report import device_label, write_json_report

PAPER_H800 = {  # paper Table 9, ViT-L/16 at 224, one H800: T -> (stream s, recompute s)
    16: (0.042, 0.125),
    32: (0.057, 0.329),
    64: (0.067, 0.998),
    128: (0.115, None),
    256: (0.216, None),
    512: (0.414, None),
}


COSINE_FRAMES = 64  # a reduced-precision run is checked against float32 over this many streamed frames


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


def step_gflop(
    config, resolution: int | tuple[int, int], key_frames: int, frames: int = 1, camera_token=False
) -> float:
    """Matmul GFLOP (2 per multiply-add) of a streaming step of ``frames`` frames attending over ``key_frames``
    frames (the cached ones plus the step's own), counted from the config: patch embedding, qkv/proj/FFN
    matmuls and both attention products. Norms, GELU and RoPE are elementwise and left out; a multi-frame
    step counts its full (masked) score matrix, as the fused kernel computes it."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    p, d = config.patch_size, config.hidden_size
    patches = (h // p) * (w // p)
    n = frames * (1 + int(camera_token) + config.num_register_tokens + patches)  # query tokens of the step
    keys = key_frames * n // frames
    if config.ffn_layer == "mlp":
        ffn = 2 * d * config.mlp_hidden_size
    else:  # SwiGLU: hidden rounded up to a multiple of 8, three matrices
        hidden = int(config.mlp_hidden_size * 2 / 3)
        hidden += -hidden % 8
        ffn = 3 * d * hidden
    per_block = 2 * n * (3 * d * d + d * d + ffn) + 2 * 2 * n * keys * d
    embed = 2 * frames * patches * (3 * p * p) * d + (2 * d if camera_token else 0)  # + aspect-ratio embedder
    return (embed + config.depth * per_block) / 1e9


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 3) -> float:
    """Best-of-``repeats`` GFLOP/s of one ``size``^3 matmul in ``dtype`` with the current thread count: the
    machine's practical peak for this dtype, measured in the same process as the model."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):  # the first is a warm-up
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.inference_mode()
def stream_cosine(
    reference: OmniStreamModel,
    model: OmniStreamModel,
    frames: int,
    resolution: int,
    *,
    window: int | None = None,
    sink: int = 1,
    seed: int = 0,
) -> dict:
    """Streams the same ``frames`` random frames through ``reference`` (float32) and ``model`` (a reduced
    precision copy) and returns the lowest per-frame cosine similarity of the patch features and of the CLS
    token, over all frames: the accuracy side of a reduced-precision speed figure."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    ref_stream = OmniStreamSession(reference, window=window, sink=sink)
    low_stream = OmniStreamSession(model, window=window, sink=sink)
    patch_cos, cls_cos = [], []
    for _ in range(frames):
        frame = torch.randn(1, 3, resolution, resolution, generator=generator).to(device)
        ref, low = ref_stream.step(frame), low_stream.step(frame.to(dtype))
        patch_cos.append(
            torch.nn.functional.cosine_similarity(ref.last_hidden_state, low.last_hidden_state.float(), dim=-1).min()
        )
        cls_cos.append(
            torch.nn.functional.cosine_similarity(ref.pooler_output, low.pooler_output.float(), dim=-1).min()
        )
    return {
        "frames": frames,
        "patch_cosine_min": round(float(torch.stack(patch_cos).min()), 6),
        "cls_cosine_min": round(float(torch.stack(cls_cos).min()), 6),
    }


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
    peak_gflops: float | None = None,
) -> list[dict]:
    """One row per context length; with ``peak_gflops`` (see :func:`matmul_peak_gflops`) each row also says
    which fraction of it the step achieves."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.manual_seed(0)
    clip = torch.randn(1, min(max(frame_counts), 64), 3, resolution, resolution, device=device, dtype=dtype)
    results = []
    stream = OmniStreamSession(model, window=window, sink=sink, cache_dtype=cache_dtype)
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
        gflop = step_gflop(model.config, resolution, stream.cached_frames + 1, camera_token=stream.camera_token)
        base = resident_bytes() if device.type == "cpu" else 0
        _, stream_peak = measure_peak(step, device)
        # CPU: resident growth during the step + what was already resident for streaming (weights, cache)
        stream_peak = stream_peak - base + (weights + stream.cache_bytes if device.type == "cpu" else 0)
        row = {
            "frames": t,
            "stream_ms": round(stream_ms, 3),
            "stream_peak_mb": round(stream_peak / 2**20, 1),
            "cached_frames": stream.cached_frames,
            "gflop": round(gflop, 4),
            "gflops": round(gflop / (stream_ms / 1000.0), 1),
        }
        if peak_gflops:
            row["peak_fraction"] = round(row["gflops"] / peak_gflops, 3)
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

    from omnistream_cli.errors import UserError

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
        reference = OmniStreamModel.from_pretrained(args.checkpoint, device=device)
        preset = str(args.checkpoint)
    else:
        reference = OmniStreamModel.from_preset(args.preset).to(device=device).eval()
        preset = args.preset
    model = reference if dtype in (None, torch.float32) else copy.deepcopy(reference).to(dtype=dtype)
    console = Console()
    if not console.is_terminal:  # piped or logged: the whole table, not one folded to 80 columns
        console = Console(width=140)
    console.print(
        f"[bold]bench stream[/] preset={preset} resolution={args.resolution} device={device} dtype={args.dtype} "
        f"window={args.window} sink={args.sink} threads={torch.get_num_threads()}"
    )
    dtype = next(model.parameters()).dtype
    # The peak is probed before and after the runs, the higher one counting: a busy machine lowers both the
    # model's and the probe's figure, and a fraction is only meaningful against what the cores gave right then.
    peak = matmul_peak_gflops(dtype, device)
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
    if getattr(args, "backend", "torch") == "onnxruntime":
        from omnistream_perception.deploy.bench_onnx import add_onnxruntime_timings

        add_onnxruntime_timings(
            model, results, args.resolution, window=args.window, sink=args.sink, repeats=args.repeats, console=console
        )
    peak = max(peak, matmul_peak_gflops(dtype, device))
    cosine = None
    if model is not reference:
        with console.status(f"{COSINE_FRAMES}-frame cosine check against float32"):
            cosine = stream_cosine(reference, model, COSINE_FRAMES, args.resolution, window=args.window, sink=args.sink)
        console.print(
            f"{dtype_name(dtype)} vs float32 over {COSINE_FRAMES} streamed frames: cosine min "
            f"{cosine['patch_cosine_min']:.5f} (patch features), {cosine['cls_cosine_min']:.5f} (CLS)",
            highlight=False,
        )
    for r in results:
        r["peak_fraction"] = round(r["gflops"] / peak, 3)
    console.print(
        f"matmul peak ({dtype_name(dtype)}, 2048^3, {torch.get_num_threads()} threads): {peak:.0f} GFLOP/s",
        highlight=False,
    )
    table = Table(title=f"T-th frame latency and peak memory ({device}, {preset}, {args.resolution}px)")
    columns = ("T", "cached", "stream ms", "GFLOP", "GFLOP/s", "% peak", "recompute ms", "speedup", "stream MB")
    for col in (*columns, "recompute MB"):
        table.add_column(col, justify="right")
    for r in results:
        fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
        table.add_row(
            str(r["frames"]),
            str(r["cached_frames"]),
            fmt(r["stream_ms"]),
            fmt(r["gflop"], "{:.2f}"),
            fmt(r["gflops"], "{:.0f}"),
            fmt(100 * r["peak_fraction"], "{:.0f}%"),
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
        "threads": torch.get_num_threads(),
        "peak_gflops": round(peak, 1),
        "cosine_vs_float32": cosine,
        "results": results,
    }
    write_json_report(report, args.json_path, console)
    return 0
