"""`omnistream export ...`: the streaming step for deployment runtimes (ONNX / onnxruntime, TensorRT)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export the streaming step for deployment runtimes")
    group = export.add_subparsers(dest="export", metavar="FORMAT")
    group.required = True

    p = group.add_parser(
        "onnx",
        help="one streaming step (KV cache as explicit inputs/outputs, + geometry heads) as a float32 ONNX graph",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--window", type=int, required=True, help="cache slots in frames (fixed in the graph)")
    p.add_argument("--sink", type=int, default=1, help="first frames that stay in the cache (default 1)")
    p.add_argument("--resolution", required=True, help="model input size: R (square) or WIDTHxHEIGHT, in pixels")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--no-heads", action="store_true", help="backbone only, even if the checkpoint has heads")
    p.add_argument("--rays", action="store_true", help="also output the ray map and world points of the heads")
    p.add_argument(
        "--camera-token", choices=("auto", "true", "false"), default="auto", help="auto: on when heads are exported"
    )
    p.add_argument("--batch-size", type=int, default=1, help="streams stepped together (default 1)")
    p.add_argument(
        "--opset",
        type=int,
        default=23,
        help="ONNX opset: 23 (default) writes the fused Attention op; 18 plain MatMul/Softmax (older TensorRT)",
    )
    p.add_argument("--check", action="store_true", help="stream frames through onnxruntime and torch; print the diff")
    p.add_argument("--check-frames", type=int, default=40, help="frames of --check (default 40)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="--check fails above this max abs diff (1e-4)")
    p.set_defaults(handler=_onnx)


def parse_resolution(text: str, patch_size: int = 16) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"640x480"`` (width x height) -> (480, 640); multiples of the patch size."""
    from omnistream_cli.errors import UserError

    parts = str(text).lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise UserError(f"--resolution must be R or WIDTHxHEIGHT in pixels, got {text!r}")
    width, height = sizes[0], sizes[-1]
    if width % patch_size or height % patch_size:
        raise UserError(f"--resolution must be a multiple of the patch size {patch_size}, got {text!r}")
    return height, width


def _onnx(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omnistream_cli.errors import UserError

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UserError(f"ONNX export needs onnx and onnxruntime ({exc}): pip install -r requirements.txt") from exc
    from omnistream_perception.deploy.onnx_export import export_stream_step
    from omnistream_perception.deploy.onnx_session import compare_with_torch
    from omnistream_perception.model import OmniStreamModel
    from omnistream_perception.model.heads import GeometryHeads

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"--checkpoint {checkpoint}: no such directory")
    if args.window < 1:
        raise UserError(f"--window must be >= 1 frame, got {args.window}")
    if not 0 <= args.sink <= args.window:
        raise UserError(f"--sink must be in [0, --window={args.window}], got {args.sink}")
    if args.batch_size < 1 or args.check_frames < 1:
        raise UserError("--batch-size and --check-frames must be >= 1")
    if not 18 <= args.opset <= 23:
        raise UserError(f"--opset must be in 18..23 (the exporter's range), got {args.opset}")
    try:
        model = OmniStreamModel.from_pretrained(checkpoint)
        heads = None
        if not args.no_heads and GeometryHeads.present(checkpoint):
            heads = GeometryHeads.from_pretrained(checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"--checkpoint {checkpoint}: {exc}") from exc
    resolution = parse_resolution(args.resolution, model.config.patch_size)
    camera = {"auto": None, "true": True, "false": False}[args.camera_token]
    if args.rays and heads is None:
        raise UserError("--rays needs geometry heads in the checkpoint (and no --no-heads)")
    out = Path(args.out)
    export_stream_step(
        model,
        out,
        window=args.window,
        sink=args.sink,
        resolution=resolution,
        heads=heads,
        camera_token=camera,
        rays=args.rays,
        batch_size=args.batch_size,
        opset=args.opset,
    )
    parts = ["backbone"] + (["heads"] if heads is not None else [])
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {' + '.join(parts)}, {resolution[1]}x{resolution[0]}, "
        f"window {args.window}, sink {args.sink}"
    )
    if not args.check:
        return 0
    diffs = compare_with_torch(model, heads, out, frames=args.check_frames)
    worst = max(diffs.values())
    for name, value in diffs.items():
        print(f"  {name}: {value:.3g}")
    print(f"max abs diff {worst:.3g} over {args.check_frames} frames (onnxruntime vs torch, float32)")
    if worst > args.tolerance:
        raise UserError(f"the exported step differs from torch by {worst:.3g} > --tolerance {args.tolerance:g}")
    return 0
