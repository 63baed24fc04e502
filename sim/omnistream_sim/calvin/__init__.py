"""CALVIN ABC->D evaluation: the official long-horizon protocol on the real calvin_env simulator.

* :mod:`.sequences`  the 1000 evaluation chains and initial states (own implementation; equals
  ``../shared/calvin/eval_chains.json``);
* :mod:`.protocol`   the per-chain loop (reset, 5 subtasks x 360 steps, oracle success, stop at first failure)
  and the metrics (average length, i-in-a-row rates, per-task success);
* :mod:`.env`        building calvin_env from its own configs (``--calvin-env-root`` / ``$CALVIN_ENV_ROOT``);
* :func:`run_evaluation` the protocol over chains (``omnistream sim eval --env calvin`` calls it);
  :func:`merge_results` combines shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..report import shard_range
from .protocol import EP_LEN, chain_success_rates, evaluate_chain, evaluate_chains, summarize_records
from .sequences import NUM_CHAINS, EvalChain, fnv1_32, generate_chains, initial_env_state, state_seed

__all__ = [
    "EP_LEN",
    "NUM_CHAINS",
    "EvalChain",
    "chain_success_rates",
    "evaluate_chain",
    "evaluate_chains",
    "fnv1_32",
    "generate_chains",
    "initial_env_state",
    "load_instructions",
    "merge_results",
    "run_evaluation",
    "state_seed",
    "summarize_records",
]

# The validation instruction of every subtask (the first validation annotation, as the official script uses).
DEFAULT_INSTRUCTIONS = Path(__file__).resolve().parents[3].parent / "shared" / "calvin" / "validation_instructions.json"


def load_instructions(path: str | Path | None = None) -> dict[str, str]:
    """Subtask -> instruction; the default is ``../shared/calvin/validation_instructions.json``."""
    p = Path(path) if path else DEFAULT_INSTRUCTIONS
    if not p.is_file():
        raise ValueError(f"no CALVIN instructions file at {p} (a JSON object: subtask name -> instruction)")
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{p} must map subtask names to instruction strings")
    return data


def select_chains(chains: list[EvalChain], count: int | None, shard: tuple[int, int] = (0, 1)) -> list[EvalChain]:
    """The first ``count`` official chains (all 1000 by default), then the contiguous part of shard ``i/n``."""
    count = len(chains) if count is None else count
    if not 1 <= count <= len(chains):
        raise ValueError(f"--chains must be in 1..{len(chains)}, got {count}")
    start, stop = shard_range(count, shard)
    return chains[start:stop]


def run_evaluation(
    env: Any,
    oracle: Any,
    policy: Any,
    *,
    policy_name: str,
    chains: int | None = None,
    shard: tuple[int, int] = (0, 1),
    seed: int = 0,
    out_dir: str | Path | None = None,
    videos: int = 0,
    instructions: dict[str, str] | None = None,
    ep_len: int = EP_LEN,
    progress: bool = True,
    all_chains: list[EvalChain] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Evaluate ``policy`` on (a shard of) the official chains in ``env``; writes results when ``out_dir`` is set.

    ``env``/``oracle`` are calvin_env's (or, in tests, a scripted test double with the same interface).
    """
    import time

    from ..report import finish_results

    instructions = instructions if instructions is not None else load_instructions()
    source = all_chains if all_chains is not None else generate_chains()
    selected = select_chains(source, chains, shard)
    if not selected:
        raise ValueError(f"shard {shard[0]}/{shard[1]} of {chains} chains is empty")
    start = time.perf_counter()
    desc = f"calvin/{policy_name}" + (f" [{shard[0]}/{shard[1]}]" if shard[1] > 1 else "")
    records, videos_written = evaluate_chains(
        env,
        policy,
        oracle,
        selected,
        instructions,
        ep_len=ep_len,
        seed=seed,
        videos=videos,
        video_dir=Path(out_dir) / "videos" if out_dir is not None else None,
        progress=progress,
        desc=desc,
    )
    video_paths = [str(p.relative_to(out_dir)) for p in videos_written]
    if "calvin_env_commit" in extra:  # per record too, so merging shards of different commits is refused
        for r in records:
            r["calvin_env_commit"] = extra["calvin_env_commit"]
    total_steps = sum(sum(r["steps"]) for r in records)
    seconds = time.perf_counter() - start
    return finish_results(
        records,
        env="calvin",
        policy=policy_name,
        summarize=summarize_records,
        shard=shard,
        out_dir=out_dir,
        title=f"CALVIN ABC->D: {policy_name}",
        seed=seed,
        ep_len=ep_len,
        chains_total=chains if chains is not None else len(source),
        seconds=round(seconds, 2),
        ms_per_step=round(1000 * seconds / max(total_steps, 1), 2),
        **extra,
        videos=video_paths,
    )


def merge_results(paths: Iterable[str | Path], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Combine CALVIN shard results (``results.json`` files or their directories) into one; the summary
    (average length, i-in-a-row, per-task) is recomputed from the per-chain records."""
    from ..report import merge_results as merge

    return merge(paths, out_dir, summarize=summarize_records)  # the summariser refuses mixed calvin_env commits
