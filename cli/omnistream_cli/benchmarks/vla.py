"""`omnistream bench vla`: latency of the VLA policy per control step, the full pass beside the prefix reuse.

Measured on random weights of each preset's real shapes (no download) or on a policy directory. Two ways to act
are timed in alternating rounds (the median over rounds is reported, so a busy machine slows both alike):

* ``full``: the whole prompt through the LLM at every prediction (``policy.use_prefix_cache = False``);
* ``reuse``: the default, the K/V of the prompt text before the images computed once per instruction and
  reused (``use_prefix_cache = True``; with ``instruction_first`` the instruction is part of that prefix).

Per way: ``chunk_ms`` (one chunk prediction from features: projector, Qwen2, action head; the control step that
runs the LLM), ``step_ms_amortised`` (``select_action`` over whole chunks) and ``step_ms_max``; ``speedup`` is
full / reuse. Also: ``new_instruction_ms`` (the first prediction after an instruction changes: its prefix K/V
are computed then), ``max_abs_diff`` (largest difference of the two ways' actions over the timed
observations), ``tokenize_ms`` / ``tokenize_cached_ms`` (prompt ids of a new vs a repeated instruction) and,
with ``--images``, ``backbone_ms`` (one frame through the frozen backbone, inside every step).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from omnistream_cli.errors import user_errors

from .report import device_label, write_json_report

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The policy `make demo` trains (training.vla's "demo" preset: the debug LLM, 128 px frames unpooled, visual
# positions, the instruction first, the robot state as a token), rebuilt here so it can be timed without a checkpoint.
DEMO_POLICY = dict(
    image_size=128,
    pool=1,
    visual_positions=True,
    instruction_first=True,
    cameras=("static",),
    state_names=("tcp_x", "tcp_y", "tcp_z", "gripper_opening", "gripper_action"),
)
WAYS = ("full", "reuse")  # use_prefix_cache False / True
CALLS_PER_ROUND = 10  # predictions timed per way and round (their median is the round's figure)
OBSERVATIONS = 8  # distinct observations cycled through, as a stream of frames would be


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(device: torch.device, fn, *args) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(*args)
    _sync(device)
    return (time.perf_counter() - start) * 1000.0


def _median_ms(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(_timed_ms(device, fn) for _ in range(repeats))


def build_bench_policy(preset: str, checkpoint: str | None, device: torch.device, dtype: str, images: bool):
    """A policy to time: the checkpoint, or the preset with random weights (LLM and backbone of the real shapes)."""
    from omnistream_perception.model import OmniStreamModel
    from omnistream_vla.policy import OmniStreamVLAConfig, OmniStreamVLAPolicy
    from omnistream_vla.policy.modeling_omnistream_vla import build_llm

    if checkpoint:
        policy = OmniStreamVLAPolicy.from_pretrained(checkpoint, device=device)
        if images:
            policy._ensure_backbone()
        return policy.eval()
    torch.manual_seed(0)
    if preset == "demo":
        config = OmniStreamVLAConfig.preset("debug", backbone=None, llm_dtype=dtype, **DEMO_POLICY)
    else:
        config = OmniStreamVLAConfig.preset(preset, backbone=None, llm_dtype=dtype)
    if preset not in ("debug", "demo"):
        config.vision_hidden_size = 1024  # the published ViT-L backbone
    backbone = None
    if images:
        backbone_preset = "debug" if preset in ("debug", "demo") else "large"
        backbone = OmniStreamModel.from_preset(backbone_preset)
    policy = OmniStreamVLAPolicy(config, llm=build_llm(config, random_weights=True), backbone=backbone)
    return policy.to(device).eval()


def _observations(policy, images: bool, count: int) -> list[dict]:
    """``count`` observations of one instruction with different frames (and states)."""
    config = policy.config
    device = policy.action_query.device
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        if images:
            frame = torch.rand(1, 3, config.image_size, config.image_size, generator=generator).to(device)
            obs = {f"observation.images.{cam}": frame for cam in config.cameras}
        else:
            shape = (1, config.tokens_per_camera, config.vision_hidden_size)
            obs = {f"observation.features.{cam}": torch.randn(shape, generator=generator).to(device)
                   for cam in config.cameras}  # fmt: skip
        obs["task"] = ["pick up the red block and place it in the drawer"]
        if config.state_names:
            obs["observation.state"] = torch.randn(1, len(config.state_names), generator=generator).to(device)
        out.append(obs)
    return out


def _use(policy, way: str) -> None:
    policy.use_prefix_cache = way == "reuse"


def benchmark_vla(policy, repeats: int = 5, chunks: int = 3, images: bool = False) -> dict:
    """The two ways side by side; ``repeats`` alternating rounds."""
    device = policy.action_query.device
    config = policy.config
    observations = _observations(policy, images, OBSERVATIONS)
    processor = policy.processor
    counter = iter(range(10**9))
    tokenize_ms = _median_ms(lambda: processor.encode_instruction(f"open the drawer {next(counter)}"), device, repeats)
    tokenize_cached_ms = _median_ms(lambda: processor.encode_instruction("open the drawer"), device, repeats)
    chunk_ms: dict[str, list[float]] = {way: [] for way in WAYS}
    step_mean: dict[str, list[float]] = {way: [] for way in WAYS}
    step_max: dict[str, list[float]] = {way: [] for way in WAYS}
    new_instruction_ms = []
    max_abs_diff = 0.0
    for way in WAYS:  # warm-up (first calls allocate; the reuse way builds its prefix K/V)
        _use(policy, way)
        policy.predict_action_chunk(observations[0])
    calls = iter(range(10**9))
    for _ in range(repeats):
        for way in WAYS:
            _use(policy, way)
            times = [
                _timed_ms(device, policy.predict_action_chunk, observations[next(calls) % OBSERVATIONS])
                for _ in range(CALLS_PER_ROUND)
            ]
            chunk_ms[way].append(statistics.median(times))
            policy.reset()
            steps = []
            for i in range(chunks * config.actions_per_chunk):
                steps.append(_timed_ms(device, policy.select_action, observations[i % OBSERVATIONS]))
            policy.reset()
            step_mean[way].append(sum(steps) / len(steps))
            step_max[way].append(max(steps))
        # The first prediction after a new instruction (the reuse way computes that instruction's prefix then).
        _use(policy, "reuse")
        fresh = dict(observations[0], task=[f"open the drawer {next(counter)}"])
        new_instruction_ms.append(_timed_ms(device, policy.predict_action_chunk, fresh))
    for obs in observations:
        _use(policy, "full")
        full = policy.predict_action_chunk(obs)
        _use(policy, "reuse")
        max_abs_diff = max(max_abs_diff, float((policy.predict_action_chunk(obs) - full).abs().max()))
    backbone_ms = None
    if images:
        frame = observations[0][f"observation.images.{config.cameras[0]}"]
        backbone_ms = _median_ms(lambda: policy.encode_images(frame), device, repeats)
    prompt = processor.encode_instruction(observations[0]["task"][0])
    visual = config.tokens_per_camera * len(config.cameras)
    sequence = len(prompt.prefix) + len(prompt.suffix) + len(config.cameras) - 1 + int(bool(config.state_names))
    sequence += visual + 1
    reused = len(prompt.prefix) + (len(prompt.suffix) if config.instruction_first else 0)

    def med(values: list[float], digits: int = 3) -> float:
        return round(statistics.median(values), digits)

    result = {
        "llm_layers": policy.llm.config.num_hidden_layers,
        "llm_hidden": policy.llm.config.hidden_size,
        "llm_params_m": round(sum(p.numel() for p in policy.llm.parameters()) / 1e6, 2),
        "instruction_first": bool(config.instruction_first),
        "sequence_tokens": sequence,
        "visual_tokens": visual,
        "prefix_tokens": len(prompt.prefix),
        "reused_tokens": reused,
        "step_tokens": sequence - reused,
        "chunk_size": config.chunk_size,
        "actions_per_chunk": config.actions_per_chunk,
        "rounds": repeats,
        "tokenize_ms": round(tokenize_ms, 3),
        "tokenize_cached_ms": round(tokenize_cached_ms, 4),
        "backbone_ms": None if backbone_ms is None else round(backbone_ms, 3),
        "new_instruction_ms": med(new_instruction_ms),
        "max_abs_diff": max_abs_diff,
    }
    for way in WAYS:
        result[way] = {
            "chunk_ms": med(chunk_ms[way]),
            "step_ms_amortised": med(step_mean[way]),
            "step_ms_max": med(step_max[way]),
            "max_control_rate_hz": round(1000.0 / statistics.median(step_mean[way]), 1),
        }
    result["speedup"] = {
        "chunk": round(statistics.median(f / r for f, r in zip(chunk_ms["full"], chunk_ms["reuse"])), 2),
        "step_amortised": round(statistics.median(f / r for f, r in zip(step_mean["full"], step_mean["reuse"])), 2),
    }
    _use(policy, "reuse")
    return result


def run_vla_benchmark(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from omnistream_cli.errors import UserError

    if args.repeats < 1 or args.chunks < 1:
        raise UserError("--repeats and --chunks must be >= 1")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        raise UserError(f"--checkpoint {args.checkpoint}: no such policy directory")
    labels = [args.checkpoint] if args.checkpoint else [p.strip() for p in args.preset.split(",") if p.strip()]
    if not labels:
        raise UserError("--preset names no preset")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    console = Console()
    console.print(f"[bold]bench vla[/] device={device} dtype={args.dtype} threads={torch.get_num_threads()}")
    results = {}
    for label in labels:
        with user_errors(ValueError), console.status(f"building the {label} policy"):
            policy = build_bench_policy(label, args.checkpoint, device, args.dtype, args.images)
        with console.status(f"timing {label} ({args.repeats} rounds, full and reuse alternating)"):
            results[label] = benchmark_vla(policy, repeats=args.repeats, chunks=args.chunks, images=args.images)
        del policy
    table = Table(title=f"VLA control step, ms ({device_label(device)}, {args.dtype}; median of {args.repeats} rounds)")
    for column in ("policy", "measure", "full prompt", "prefix reused", "speed-up"):
        table.add_column(column, justify="left" if column in ("policy", "measure") else "right")
    for label, r in results.items():
        table.add_row(label, "chunk (runs the LLM)", str(r["full"]["chunk_ms"]), str(r["reuse"]["chunk_ms"]),
                      f"{r['speedup']['chunk']:.2f}x")  # fmt: skip
        table.add_row("", "step, amortised", str(r["full"]["step_ms_amortised"]),
                      str(r["reuse"]["step_ms_amortised"]), f"{r['speedup']['step_amortised']:.2f}x")  # fmt: skip
        table.add_row("", "step, worst", str(r["full"]["step_ms_max"]), str(r["reuse"]["step_ms_max"]), "")
        table.add_row("", "LLM tokens per chunk", str(r["sequence_tokens"]), str(r["step_tokens"]), "")
        table.add_row("", "new instruction (first chunk)", "", str(r["new_instruction_ms"]), "", end_section=True)
    console.print(table)
    for label, r in results.items():
        extra = f", backbone {r['backbone_ms']} ms" if r["backbone_ms"] is not None else ""
        console.print(
            f"{label}: {r['llm_layers']} layers x {r['llm_hidden']}, instruction_first={r['instruction_first']}, "
            f"largest action difference {r['max_abs_diff']:.1e}, tokenize {r['tokenize_ms']} ms "
            f"(cached {r['tokenize_cached_ms']} ms){extra}"
        )
    report = {
        "device": device_label(device),
        "dtype": args.dtype,
        "images": bool(args.images),
        "threads": torch.get_num_threads(),
        "results": results,
    }
    write_json_report(report, args.json_path, console)
    return 0
