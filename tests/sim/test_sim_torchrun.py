"""`torchrun --nproc-per-node K omnistream sim eval`: ranks split the episodes and rank 0 writes the merged results."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_torchrun

from omnistream_cli.main import main

TIMING = ("seconds", "policy_ms_per_step")


def _records(out: Path) -> list[dict]:
    results = json.loads((out / "results.json").read_text())
    return [{k: v for k, v in r.items() if k not in TIMING} for r in results["records"]]


def test_two_ranks_give_the_per_episode_results_of_one_process(tmp_path):
    argv = ["sim", "eval", "--env", "tabletop", "--policy", "scripted", "--episodes", "5", "--videos", "0", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    run_torchrun(*argv, "--out", str(tmp_path / "two"), timeout=300)
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["episode"] for r in two] == [0, 1, 2, 3, 4]
    assert two == one
    merged = json.loads((tmp_path / "two" / "results.json").read_text())
    assert merged["shards"]["count"] == 2 and merged["episodes"] == 5
    assert (tmp_path / "two" / "report.md").is_file()
    for rank in (0, 1):  # each rank's shard stays beside the merged files
        assert (tmp_path / "two" / "ranks" / f"rank-{rank}" / "results.json").is_file()


def test_shard_under_torchrun_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(["sim", "eval", "--env", "tabletop", "--episodes", "2", "--shard", "0/2", "--out", str(tmp_path)])
    assert code == 2
    assert "drop --shard" in capsys.readouterr().err
