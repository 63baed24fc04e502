"""CALVIN's long-horizon protocol (the official ``evaluate_policy.py``), independent of the simulator build.

Per chain: reset the env to the chain's ``robot_obs``/``scene_obs``; for each of the 5 subtasks, with no reset in
between: ``policy.reset()``, ``start_info = env.get_info()``, then up to ``EP_LEN`` (360) steps; the subtask is
solved at the first step where the task oracle (calvin_env's ``Tasks``) reports it in
``get_task_info_for_set(start_info, info, {subtask})``; the chain stops at the first failure. The score of a
chain is its number of consecutive successes (0..5); the metric is their mean ("average length") plus the
i-in-a-row rates and per-subtask success.

The env needs calvin_env's interface: ``reset(robot_obs=, scene_obs=)``, ``get_obs()``, ``get_info()``,
``step(action) -> (obs, reward, done, info)``, observations with ``rgb_obs.rgb_static``/``rgb_gripper`` (policies
see them as ``static``/``gripper``, the names of :mod:`.cameras`) and ``robot_obs``. The steps go through the
shared rollout loop (:func:`omnistream_sim.rollout.run_episode`), so chunked policies execute their chunks open
loop, as everywhere else.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..conventions import calvin_env_action
from .cameras import named_images
from .sequences import CHAIN_LENGTH, EvalChain

EP_LEN = 360


class TaskOracle(Protocol):
    def get_task_info_for_set(self, start_info: dict, end_info: dict, task_filter: set) -> set: ...


def to_observation(calvin_obs: dict, instruction: str) -> dict[str, Any]:
    """calvin_env observation -> the harness's observation dict (``omnistream_sim.policy_protocol``)."""
    return {
        "images": named_images(calvin_obs.get("rgb_obs", {})),  # the names training reads (cameras.CAMERAS)
        "state": np.asarray(calvin_obs["robot_obs"], dtype=np.float32),
        "scene_obs": np.asarray(calvin_obs.get("scene_obs", ()), dtype=np.float32),
        "instruction": instruction,
    }


class SubtaskEnv:
    """One subtask as an episode for the rollout loop: ``step`` reports success from the task oracle.

    ``start_info`` is read just before the subtask's first step, i.e. after ``policy.reset()`` as in the
    official script (the rollout loop resets the policy; nothing moves the scene in between).
    """

    def __init__(self, env: Any, oracle: TaskOracle, subtask: str, instruction: str):
        self.env, self.oracle, self.subtask, self.instruction = env, oracle, subtask, instruction
        self.start_info: dict | None = None

    def first_observation(self) -> dict[str, Any]:
        return to_observation(self.env.get_obs(), self.instruction)

    def step(self, action: np.ndarray):
        if self.start_info is None:
            self.start_info = self.env.get_info()
        obs, _, _, info = self.env.step(action)
        solved = len(self.oracle.get_task_info_for_set(self.start_info, info, {self.subtask})) > 0
        return to_observation(obs, self.instruction), solved, solved, info


def evaluate_chain(
    env: Any,
    policy: Any,
    oracle: TaskOracle,
    chain: EvalChain,
    instructions: dict[str, str],
    *,
    ep_len: int = EP_LEN,
    seed: int = 0,
    record_video: bool = False,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Run one chain; returns its record (``completed`` = consecutive successes) and the static-camera frames."""
    from ..rollout import run_episode

    start = time.perf_counter()
    env.reset(robot_obs=np.array(chain.robot_obs), scene_obs=np.array(chain.scene_obs))  # copies: chains are cached
    completed, steps, frames = 0, [], []
    for position, subtask in enumerate(chain.subtasks):
        if subtask not in instructions:
            raise ValueError(f"no instruction for subtask {subtask!r} in the instructions file")
        episode = SubtaskEnv(env, oracle, subtask, instructions[subtask])
        if hasattr(policy, "set_episode_seed"):  # stochastic policies: one stream per (chain, subtask), shard-proof
            policy.set_episode_seed(seed + CHAIN_LENGTH * chain.index + position)
        result = run_episode(
            episode,
            policy,
            episode.first_observation(),
            max_steps=ep_len,
            convert=calvin_env_action,
            video_camera="static" if record_video else None,
        )
        frames.extend(result.frames)
        steps.append(result.steps)
        if not result.success:
            break
        completed += 1
    record = {
        "chain": chain.index,
        "task": chain.subtasks[0],
        "subtasks": list(chain.subtasks),
        "initial_state": dict(chain.initial_state),
        "completed": completed,
        "success": completed == len(chain.subtasks),
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return record, frames


def chain_success_rates(completed: Sequence[int], length: int = CHAIN_LENGTH) -> dict[str, float]:
    """``{"1": P(>=1 in a row), ..., "5": P(all 5)}``."""
    n = len(completed)
    return {str(i): sum(c >= i for c in completed) / n for i in range(1, length + 1)}


def summarize_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """CALVIN summary from per-chain records (also the summariser ``omnistream sim merge`` uses for shards).

    ``success_rate`` is the fraction of chains with all 5 subtasks solved (the 5-in-a-row rate); the number
    CALVIN papers report is ``avg_len``. ``per_task`` counts every attempt of a subtask, as the official
    script does: the solved ones of a chain and the one it stopped at.
    """
    if not records:
        raise ValueError("no chain records to summarise (did the evaluation run any chain?)")
    for i, r in enumerate(records):
        missing = [k for k in ("completed", "subtasks") if k not in r]
        if missing:
            raise ValueError(f"record {i} is not a CALVIN chain record (missing {missing})")
    commits = sorted({str(r["calvin_env_commit"]) for r in records if "calvin_env_commit" in r})
    if len(commits) > 1:
        raise ValueError(f"chains were run with different calvin_env commits {commits}; their numbers do not combine")
    completed = [int(r["completed"]) for r in records]
    per_task: dict[str, dict[str, Any]] = {}
    for r in records:
        attempted = r["subtasks"][: r["completed"] + 1]
        for position, task in enumerate(attempted):
            entry = per_task.setdefault(task, {"episodes": 0, "successes": 0})
            entry["episodes"] += 1
            entry["successes"] += int(position < r["completed"])
    for entry in per_task.values():
        entry["success_rate"] = entry["successes"] / entry["episodes"]
    rates = chain_success_rates(completed, max(len(r["subtasks"]) for r in records))
    full = sum(c == len(r["subtasks"]) for c, r in zip(completed, records))
    from ..report import wilson_interval

    return {
        "success_rate": full / len(records),
        "episodes": len(records),
        "successes": full,
        "success_rate_ci95": wilson_interval(full, len(records)),
        "avg_len": float(np.mean(completed)),
        "chain_success": rates,
        "per_task": dict(sorted(per_task.items())),
    }


def evaluate_chains(
    env: Any,
    policy: Any,
    oracle: TaskOracle,
    chains: Iterable[EvalChain],
    instructions: dict[str, str],
    *,
    ep_len: int = EP_LEN,
    seed: int = 0,
    videos: int = 0,
    video_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "calvin",
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Run chains in order with a progress bar showing the running i-in-a-row rates and average length.

    The static camera of the first ``videos`` chains goes to ``video_dir/chain_XXXX.mp4``, written as soon as
    the chain ends (a 5-subtask chain is up to 1800 frames; holding several in memory would be wasteful).
    """
    from tqdm import tqdm

    from ..video import write_video

    chains = list(chains)
    records: list[dict[str, Any]] = []
    video_paths: list[Path] = []
    bar = tqdm(chains, desc=desc, unit="chain", disable=not progress)
    for k, chain in enumerate(bar):
        record_video = video_dir is not None and k < videos
        record, frames = evaluate_chain(
            env, policy, oracle, chain, instructions, ep_len=ep_len, seed=seed, record_video=record_video
        )
        records.append(record)
        if record_video and frames:
            video_paths.append(write_video(frames, Path(video_dir) / f"chain_{chain.index:04d}.mp4", fps=30))
        done = [r["completed"] for r in records]
        rates = chain_success_rates(done)
        bar.set_postfix_str(
            " ".join(f"{i}:{rates[str(i)] * 100:.0f}%" for i in range(1, 6)) + f" len {np.mean(done):.2f}"
        )
    return records, video_paths
