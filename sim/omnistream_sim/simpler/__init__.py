"""SimplerEnv-Bridge evaluation: the four WidowX tasks, 24 episodes each, success read at the last step.

Protocol (``../shared/specs/simulators.md``): for each task, ``episode_id`` 0..23; 60 steps (120 for the
eggplant task), no early stop; the policy's Bridge-convention action (xyz, euler, gripper in [0, 1]) is
converted explicitly to SimplerEnv's (xyz, axis-angle, +-1); stochastic policies are run with several seeds
(each seed repeats every episode with its own per-episode stream). The real simulator runs only where
``simpler_env`` imports (a GPU machine with Vulkan); tests use :class:`SimplerStandIn`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..conventions import bridge_to_simpler_action
from ..report import shard_range
from .env import SimplerBridgeEnv, SimplerStandIn
from .tasks import BRIDGE_TASKS, EPISODES_PER_TASK, BridgeTask, resolve_tasks

__all__ = [
    "BRIDGE_TASKS",
    "EPISODES_PER_TASK",
    "SimplerBridgeEnv",
    "SimplerStandIn",
    "merge_results",
    "plan_episodes",
    "run_evaluation",
    "summarize_records",
]

SEED_STRIDE = 10_000  # record index = seed * SEED_STRIDE + task_position * 100 + episode_id (unique across runs)


def episode_index(seed: int, task: BridgeTask, episode_id: int) -> int:
    """One integer per (seed, task, episode): the record's ``episode`` and the policy's per-episode seed."""
    return seed * SEED_STRIDE + list(BRIDGE_TASKS).index(task.name) * 100 + episode_id


def plan_episodes(
    tasks: Sequence[BridgeTask], episodes_per_task: int, seeds: Sequence[int], shard: tuple[int, int] = (0, 1)
) -> list[tuple[int, int, BridgeTask, int]]:
    """All (index, seed, task, episode_id) of the evaluation, then the contiguous part of shard ``i/n``."""
    if not 1 <= episodes_per_task <= EPISODES_PER_TASK:
        raise ValueError(f"episodes per task must be in 1..{EPISODES_PER_TASK}, got {episodes_per_task}")
    if not seeds:
        raise ValueError("at least one seed is needed")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct and >= 0, got {list(seeds)}")
    plan = [
        (episode_index(seed, task, episode), seed, task, episode)
        for seed in seeds
        for task in tasks
        for episode in range(episodes_per_task)
    ]
    start, stop = shard_range(len(plan), shard)
    return plan[start:stop]


def summarize_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-task success (the paper's columns), their mean, and per-seed success (also used by ``sim merge``)."""
    from ..report import summarize_records as summarize

    summary = summarize(records)
    summary["mean_task_success"] = float(np.mean([e["success_rate"] for e in summary["per_task"].values()]))
    per_seed: dict[str, list[bool]] = {}
    for r in records:
        per_seed.setdefault(str(r.get("seed", 0)), []).append(bool(r["success"]))
    summary["per_seed_success"] = {seed: float(np.mean(v)) for seed, v in sorted(per_seed.items())}
    return summary


def run_evaluation(
    env: Any,
    policy: Any,
    *,
    policy_name: str,
    tasks: str | None = "all",
    episodes_per_task: int = EPISODES_PER_TASK,
    seeds: Sequence[int] = (0,),
    shard: tuple[int, int] = (0, 1),
    out_dir: str | Path | None = None,
    videos: int = 0,
    progress: bool = True,
    convert=bridge_to_simpler_action,
    **extra: Any,
) -> dict[str, Any]:
    """Run (a shard of) the protocol in ``env`` (:class:`SimplerBridgeEnv` or :class:`SimplerStandIn`)."""
    import time

    from tqdm import tqdm

    from ..report import finish_results
    from ..rollout import run_episode
    from ..video import write_video

    plan = plan_episodes(resolve_tasks(tasks), episodes_per_task, seeds, shard)
    if not plan:
        raise ValueError(f"shard {shard[0]}/{shard[1]} is empty")
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    video_paths: list[str] = []
    bar = tqdm(plan, desc=f"simpler/{policy_name}", unit="ep", disable=not progress)
    for k, (index, seed, task, episode_id) in enumerate(bar):
        obs = env.reset(task.name, episode_id)
        if hasattr(policy, "set_episode_seed"):  # stochastic policies: one stream per (seed, task, episode)
            policy.set_episode_seed(index)
        record_video = out_dir is not None and k < videos
        result = run_episode(
            env, policy, obs, max_steps=task.max_steps, convert=convert, video_camera="static" if record_video else None
        )
        records.append({"episode": index, "seed": seed, "task": task.short, "episode_id": episode_id,
                        "instruction": obs["instruction"], "success": result.success, "steps": result.steps,
                        "seconds": round(result.seconds, 3)})  # fmt: skip
        if record_video and result.frames:
            name = f"{task.short}_{episode_id:02d}_seed{seed}.mp4"
            path = write_video(result.frames, Path(out_dir) / "videos" / name, fps=5)
            video_paths.append(str(path.relative_to(out_dir)))
        bar.set_postfix(success=f"{np.mean([r['success'] for r in records]):.2f}")
    return finish_results(
        records,
        env="simpler",
        policy=policy_name,
        summarize=summarize_records,
        shard=shard,
        out_dir=out_dir,
        title=f"SimplerEnv-Bridge (WidowX): {policy_name}",
        simulator=getattr(env, "name", type(env).__name__),
        seeds=list(seeds),
        seconds=round(time.perf_counter() - start, 2),
        **extra,
        videos=video_paths,
    )


def merge_results(paths: Iterable[str | Path], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Combine SimplerEnv shard (or per-seed) results; the summary is recomputed from the records."""
    from ..report import merge_results as merge

    return merge(paths, out_dir, summarize=summarize_records)
