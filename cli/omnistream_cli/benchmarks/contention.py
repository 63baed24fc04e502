"""`omnistream bench contention`: each workload quiet and beside a competing busy process, side by side.

A robot shares its CPU with drivers. This runs three workloads of the stack as the user would (each a fresh
``omnistream`` process, so the threading policy of ``omnistream_perception.cpu_threads`` applies as shipped), in
alternating pairs: quiet, then with ``--competitors`` busy processes spinning on the same cores. The figure is
loaded time / quiet time per pair (median over ``--repeats`` pairs); with one competitor on a 2-core machine, 2.0x
is what losing one of two cores costs.

Workloads (the figure each one reports):
* ``pretrain``: ``omnistream train pretrain --preset debug --max-steps 20``, wall time of the whole command;
* ``perception``: ``omnistream bench stream`` (``--preset`` at ``--resolution``, window 16), the streaming step;
* ``vla``: ``omnistream bench vla --preset debug``, one policy forward (projector + LLM + action head).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from omnistream_cli.errors import UserError

WORKLOADS = ("pretrain", "perception", "vla")
SPIN = "while True:\n    pass\n"


@dataclass
class Sample:
    seconds: float  # the workload's own figure (wall time or a step time), in seconds
    wall: float


def _omnistream(*args: str) -> list[str]:
    return [sys.executable, "-m", "omnistream_cli.main", *args]


def _run_workload(name: str, args, scratch: Path) -> Sample:
    report = scratch / f"{name}.json"
    if name == "pretrain":
        cmd = _omnistream("train", "pretrain", "--preset", "debug", "--max-steps", "20", "--no-progress",
                          "--out", str(scratch / "pretrain"))  # fmt: skip
    elif name == "perception":
        cmd = _omnistream("bench", "stream", "--preset", args.preset, "--resolution", str(args.resolution),
                          "--frames", "16", "--window", "16", "--no-recompute", "--repeats", "5",
                          "--json", str(report))  # fmt: skip
    else:
        cmd = _omnistream("bench", "vla", "--preset", "debug", "--repeats", "20", "--json", str(report))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise UserError(f"workload {name} failed (exit {proc.returncode}):\n{tail}")
    if name == "pretrain":
        return Sample(wall, wall)
    data = json.loads(report.read_text())
    if name == "perception":
        return Sample(data["results"][-1]["stream_ms"] / 1000.0, wall)
    return Sample(data["results"]["llm_forward_ms"] / 1000.0, wall)


def _competitors(count: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    time.sleep(0.5)  # let them reach their busy loop
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def measure(args, progress=None) -> dict:
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown or not workloads:
        raise UserError(f"--workloads takes a comma-separated subset of {', '.join(WORKLOADS)}, got {args.workloads!r}")
    if args.repeats < 1 or args.competitors < 1:
        raise UserError("--repeats and --competitors must be >= 1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="omnistream-contention-") as tmp:
        scratch = Path(tmp)
        _run_workload(workloads[0], args, scratch)  # warm the file cache (imports) before timing
        for name in workloads:
            quiet, loaded, ratios = [], [], []
            for _ in range(args.repeats):
                q = _run_workload(name, args, scratch)
                procs = _competitors(args.competitors)
                try:
                    lo = _run_workload(name, args, scratch)
                finally:
                    _stop(procs)
                quiet.append(q.seconds)
                loaded.append(lo.seconds)
                ratios.append(lo.seconds / q.seconds)
                if progress:
                    progress(name, len(ratios), args.repeats, q.seconds, lo.seconds)
            rows.append({
                "workload": name,
                "quiet_s": statistics.median(quiet),
                "loaded_s": statistics.median(loaded),
                "ratio_median": statistics.median(ratios),
                "ratio_max": max(ratios),
                "ratios": [round(r, 3) for r in ratios],
            })  # fmt: skip
    return rows


def run_contention_benchmark(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from omnistream_perception.cpu_threads import ENVIRONMENT_DEFAULTS, available_cores, default_threads

    from .report import write_json_report

    console = Console()
    policy = {key: os.environ.get(key, "(unset)") for key in ENVIRONMENT_DEFAULTS}
    policy.update(threads=default_threads(), cores=available_cores(), competitors=args.competitors)
    console.print(f"[bold]bench contention[/] {policy}; {args.repeats} quiet/loaded pairs per workload")

    def progress(name, i, n, q, lo):
        console.print(f"  {name} pair {i}/{n}: quiet {q * 1000:.1f} ms, loaded {lo * 1000:.1f} ms ({lo / q:.2f}x)",
                      highlight=False)  # fmt: skip

    rows = measure(args, progress)
    table = Table(title=f"loaded / quiet, {args.competitors} busy competitor(s) on {available_cores()} cores")
    for col in ("workload", "quiet ms", "loaded ms", "ratio (median)", "ratio (max)", f"<= {args.limit}"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["workload"], f"{r['quiet_s'] * 1000:.1f}", f"{r['loaded_s'] * 1000:.1f}",
                      f"{r['ratio_median']:.2f}x", f"{r['ratio_max']:.2f}x",
                      "yes" if r["ratio_median"] <= args.limit else "NO")  # fmt: skip
    console.print(table)
    write_json_report({"policy": policy, "limit": args.limit, "results": rows}, args.json_path, console)
    return 0
