"""`omnistream eval depth|pose|stream`: the paper's reconstruction protocols (Tables 3-4, after CUT3R).

omnistream eval depth --pred outputs/pred_depth --gt data/gt_depth --align per-sequence-scale --max-depth 70
omnistream eval pose --pred outputs/poses --gt data/gt_poses --align sim3
omnistream eval stream --checkpoint outputs/demo/checkpoints/pretrain/backbone --dataset tabletop
omnistream eval stream --checkpoint CKPT --dataset sintel --root data/MPI-Sintel --out outputs/eval/sintel
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omnistream_cli.errors import user_errors

DATASETS = ("tabletop", "sintel", "bonn", "kitti", "tum", "scannet")


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="video depth and camera pose metrics (CUT3R protocol, paper Tables 3-4)")
    group = ev.add_subparsers(dest="eval", metavar="EVAL")
    group.required = True

    p = group.add_parser("depth", help="AbsRel / delta<1.25 of <sequence>/<frame>.npy depth maps (metres)")
    p.add_argument("--pred", required=True, help="predicted depth: DIR/<sequence>/<frame>.npy")
    p.add_argument("--gt", required=True, help="ground truth: DIR/<sequence>/<frame>.npy (0 or non-finite = invalid)")
    p.add_argument("--align", default="per-sequence-scale", choices=("per-sequence-scale", "scale-shift", "metric"),
                   help="per-sequence-scale: median(gt)/median(pred) per sequence (the tables); scale-shift: least "
                        "squares per sequence; metric: none (default per-sequence-scale)")  # fmt: skip
    p.add_argument("--protocol", default=None, choices=("sintel", "bonn", "kitti"),
                   help="use that dataset's depth cap (Sintel and Bonn 70 m, KITTI none) and prediction clipping")  # fmt: skip
    p.add_argument("--max-depth", type=float, default=None, help="ignore ground truth at or beyond M metres")
    p.add_argument("--out", default="outputs/eval/depth", help="results.json, report.md, depth_errors.png")
    p.set_defaults(handler=_depth)

    p = group.add_parser("pose", help="ATE / RPE of TUM-format trajectories (timestamp tx ty tz qx qy qz qw)")
    p.add_argument("--pred", required=True, help="a TUM trajectory file, or a DIR of <sequence>.txt")
    p.add_argument("--gt", required=True, help="a TUM trajectory file, or a DIR of <sequence>.txt")
    p.add_argument("--align", default="sim3", choices=("sim3", "se3"),
                   help="sim3: Umeyama with scale (up-to-scale estimates, the tables); se3: rigid (default sim3)")  # fmt: skip
    p.add_argument("--max-time-diff", type=float, default=0.02,
                   help="timestamps match when closer than this many seconds (default 0.02, as TUM's associate.py)")  # fmt: skip
    p.add_argument("--out", default="outputs/eval/pose", help="results.json, report.md, trajectories.png")
    p.set_defaults(handler=_pose)

    p = group.add_parser("stream", help="stream a dataset through backbone + heads (as perception_node) and score it")
    p.add_argument("--checkpoint", required=True, help="backbone directory with geometry heads beside it")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="tabletop is generated; the others need --root")
    p.add_argument(
        "--root", default=None, help="the dataset's folder (layouts: omnistream_perception.evaluation.datasets)"
    )
    p.add_argument("--task", default="both", choices=("both", "depth", "pose"), help="what to score (default both)")
    p.add_argument("--max-side", type=int, default=None,
                   help="resize so the longer side is <= N px, as perception_node's max_side (default: input size; "
                        "tabletop: 64, the resolution the demo trains its heads at)")  # fmt: skip
    p.add_argument("--window", type=int, default=None, help="bounded KV cache of W frames (default: whole stream)")
    p.add_argument("--sink", type=int, default=1, help="sink frames kept with --window (default 1)")
    p.add_argument("--depth-align", default=None, choices=("per-sequence-scale", "scale-shift", "metric"),
                   help="default: the protocol's (per-sequence-scale)")  # fmt: skip
    p.add_argument("--pose-align", default=None, choices=("sim3", "se3"), help="default: the protocol's (sim3)")
    p.add_argument("--max-depth", type=float, default=None, help="default: the protocol's cap")
    p.add_argument("--sequences", default=None, help="comma-separated sequence names, or all (default: the protocol's)")
    p.add_argument(
        "--tabletop-sequences", type=int, default=6, help="tabletop: held-out sequences (default 6, as the demo)"
    )
    p.add_argument("--tabletop-frames", type=int, default=16, help="tabletop: frames each (default 16, as the demo)")
    p.add_argument("--seed", type=int, default=0, help="tabletop: the demo's seed (held-out seeds start at seed+50000)")
    p.add_argument("--save-predictions", action="store_true",
                   help="also write predictions/depth/<seq>/<frame>.npy and predictions/poses/<seq>.txt")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu|cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32|bfloat16|float16 (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default=None, help="results.json, report.md, pictures (default outputs/eval/<dataset>)")
    p.set_defaults(handler=_stream)


def _print_summary(results: dict, report: Path) -> None:
    if "depth" in results:
        o = results["depth"]["overall"]
        print(f"depth: AbsRel {o['abs_rel']:.4f}  delta<1.25 {o['delta1']:.4f}  "
              f"({o['sequences']} sequences, {o['pixels']} pixels)")  # fmt: skip
    if "pose" in results:
        o = results["pose"]["overall"]
        print(f"pose: ATE {o['ate']:.4f} m  RPE trans {o['rpe_trans']:.4f} m  RPE rot {o['rpe_rot']:.3f} deg  "
              f"({o['sequences']} sequences)")  # fmt: skip
    print(f"wrote {report} and {report.parent / 'results.json'}")


def _depth(args: argparse.Namespace) -> int:
    from omnistream_cli.errors import UserError
    from omnistream_perception.evaluation import PROTOCOLS, evaluate_depth_dirs

    max_depth, clip = args.max_depth, None
    if args.protocol:
        protocol = PROTOCOLS[args.protocol]
        max_depth = protocol.max_depth if max_depth is None else max_depth
        clip = max_depth if protocol.clip_max is not None else None
    if max_depth is not None and max_depth <= 0:
        raise UserError(f"--max-depth must be > 0 metres, got {max_depth}")
    with user_errors():
        results = evaluate_depth_dirs(args.pred, args.gt, args.align, max_depth, clip, out_dir=args.out)
    _print_summary(results, Path(args.out) / "report.md")
    return 0


def _pose(args: argparse.Namespace) -> int:
    from omnistream_cli.errors import UserError
    from omnistream_perception.evaluation import evaluate_pose_files

    if args.max_time_diff < 0:
        raise UserError(f"--max-time-diff must be >= 0 seconds, got {args.max_time_diff}")
    with user_errors():
        results = evaluate_pose_files(args.pred, args.gt, args.align, args.max_time_diff, out_dir=args.out)
    _print_summary(results, Path(args.out) / "report.md")
    return 0


def _stream(args: argparse.Namespace) -> int:
    from omnistream_cli.errors import UserError

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from omnistream_perception.evaluation import evaluate_checkpoint
    from omnistream_perception.model.heads import MissingHeadsError

    out = args.out or f"outputs/eval/{args.dataset}"
    options: dict = {}
    sequences = None
    max_side = args.max_side
    if args.dataset == "tabletop":
        if args.root:
            raise UserError("--dataset tabletop is generated in the simulator: drop --root")
        if args.tabletop_sequences < 1 or args.tabletop_frames < 2:
            raise UserError("--tabletop-sequences must be >= 1 and --tabletop-frames >= 2")
        sequences = _tabletop_sequences(args.tabletop_sequences, args.tabletop_frames, args.seed, not args.no_progress)
        max_side = 64 if max_side is None else max_side
    else:
        if not args.root:
            raise UserError(f"--dataset {args.dataset} needs --root, the folder holding the dataset")
        if args.sequences:
            options["sequences"] = [s.strip() for s in args.sequences.split(",") if s.strip()]
    if args.max_depth is not None and args.max_depth <= 0:
        raise UserError(f"--max-depth must be > 0 metres, got {args.max_depth}")
    if args.window is not None and args.window < 1:
        raise UserError(f"--window must be >= 1 frame, got {args.window}")
    if not Path(args.checkpoint).is_dir():
        raise UserError(f"--checkpoint {args.checkpoint} is not a directory (config.json + model.safetensors)")
    with user_errors(ValueError, FileNotFoundError, MissingHeadsError):
        results = evaluate_checkpoint(
            args.checkpoint, args.dataset, args.root, task=args.task, max_side=max_side, window=args.window,
            sink=args.sink, device=args.device, dtype=args.dtype, dataset_options=options, sequences=sequences, out_dir=out,
            save_predictions=args.save_predictions, progress=not args.no_progress, depth_align=args.depth_align,
            pose_align=args.pose_align, max_depth=args.max_depth,
        )  # fmt: skip
    _print_summary(results, Path(out) / "report.md")
    print(f"{results['ms_per_frame']:.1f} ms per frame over {results['frames']} frames")
    return 0


def _tabletop_sequences(count: int, frames: int, seed: int, progress: bool):
    """The held-out sequences `make demo` scores (the same seeds, so the same renders)."""
    from omnistream_perception.evaluation.datasets import TABLETOP_HELDOUT_SEED, tabletop_eval_sequence
    from omnistream_sim.tabletop.data import generate_geometry_sequences

    rendered = generate_geometry_sequences(count, frames, seed=seed + TABLETOP_HELDOUT_SEED, progress=progress)
    return [tabletop_eval_sequence(s, i) for i, s in enumerate(rendered)]
