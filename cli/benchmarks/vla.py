"""`omnistream bench vla`: latency of the VLA policy per control step, per LLM forward, amortised over a chunk.

Measured on random weights of the preset's real shapes (no download) or on a policy directory:
* ``tokenize_ms`` / ``tokenize_cached_ms``: prompt ids of a new instruction vs a repeated one (cached);
* ``llm_forward_ms``: one chunk prediction from features (projector + Qwen2 + action head);
* ``llm_forward_prefix_cached_ms``: the same with the system prefix's K/V reused (``use_prefix_cache``);
* ``backbone_ms`` (``--images``): one frame through the frozen backbone (the in-process simulator path);
* ``step_ms_amortised``: mean time of ``select_action`` over whole chunks (one LLM forward per chunk);
* ``step_ms_max``: the worst control step (the one that runs the LLM).
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


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


def benchmark_vla(policy, repeats: int = 5, chunks: int = 3, images: bool = False) -> dict:
    device = policy.action_query.device
    config = policy.config
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, config.tokens_per_camera, config.vision_hidden_size, generator=generator)
    observation = {f"observation.features.{cam}": features.to(device) for cam in config.cameras}
    observation["task"] = ["pick up the red block and place it in the drawer"]
    if config.state_names:
        observation["observation.state"] = torch.randn(1, len(config.state_names), generator=generator).to(device)
    processor = policy.processor
    counter = iter(range(10**9))
    tokenize_ms = _median_ms(lambda: processor.encode_instruction(f"open the drawer {next(counter)}"), device, repeats)
    tokenize_cached_ms = _median_ms(lambda: processor.encode_instruction("open the drawer"), device, repeats)
    with torch.inference_mode():
        llm_ms = _median_ms(lambda: policy.predict_action_chunk(observation), device, repeats)
        policy.use_prefix_cache = True  # the system prefix's K/V reused across steps
        llm_prefix_ms = _median_ms(lambda: policy.predict_action_chunk(observation), device, repeats)
        policy.use_prefix_cache = False
        backbone_ms = None
        if images:
            frame = torch.rand(1, 3, config.image_size, config.image_size, generator=generator).to(device)
            backbone_ms = _median_ms(lambda: policy.encode_images(frame), device, repeats)
            step_observation = {f"observation.images.{cam}": frame for cam in config.cameras}
            step_observation["task"] = observation["task"]
            if config.state_names:
                step_observation["observation.state"] = observation["observation.state"]
        else:
            step_observation = observation
        policy.reset()
        steps = []
        for _ in range(chunks * config.actions_per_chunk):
            _sync(device)
            start = time.perf_counter()
            policy.select_action(step_observation)
            _sync(device)
            steps.append((time.perf_counter() - start) * 1000.0)
        policy.reset()
    prompt = processor.encode_instruction(observation["task"][0])
    sequence = len(prompt.prefix) + len(prompt.suffix) + 1 + config.tokens_per_camera * len(config.cameras)
    return {
        "llm_layers": policy.llm.config.num_hidden_layers,
        "llm_hidden": policy.llm.config.hidden_size,
        "llm_params_m": round(sum(p.numel() for p in policy.llm.parameters()) / 1e6, 2),
        "sequence_tokens": sequence,
        "visual_tokens": config.tokens_per_camera * len(config.cameras),
        "chunk_size": config.chunk_size,
        "actions_per_chunk": config.actions_per_chunk,
        "tokenize_ms": round(tokenize_ms, 3),
        "tokenize_cached_ms": round(tokenize_cached_ms, 4),
        "prefix_tokens": len(prompt.prefix),
        "llm_forward_ms": round(llm_ms, 3),
        "llm_forward_prefix_cached_ms": round(llm_prefix_ms, 3),
        "backbone_ms": None if backbone_ms is None else round(backbone_ms, 3),
        "step_ms_amortised": round(sum(steps) / len(steps), 3),
        "step_ms_max": round(max(steps), 3),
        "step_ms_min": round(min(steps), 4),
        "max_control_rate_hz": round(1000.0 / (sum(steps) / len(steps)), 1),
    }


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
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    console = Console()
    label = args.checkpoint or args.preset
    with user_errors(ValueError), console.status(f"building the {label} policy"):
        policy = build_bench_policy(args.preset, args.checkpoint, device, args.dtype, args.images)
    console.print(
        f"[bold]bench vla[/] policy={label} device={device} dtype={args.dtype} threads={torch.get_num_threads()}"
    )
    with console.status("timing"):
        result = benchmark_vla(policy, repeats=args.repeats, chunks=args.chunks, images=args.images)
    table = Table(title=f"VLA latency ({device}, {label})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, "-" if value is None else str(value))
    console.print(table)
    report = {
        "device": device_label(device),
        "policy": label,
        "dtype": args.dtype,
        "images": bool(args.images),
        "results": result,
    }
    write_json_report(report, args.json_path, console)
    return 0
