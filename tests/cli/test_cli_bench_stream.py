"""`omnistream` CLI: help lists the commands; `bench stream` prints a table and writes the JSON schema."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args, check=True):
    return subprocess.run(
        [sys.executable, "-m", "omnistream_cli.main", *args], capture_output=True, text=True, check=check
    )


def test_help_lists_subcommands():
    out = run("--help").stdout
    assert "bench" in out


def test_bench_stream_writes_the_documented_json(tmp_path):
    path = tmp_path / "bench.json"
    res = run(
        "bench",
        "stream",
        "--preset",
        "debug",
        "--resolution",
        "32",
        "--frames",
        "2,4",
        "--repeats",
        "1",
        "--json",
        str(path),
    )
    assert "speedup" in res.stdout
    report = json.loads(path.read_text())
    assert {"device", "preset", "resolution", "results"} <= set(report)
    assert [r["frames"] for r in report["results"]] == [2, 4]
    for r in report["results"]:
        assert {"frames", "stream_ms", "recompute_ms", "speedup", "stream_peak_mb", "recompute_peak_mb"} <= set(r)
        assert r["stream_ms"] > 0 and r["recompute_ms"] > 0 and r["speedup"] > 0


def test_bench_stream_window_bounds_the_cache(tmp_path):
    path = tmp_path / "w.json"
    run(
        "bench",
        "stream",
        "--preset",
        "debug",
        "--resolution",
        "32",
        "--frames",
        "3,20",
        "--window",
        "4",
        "--repeats",
        "1",
        "--no-recompute",
        "--json",
        str(path),
    )
    rows = json.loads(path.read_text())["results"]
    assert [r["cached_frames"] for r in rows] == [3, 4]  # frames resident after the T-th step


def test_bad_arguments_exit_non_zero_with_a_message():
    res = run("bench", "stream", "--frames", "a,b", check=False)
    assert res.returncode == 2 and "--frames must be comma-separated integers" in res.stderr
    res = run("bench", "stream", "--resolution", "100", check=False)
    assert res.returncode == 2 and "multiple of the patch size" in res.stderr


def test_version():
    assert run("--version").stdout.startswith("omnistream 0.")
