"""The one rollout loop every environment uses.

Per episode: ``policy.reset()``; then per control step ``policy.select_action(obs)`` -> an action or a chunk
``(k, 7)`` of actions -> the explicit action-convention conversion (``convert``, from
``omnistream_sim.conventions``; identity when policy and environment speak the same convention) -> every action
of the chunk is executed (open loop) unless the episode ends first -> success check (the environment's
``step`` reports it). Frames of one camera are kept for the video of the first K episodes.

An environment for this loop needs ``step(action) -> (obs, success: bool, done: bool, info)``; the tabletop's
``TabletopEnv`` is one; CALVIN and SimplerEnv wrap theirs to the same shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .policy_protocol import Policy

ActionConverter = Callable[[np.ndarray], np.ndarray]


@dataclass
class EpisodeResult:
    success: bool
    steps: int
    frames: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    policy_seconds: float = 0.0


def relative_action(action: np.ndarray) -> np.ndarray:
    """The tabletop's (and CALVIN's) own convention: arm in [-1, 1], gripper exactly -1 or +1. Policies trained on
    tabletop/CALVIN data already speak it; this makes the clipping and gripper thresholding explicit."""
    from .conventions import gripper_to_sign

    out = np.asarray(action, dtype=np.float32).copy()
    out[:6] = np.clip(out[:6], -1.0, 1.0)
    out[6] = gripper_to_sign(out[6])
    return out


def _as_chunk(action: Any) -> np.ndarray:
    if hasattr(action, "detach"):  # a torch tensor from an in-process model
        action = action.detach().cpu().numpy()
    chunk = np.asarray(action, dtype=np.float32)
    if chunk.ndim == 1:
        chunk = chunk[None]
    if chunk.ndim != 2 or chunk.shape[-1] != 7 or chunk.shape[0] < 1:
        raise ValueError(f"a policy must return one action (7,) or a chunk (k, 7), got shape {chunk.shape}")
    if not np.all(np.isfinite(chunk)):
        raise ValueError(f"the policy returned a non-finite action: {chunk}")
    return chunk


def run_episode(
    env: Any,
    policy: Policy,
    first_observation: dict,
    *,
    max_steps: int,
    convert: ActionConverter | None = None,
    video_camera: str | None = None,
    on_step: Callable[[int, dict, np.ndarray | None], None] | None = None,
) -> EpisodeResult:
    """Run one episode from ``first_observation`` (already reset) until success, ``done`` or ``max_steps``.
    ``on_step(step, observation, executed_action)`` sees every observation (the last with None), e.g. a Rerun log."""
    start = time.perf_counter()
    policy.reset()
    obs = first_observation
    frames: list[np.ndarray] = []
    if video_camera is not None:
        frames.append(obs["images"][video_camera])
    steps, success, done, policy_seconds = 0, False, False, 0.0
    while steps < max_steps and not done:
        t = time.perf_counter()
        chunk = _as_chunk(policy.select_action(obs))
        policy_seconds += time.perf_counter() - t
        for action in chunk:
            env_action = convert(action) if convert is not None else action
            if on_step is not None:
                on_step(steps, obs, env_action)
            obs, success, done, _ = env.step(env_action)
            steps += 1
            if video_camera is not None:
                frames.append(obs["images"][video_camera])
            if done or steps >= max_steps:
                break
    if on_step is not None:
        on_step(steps, obs, None)
    return EpisodeResult(bool(success), steps, frames, time.perf_counter() - start, policy_seconds)


def evaluate_tabletop(
    policy: Policy,
    *,
    episodes: int,
    out_dir: str | Path | None,
    seed: int = 100_000,
    tasks: str | tuple[str, ...] = "all",
    config: Any = None,
    videos: int = 1,
    policy_name: str = "policy",
    swap_instructions: bool = False,
    episode_offset: int = 0,
    progress: bool = True,
    convert: ActionConverter | None = None,
    needs_images: bool | None = None,
    rerun: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``policy`` on the tabletop; episode ``i`` uses seed ``seed + i`` and task ``tasks[i % n]``.

    ``swap_instructions``: the policy is shown the instruction of the next task in the list (same scene, other
    block/verb) while success is judged by the real task; a policy that follows language then fails.
    ``episode_offset`` selects a shard (episodes ``offset .. offset + episodes - 1``). Writes ``results.json``,
    ``report.md`` and ``videos/episode_XXXXXX.mp4`` for the first ``videos`` episodes when ``out_dir`` is given.
    Default tabletop episodes are held out from demonstrations by seed (demonstrations start at seed 0).
    ``rerun``: an ``.rrd`` file that gets every episode's images, actions and success (``RolloutLog``).
    """
    from tqdm import tqdm

    from .report import finish_results
    from .tabletop import TabletopConfig, TabletopEnv
    from .tabletop.tasks import TASKS, resolve_tasks
    from .video import write_video

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    task_names = resolve_tasks(tasks)
    if swap_instructions and len(task_names) < 2:
        raise ValueError("swapping instructions needs at least two tasks")
    config = config or TabletopConfig()
    if needs_images is None:
        needs_images = getattr(policy, "needs_images", True)
    records: list[dict[str, Any]] = []
    video_paths: list[str] = []
    out = Path(out_dir) if out_dir is not None else None
    start = time.perf_counter()
    rollout_log = None
    if rerun is not None:
        from omnistream_perception.visualization import RerunLog, RolloutLog

        rollout_log = RolloutLog(RerunLog("omnistream_sim_eval", save=rerun))
    env = TabletopEnv(config)
    if hasattr(policy, "bind"):  # privileged policies (the scripted expert) read the env they drive
        policy.bind(env)
    try:
        bar = tqdm(range(episode_offset, episode_offset + episodes), desc=f"tabletop/{policy_name}", unit="ep",
                   disable=not progress)  # fmt: skip
        for index in bar:
            task = task_names[index % len(task_names)]
            shown = TASKS[task_names[(index + 1) % len(task_names)]].instruction() if swap_instructions else None
            record_video = out is not None and index - episode_offset < videos
            env.render_images = needs_images or record_video or rollout_log is not None
            obs = env.reset(seed=seed + index, task=task, instruction=shown)
            if hasattr(policy, "set_episode_seed"):  # stochastic policies: per-episode streams, shard-independent
                policy.set_episode_seed(seed + index)
            if rollout_log is not None:
                rollout_log.start_episode(index, task, env.instruction)
            result = run_episode(env, policy, obs, max_steps=config.max_steps, convert=convert or relative_action,
                                 video_camera="static" if record_video else None,
                                 on_step=rollout_log.step if rollout_log is not None else None)  # fmt: skip
            if rollout_log is not None:
                rollout_log.end_episode(result.success, result.steps, task)
            record = {"episode": index, "seed": seed + index, "task": task, "instruction": env.instruction,
                      "success": result.success, "steps": result.steps, "seconds": round(result.seconds, 3),
                      "policy_ms_per_step": round(1000 * result.policy_seconds / max(result.steps, 1), 3)}  # fmt: skip
            records.append(record)
            if record_video and result.frames:
                path = write_video(result.frames, out / "videos" / f"episode_{index:06d}_{task}.mp4", fps=15)
                video_paths.append(str(path.relative_to(out)))
            bar.set_postfix(success=f"{sum(r['success'] for r in records) / len(records):.2f}")
    finally:
        env.close()
        if rollout_log is not None:
            rollout_log.log.close()
    seconds = time.perf_counter() - start
    return finish_results(
        records,
        env="tabletop",
        policy=policy_name,
        out_dir=out,
        seed=seed,
        tasks=list(task_names),
        swap_instructions=swap_instructions,
        seconds=round(seconds, 2),
        policy_ms_per_step=round(float(np.mean([r["policy_ms_per_step"] for r in records])), 3),
        videos=video_paths,
        **(policy.summary() if hasattr(policy, "summary") else {}),
    )
