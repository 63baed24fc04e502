"""`omnistream sim ...`: evaluate policies in the simulators, merge shards, generate tabletop data."""

from __future__ import annotations

import argparse
import importlib

ENVS = ("tabletop", "calvin", "simpler")
LAYOUTS = ("random", "slots")  # omnistream_sim.tabletop.TabletopConfig.layout


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("sim", help="simulation: evaluate policies (tabletop, CALVIN, SimplerEnv), merge, data")
    group = sim.add_subparsers(dest="sim", metavar="ACTION")
    group.required = True

    p = group.add_parser("eval", help="closed-loop evaluation; writes results.json, report.md and videos")
    p.add_argument("--env", choices=ENVS, default="tabletop", help="simulator (default tabletop, built in)")
    p.add_argument("--policy", default="scripted", help="scripted | random | ckpt:DIR | ros:DIR (default scripted)")
    p.add_argument(
        "--episodes",
        type=int,
        default=None,
        help="episodes (tabletop: default 30; SimplerEnv: per task, default and at most 24)",
    )
    p.add_argument("--out", required=True, help="output directory for results.json, report.md, videos/")
    p.add_argument("--seed", type=int, default=None, help="base seed (tabletop default 100000: held out from demos)")
    p.add_argument("--tasks", default="all", help="tabletop tasks: a set (lift|push|all) or comma list (default all)")
    p.add_argument("--swap-instructions", action="store_true", help="tabletop: show another task's instruction")
    p.add_argument("--image-size", type=int, default=None, help="tabletop static camera size (default 128)")
    p.add_argument("--max-steps", type=int, default=None, help="tabletop control steps per episode (default 100)")
    p.add_argument("--layout", choices=LAYOUTS, default=None, help="tabletop block layout (default random)")
    p.add_argument("--chains", type=int, default=None, help="CALVIN: number of evaluation chains (default 1000)")
    p.add_argument("--shard", default=None, help="i/n: run the i-th of n shards (0-based), merge them afterwards")
    p.add_argument("--calvin-env-root", default=None, help="CALVIN: a calvin_env checkout (or $CALVIN_ENV_ROOT)")
    p.add_argument("--renderer", choices=("egl", "tiny"), default="tiny", help="CALVIN renderer (default tiny)")
    p.add_argument("--videos", type=int, default=1, help="rollout videos of the first K episodes (default 1)")
    p.add_argument("--device", default="cpu", help="ckpt policies: torch device (default cpu)")
    p.add_argument("--timeout", type=float, default=30.0, help="ros policy: seconds to wait for an action")
    p.add_argument("--backbone", default=None, help="ros policy: perception backbone (default: the policy's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_eval)

    m = group.add_parser("merge", help="combine shard directories into one results.json/report.md")
    m.add_argument("dirs", nargs="+", help="shard output directories")
    m.add_argument("--out", required=True, help="output directory")
    m.set_defaults(handler=_merge)

    d = group.add_parser("demos", help="tabletop: scripted demonstrations for VLA training (npz + index.json)")
    d.add_argument("--episodes", type=int, default=100, help="number of successful demonstrations (default 100)")
    d.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    d.add_argument("--tasks", default="all", help="task set or comma list (default all)")
    d.add_argument(
        "--layout", choices=LAYOUTS, default="random", help="random blocks, or colours shuffled over 3 slots"
    )
    d.add_argument("--out", required=True, help="output directory")
    d.set_defaults(handler=_demos)

    g = group.add_parser("geometry", help="tabletop: moving-camera RGB-D sequences with poses (npz + index.json)")
    g.add_argument("--sequences", type=int, default=10, help="number of sequences (default 10)")
    g.add_argument("--frames", type=int, default=16, help="frames per sequence (default 16)")
    g.add_argument("--image-size", type=int, default=128, help="square image size (default 128)")
    g.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    g.add_argument("--out", required=True, help="output directory")
    g.set_defaults(handler=_geometry)


def parse_shard(text: str | None) -> tuple[int, int]:
    """ "i/n" -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    from omnistream_cli.main import UserError

    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_range(total: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous [start, stop) of shard ``index`` of ``count`` over ``total`` items (sizes differ by <= 1)."""
    base, extra = divmod(total, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def _eval(args: argparse.Namespace) -> int:
    from omnistream_cli.main import UserError

    if args.env in ("calvin", "simpler"):
        try:
            module = importlib.import_module(f"omnistream_sim.{args.env}")
        except ModuleNotFoundError as exc:
            raise UserError(f"the {args.env} harness is not available in this install ({exc})") from None
        if not hasattr(module, "evaluate"):
            raise UserError(f"omnistream_sim.{args.env} has no evaluate(args) yet")
        return int(module.evaluate(args) or 0)
    return _eval_tabletop(args)


def _eval_tabletop(args: argparse.Namespace) -> int:
    from omnistream_cli.main import UserError

    if args.episodes is None:
        args.episodes = 30
    if args.episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {args.episodes}")
    if args.videos < 0:
        raise UserError(f"--videos must be >= 0, got {args.videos}")
    from omnistream_sim.policies import make_policy
    from omnistream_sim.tabletop import TabletopConfig
    from omnistream_sim.tabletop.tasks import resolve_tasks

    try:
        tasks = resolve_tasks(args.tasks)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    seed = 100_000 if args.seed is None else args.seed
    shard_index, shard_count = parse_shard(args.shard)
    start, stop = shard_range(args.episodes, shard_index, shard_count)
    if stop <= start:
        raise UserError(f"shard {args.shard} of {args.episodes} episodes is empty")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    overrides = {"image_size": args.image_size, "max_steps": args.max_steps, "layout": args.layout}
    config = TabletopConfig(**{k: v for k, v in overrides.items() if v is not None})
    try:
        policy = make_policy(args.policy, seed=seed, env_name="tabletop", device=args.device, timeout=args.timeout,
                             backbone=args.backbone)  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    try:
        results = _run_tabletop(args, policy, tasks, seed, config, start, stop, shard_index)
    finally:
        close = getattr(policy, "close", None)
        if close is not None:
            close()
    if shard_count > 1:  # keep the shard id in the files so merge can report it
        from omnistream_sim.report import write_results

        results["shard"] = f"{shard_index}/{shard_count}"
        write_results(results, args.out)
    print(
        f"tabletop/{args.policy}: success {results['success_rate']:.3f} over {results['episodes']} episodes "
        f"in {results['seconds']:.1f} s -> {args.out}/results.json"
    )
    return 0


def _run_tabletop(args, policy, tasks, seed, config, start, stop, shard_index) -> dict:
    from omnistream_sim.rollout import evaluate_tabletop

    return evaluate_tabletop(
        policy,
        episodes=stop - start,
        episode_offset=start,
        out_dir=args.out,
        seed=seed,
        tasks=tasks,
        config=config,
        videos=args.videos if shard_index == 0 else 0,
        policy_name=args.policy,
        swap_instructions=args.swap_instructions,
        progress=not args.quiet,
    )


def _merge(args: argparse.Namespace) -> int:
    from omnistream_cli.main import UserError
    from omnistream_sim.report import load_results, merge_results

    try:
        first = load_results(args.dirs[0])
        summarize = None
        env = first.get("env")
        if env in ("calvin", "simpler"):  # their richer summaries (CALVIN: average length), when they provide one
            module = importlib.import_module(f"omnistream_sim.{env}")
            summarize = getattr(module, "summarize_records", None)
        merged = merge_results(args.dirs, args.out, summarize=summarize)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    print(
        f"merged {len(args.dirs)} shards: success {merged['success_rate']:.3f} over {merged['episodes']} -> {args.out}"
    )
    return 0


def _demos(args: argparse.Namespace) -> int:
    from omnistream_cli.main import UserError
    from omnistream_sim.tabletop import TabletopConfig, generate_demonstrations

    try:
        episodes = generate_demonstrations(
            args.episodes, seed=args.seed, out_dir=args.out, tasks=args.tasks, config=TabletopConfig(layout=args.layout)
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(f"{len(episodes)} demonstrations ({sum(len(e) for e in episodes)} steps) -> {args.out}")
    return 0


def _geometry(args: argparse.Namespace) -> int:
    from omnistream_cli.main import UserError
    from omnistream_sim.tabletop import generate_geometry_sequences

    try:
        generate_geometry_sequences(
            args.sequences, args.frames, seed=args.seed, out_dir=args.out, image_size=args.image_size
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(f"{args.sequences} geometry sequences x {args.frames} frames -> {args.out}")
    return 0
