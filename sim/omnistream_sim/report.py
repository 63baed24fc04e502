"""Evaluation results on disk: ``results.json`` (machine-readable) and ``report.md`` (a success table).

Every environment's evaluation ends here, so the files look the same for the tabletop, CALVIN and SimplerEnv.

``results.json`` holds at least::

    {
      "env": "tabletop", "policy": "scripted",
      "success_rate": 0.97, "episodes": 30, "successes": 29,
      "per_task": {"lift_red": {"episodes": 10, "successes": 10, "success_rate": 1.0}, ...},
      "records": [{"episode": 0, "task": "lift_red", "instruction": "...", "success": true, "steps": 41, ...}],
      ... environment-specific extras (CALVIN: "avg_len", "chain_success", "calvin_env_commit"; timings) ...
    }

``records`` are one dict per evaluated episode (or per chain for CALVIN); only ``success`` (bool) is required,
``task`` groups the per-task table. Shards written by ``--shard i/n`` are combined by :func:`merge_results`,
which concatenates the records and recomputes the summary with the environment's summariser (the default
one below, or a richer one passed in, e.g. CALVIN's average length).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"

Summarizer = Callable[[Sequence[dict[str, Any]]], dict[str, Any]]


def summarize_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall and per-task success from per-episode records (each needs a boolean ``success``)."""
    if not records:
        raise ValueError("no episode records to summarise (did the evaluation run any episode?)")
    for i, record in enumerate(records):
        if "success" not in record:
            raise ValueError(f"record {i} has no 'success' field: {sorted(record)}")
    per_task: dict[str, dict[str, Any]] = {}
    for record in records:
        task = str(record.get("task", "all"))
        entry = per_task.setdefault(task, {"episodes": 0, "successes": 0})
        entry["episodes"] += 1
        entry["successes"] += int(bool(record["success"]))
    for entry in per_task.values():
        entry["success_rate"] = entry["successes"] / entry["episodes"]
    successes = sum(int(bool(r["success"])) for r in records)
    return {
        "success_rate": successes / len(records),
        "episodes": len(records),
        "successes": successes,
        "success_rate_ci95": wilson_interval(successes, len(records)),
        "per_task": dict(sorted(per_task.items())),
    }


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a success rate: honest error bars for 30-episode evaluations."""
    if n <= 0:
        return [0.0, 1.0]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def shard_range(total: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Contiguous [start, stop) of shard ``(i, n)`` over ``total`` items (shard sizes differ by at most 1)."""
    index, parts = shard
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"shard must satisfy 0 <= i < n, got {index}/{parts}")
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def build_results(
    records: Sequence[dict[str, Any]],
    *,
    env: str,
    policy: str,
    summarize: Summarizer | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The results dict: identity (env, policy), the summary, any extras, then the records themselves."""
    summary = (summarize or summarize_records)(records)
    results: dict[str, Any] = {"env": env, "policy": policy}
    results.update(summary)
    results.update(extra)
    results["records"] = list(records)
    return results


def finish_results(
    records: Sequence[dict[str, Any]],
    *,
    env: str,
    policy: str,
    summarize: Summarizer | None = None,
    shard: tuple[int, int] = (0, 1),
    out_dir: str | Path | None = None,
    title: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The end of every evaluation: :func:`build_results`, the shard ``i/n`` it covers when the run is sharded,
    and the files (:func:`write_results`) when ``out_dir`` is given."""
    results = build_results(records, env=env, policy=policy, summarize=summarize, **extra)
    if shard[1] > 1:
        results["shard"] = f"{shard[0]}/{shard[1]}"
    if out_dir is not None:
        write_results(results, out_dir, title=title)
    return results


def write_results(results: dict[str, Any], out_dir: str | Path, *, title: str | None = None) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.md`` into ``out_dir`` (created); returns both paths."""
    for key in ("success_rate", "episodes"):
        if key not in results:
            raise ValueError(f"results need '{key}' (build them with build_results)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / RESULTS_FILE
    json_path.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    md_path = out / REPORT_FILE
    md_path.write_text(render_markdown(results, title=title))
    return json_path, md_path


def render_markdown(results: dict[str, Any], *, title: str | None = None) -> str:
    """A short human report: headline numbers, the per-task success table, extras, and the videos written."""
    env = results.get("env", "?")
    policy = results.get("policy", "?")
    lines = [f"# {title or f'Evaluation: {env} / {policy}'}", ""]
    lo, hi = results.get("success_rate_ci95", [None, None])
    ci = f" (95% CI {lo:.2f}-{hi:.2f})" if lo is not None else ""
    lines.append(
        f"**Success rate: {results['success_rate']:.3f}**{ci} over {results['episodes']} episodes "
        f"(env `{env}`, policy `{policy}`)."
    )
    lines.append("")
    per_task = results.get("per_task") or {}
    if per_task:
        lines += ["| task | episodes | successes | success rate |", "|---|---:|---:|---:|"]
        for task, entry in per_task.items():
            lines.append(f"| {task} | {entry['episodes']} | {entry['successes']} | {entry['success_rate']:.3f} |")
        lines.append(
            f"| **all** | {results['episodes']} | {results.get('successes', '')} | {results['success_rate']:.3f} |"
        )
        lines.append("")
    skip = {"env", "policy", "success_rate", "episodes", "successes", "success_rate_ci95", "per_task", "records"}
    extras = {k: v for k, v in results.items() if k not in skip and k != "videos"}
    if extras:
        lines += ["| field | value |", "|---|---|"]
        for key, value in extras.items():
            lines.append(f"| {key} | {_format_value(value)} |")
        lines.append("")
    videos = results.get("videos") or []
    if videos:
        lines.append("Rollout videos: " + ", ".join(f"[{Path(v).name}]({v})" for v in videos))
        lines.append("")
    return "\n".join(lines)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``results.json`` (or the directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} at {p} (run `omnistream sim eval ... --out DIR` first)")
    return json.loads(p.read_text())


def merge_results(
    shard_dirs: Iterable[str | Path],
    out_dir: str | Path | None = None,
    *,
    summarize: Summarizer | None = None,
) -> dict[str, Any]:
    """Combine shards of one evaluation: records are concatenated (sorted by their ``episode``/``chain`` index
    when present) and the summary is recomputed; extras equal in every shard are kept, differing ones are listed
    per shard under ``shards``. Shards must share env and policy. Writes the files when ``out_dir`` is given."""
    shards = [load_results(d) for d in shard_dirs]
    if not shards:
        raise ValueError("merge needs at least one shard directory")
    envs = {s.get("env") for s in shards}
    policies = {s.get("policy") for s in shards}
    if len(envs) > 1 or len(policies) > 1:
        raise ValueError(
            f"shards come from different evaluations: envs {sorted(map(str, envs))}, policies {sorted(map(str, policies))}"
        )
    records = [r for s in shards for r in s.get("records", [])]
    index_key = next((k for k in ("episode", "chain") if records and all(k in r for r in records)), None)
    if index_key is not None:
        records.sort(key=lambda r: r[index_key])
        indices = [r[index_key] for r in records]
        if len(set(indices)) != len(indices):
            raise ValueError(f"shards overlap: duplicate {index_key} indices (merge each shard once)")
    summary_keys = {"success_rate", "episodes", "successes", "success_rate_ci95", "per_task", "records"}
    extras: dict[str, Any] = {}
    differing: dict[str, list[Any]] = {}
    for key in dict.fromkeys(k for s in shards for k in s):
        if key in summary_keys or key in ("env", "policy", "shards"):
            continue
        values = [s.get(key) for s in shards]
        if all(v == values[0] for v in values):
            extras[key] = values[0]
        elif key == "videos":
            extras[key] = [v for vs in values for v in (vs or [])]
        else:
            differing[key] = values
    merged = build_results(records, env=shards[0]["env"], policy=shards[0]["policy"], summarize=summarize, **extras)
    merged.pop("shard", None)
    merged["shards"] = {"count": len(shards), **differing}
    if out_dir is not None:
        write_results(merged, out_dir, title=f"Evaluation: {merged['env']} / {merged['policy']} (merged)")
    return merged


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        text = json.dumps(value, default=_json_default)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(value)


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths show up in records; keep results.json plain JSON.
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
