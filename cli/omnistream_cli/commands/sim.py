"""`omnistream sim ...`: evaluate policies in the simulators, merge shards, generate tabletop data.

Under `torchrun --nproc-per-node K omnistream sim eval ...` each rank evaluates its share of the episodes
(chains) into <out>/ranks/rank-<r>/ and rank 0 writes the merged results into <out>; `--shard i/n` and
`sim merge` remain for schedulers that start the processes themselves.
"""

from __future__ import annotations

import argparse
import importlib

from omnistream_cli.errors import UserError, user_errors

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
    p.add_argument("--rerun", default=None, metavar="FILE.rrd", help="tabletop: log every rollout to a Rerun file")
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
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


def _eval(args: argparse.Namespace) -> int:
    rerun = getattr(args, "rerun", None)
    if rerun is not None and (args.env != "tabletop" or not rerun.endswith(".rrd")):
        raise UserError(f"--rerun needs --env tabletop and a FILE.rrd, got --env {args.env} --rerun {rerun}")
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _eval_torchrun(args)
    return _eval_env(args)


def _eval_torchrun(args: argparse.Namespace) -> int:
    """Under torchrun: rank r evaluates shard r/world into <out>/ranks/rank-r; rank 0 merges them into <out>
    (the files `sim merge` would write). ``--shard`` and ``sim merge`` stay for schedulers."""
    import datetime
    import os
    from pathlib import Path

    import torch.distributed as dist

    if args.shard is not None:
        raise UserError(
            "under torchrun the ranks split the episodes themselves: drop --shard (or run without torchrun)"
        )
    rank, world, local = (int(os.environ.get(k, "0")) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    out = Path(args.out)
    args.shard = f"{rank}/{world}"
    args.out = str(out / "ranks" / f"rank-{rank}")
    args.quiet = args.quiet or rank > 0
    if args.device == "cuda":
        args.device = f"cuda:{local}"  # one GPU per rank
    # evaluations run for hours (CALVIN): the barrier waits as long; a failing rank ends the group through torchrun
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=2))
    try:
        code = _eval_env(args)
        dist.barrier()
        if rank == 0:
            shards = [str(out / "ranks" / f"rank-{r}") for r in range(world)]
            code = code or _merge(argparse.Namespace(dirs=shards, out=str(out)))
    finally:
        dist.destroy_process_group()
    return code


def _eval_env(args: argparse.Namespace) -> int:
    if args.env == "calvin":
        return _eval_calvin(args)
    if args.env == "simpler":
        return _eval_simpler(args)
    return _eval_tabletop(args)


def _eval_calvin(args: argparse.Namespace) -> int:
    """``omnistream sim eval --env calvin``: the real simulator through the official protocol."""
    from omnistream_cli.policies import make_policy
    from omnistream_sim.calvin import NUM_CHAINS, generate_chains, load_instructions, run_evaluation, select_chains
    from omnistream_sim.calvin.env import make_calvin_env, resolve_calvin_env_root

    if args.videos < 0:
        raise UserError(f"--videos must be >= 0, got {args.videos}")
    shard = parse_shard(args.shard)
    seed = 0 if args.seed is None else args.seed
    with user_errors():
        resolve_calvin_env_root(args.calvin_env_root)  # fail fast, before ~25 s of chain generation
        load_instructions()
        if args.chains is not None and not 1 <= args.chains <= NUM_CHAINS:
            raise ValueError(f"--chains must be in 1..{NUM_CHAINS}, got {args.chains}")
        all_chains = generate_chains(progress=not getattr(args, "quiet", False))
        select_chains(all_chains, args.chains, shard)  # validates --chains/--shard before the slow env build
        policy = make_policy(args.policy, seed=seed, env_name="calvin", device=getattr(args, "device", "cpu"))
        sim = make_calvin_env(args.calvin_env_root, renderer=args.renderer)
    try:
        results = run_evaluation(
            sim.env,
            sim.oracle,
            policy,
            policy_name=args.policy,
            chains=args.chains,
            shard=shard,
            seed=seed,
            out_dir=args.out,
            videos=args.videos if shard[0] == 0 else 0,
            progress=not getattr(args, "quiet", False),
            all_chains=all_chains,
            calvin_env_commit=sim.commit,
            renderer=sim.renderer,
        )
    finally:
        sim.close()
        close = getattr(policy, "close", None)
        if close is not None:
            close()
    rates = " ".join(f"{k}:{v * 100:.1f}%" for k, v in results["chain_success"].items())
    print(
        f"calvin/{args.policy}: avg_len {results['avg_len']:.3f} ({rates}) over {results['episodes']} chains "
        f"in {results['seconds']:.0f} s, calvin_env {sim.commit[:12]} -> {args.out}/results.json"
    )
    return 0


def _eval_simpler(args: argparse.Namespace) -> int:
    """``omnistream sim eval --env simpler``: needs ``simpler_env`` (a GPU machine with Vulkan)."""
    from omnistream_cli.policies import make_policy
    from omnistream_sim.simpler import (
        EPISODES_PER_TASK,
        SimplerBridgeEnv,
        plan_episodes,
        resolve_tasks,
        run_evaluation,
    )

    shard = parse_shard(args.shard)
    seed = 0 if args.seed is None else args.seed
    episodes = EPISODES_PER_TASK if args.episodes is None else args.episodes
    if episodes > EPISODES_PER_TASK:  # the protocol has 24 layouts per task
        print(f"SimplerEnv-Bridge has {EPISODES_PER_TASK} episodes per task; running {EPISODES_PER_TASK}")
        episodes = EPISODES_PER_TASK
    with user_errors():
        plan_episodes(resolve_tasks(None), episodes, [seed], shard)
        policy = make_policy(args.policy, seed=seed, env_name="simpler", device=getattr(args, "device", "cpu"))
        env = SimplerBridgeEnv()
    try:
        results = run_evaluation(
            env,
            policy,
            policy_name=args.policy,
            episodes_per_task=episodes,
            seeds=[seed],
            shard=shard,
            out_dir=args.out,
            videos=args.videos if shard[0] == 0 else 0,
            progress=not getattr(args, "quiet", False),
        )
    finally:
        env.close()
    per_task = " / ".join(f"{t} {e['success_rate'] * 100:.1f}" for t, e in results["per_task"].items())
    print(f"simpler/{args.policy}: {per_task} (mean {results['mean_task_success'] * 100:.1f}%) -> {args.out}")
    return 0


def _eval_tabletop(args: argparse.Namespace) -> int:
    if args.episodes is None:
        args.episodes = 30
    if args.episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {args.episodes}")
    if args.videos < 0:
        raise UserError(f"--videos must be >= 0, got {args.videos}")
    from omnistream_cli.policies import make_policy
    from omnistream_sim.report import shard_range
    from omnistream_sim.tabletop import TabletopConfig
    from omnistream_sim.tabletop.tasks import resolve_tasks

    with user_errors(ValueError):
        tasks = resolve_tasks(args.tasks)
    seed = 100_000 if args.seed is None else args.seed
    shard_index, shard_count = parse_shard(args.shard)
    start, stop = shard_range(args.episodes, (shard_index, shard_count))
    if stop <= start:
        raise UserError(f"shard {args.shard} of {args.episodes} episodes is empty")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    overrides = {"image_size": args.image_size, "max_steps": args.max_steps, "layout": args.layout}
    config = TabletopConfig(**{k: v for k, v in overrides.items() if v is not None})
    with user_errors():
        policy = make_policy(args.policy, seed=seed, env_name="tabletop", device=args.device, timeout=args.timeout,
                             backbone=args.backbone)  # fmt: skip
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
        rerun=getattr(args, "rerun", None),
    )


def _merge(args: argparse.Namespace) -> int:
    from omnistream_sim.report import load_results, merge_results

    with user_errors():
        first = load_results(args.dirs[0])
        summarize = None
        env = first.get("env")
        if env in ("calvin", "simpler"):  # their richer summaries (CALVIN: average length), when they provide one
            module = importlib.import_module(f"omnistream_sim.{env}")
            summarize = getattr(module, "summarize_records", None)
        merged = merge_results(args.dirs, args.out, summarize=summarize)
    print(
        f"merged {len(args.dirs)} shards: success {merged['success_rate']:.3f} over {merged['episodes']} -> {args.out}"
    )
    return 0


def _demos(args: argparse.Namespace) -> int:
    from omnistream_sim.tabletop import TabletopConfig, generate_demonstrations

    with user_errors(ValueError):
        episodes = generate_demonstrations(
            args.episodes, seed=args.seed, out_dir=args.out, tasks=args.tasks, config=TabletopConfig(layout=args.layout)
        )
    print(f"{len(episodes)} demonstrations ({sum(len(e) for e in episodes)} steps) -> {args.out}")
    return 0


def _geometry(args: argparse.Namespace) -> int:
    from omnistream_sim.tabletop import generate_geometry_sequences

    with user_errors(ValueError):
        generate_geometry_sequences(
            args.sequences, args.frames, seed=args.seed, out_dir=args.out, image_size=args.image_size
        )
    print(f"{args.sequences} geometry sequences x {args.frames} frames -> {args.out}")
    return 0
