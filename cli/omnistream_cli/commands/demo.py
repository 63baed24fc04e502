"""`omnistream demo`: the main job on the built-in simulator (what `make demo` runs)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="generate tabletop data, pretrain a small backbone + heads, train a VLA, evaluate through ROS, report",
        description=(
            "The whole stack on the built-in pybullet tabletop: data -> multi-task pretraining (with geometry heads) -> "
            "VLA finetuning -> perception evaluation on held-out sequences -> closed-loop evaluation through the real "
            "perception_node and vla_node -> report (outputs/demo/report.md, report.json, pictures). Trained checkpoints "
            "are reused by the next run unless --retrain."
        ),
    )
    p.add_argument("--out", default="outputs/demo", help="output directory (default outputs/demo)")
    p.add_argument("--retrain", action="store_true", help="regenerate data and retrain instead of reusing checkpoints")
    p.add_argument("--episodes", type=int, default=60, help="held-out closed-loop episodes (default 60: 10 per task)")
    p.add_argument("--quick", action="store_true", help="a much smaller run (smoke test; the numbers mean nothing)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every stage: data, pretraining, VLA, evaluation episodes (default 0, as make demo)")  # fmt: skip
    p.add_argument("--strict", action="store_true", help="exit 1 when a target figure of the report is not met")
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from omnistream_cli.demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    config.out = args.out
    config.retrain = args.retrain
    config.eval_episodes = args.episodes if not args.quick else min(args.episodes, config.eval_episodes)
    config.threads = args.threads
    config.seed = args.seed
    report = run_demo(config)
    return 1 if args.strict and not report["ok"] else 0
