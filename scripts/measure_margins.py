#!/usr/bin/env python3
"""Runs the margin tests (pytest marker ``margin``) under several seeds and prints each checked value beside its bound.

A test whose verdict depends on a training run or a random draw must pass on any x86-64 CPU; another CPU takes
another trajectory, and other seeds show how far a trajectory can move. The rule this table checks: a bound asks for
at most half the worst effect measured, counted from the value of no effect (the test's ``baseline``: 1 for the factor
by which a loss falls, 0 for an error); an upper bound on an error is at least twice the worst error.

    .venv/bin/python scripts/measure_margins.py                 # seeds 0 1 2, tests that `make test` runs
    .venv/bin/python scripts/measure_margins.py --seeds 0 1 2 3 --runslow --json outputs/margins.json

Prints a table (and JSON with --json); exits 1 when a test failed or a bound has less than that margin.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(seeds: list[int], runslow: bool, extra: list[str]) -> tuple[list[dict], list[int]]:
    rows, failed = [], []
    for seed in seeds:
        with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as out:
            env = dict(os.environ, OMNISTREAM_TEST_SEED=str(seed), OMNISTREAM_MARGINS_FILE=out.name)
            cmd = [sys.executable, "-m", "pytest", "-q", "-m", "margin", "tests", "-p", "no:cacheprovider", *extra]
            if runslow:
                cmd.append("--runslow")
            print(f"seed {seed}: {' '.join(cmd[2:])}", flush=True)
            if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
                failed.append(seed)
            rows += [json.loads(line) for line in Path(out.name).read_text().splitlines() if line.strip()]
    return rows, failed


def summarise(rows: list[dict]) -> list[dict]:
    by_check: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_check[(row["test"], row["name"])].append(row)
    table = []
    for (test, name), checks in sorted(by_check.items()):
        higher = checks[0]["higher_is_better"]
        bound, base = checks[0]["bound"], checks[0].get("baseline", 0.0)
        values = {r["seed"]: r["value"] for r in checks}
        worst = min(values.values()) if higher else max(values.values())
        ok = bound - base <= (worst - base) / 2 if higher else bound - base >= (worst - base) * 2
        table.append({"test": test, "check": name, "values": values, "worst": worst, "bound": bound,
                      "baseline": base, "direction": ">=" if higher else "<=", "half_worst_rule": ok})  # fmt: skip
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runslow", action="store_true", help="include the slow margin tests (make test-all)")
    parser.add_argument("--json", default=None, help="also write the table here")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k vla)")
    args = parser.parse_args()
    rows, failed = run(args.seeds, args.runslow, args.pytest_args)
    table = summarise(rows)
    print(f"\n{'test :: check':<100} {'values by seed':<40} {'bound':>10} rule")
    for r in table:
        values = " ".join(f"{s}:{v:.4g}" for s, v in sorted(r["values"].items()))
        label = f"{r['test'].split('::')[-1]} :: {r['check']}"
        rule = "ok" if r["half_worst_rule"] else "TOO TIGHT"
        print(f"{label:<100} {values:<40} {r['direction']} {r['bound']:<7.4g} {rule}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"seeds": args.seeds, "failed_seeds": failed, "checks": table}, indent=2))
    if failed:
        print(f"pytest failed for seeds {failed}")
    return 1 if failed or not all(r["half_worst_rule"] for r in table) else 0


if __name__ == "__main__":
    sys.exit(main())
