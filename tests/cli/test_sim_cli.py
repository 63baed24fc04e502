"""`omnistream sim ...` end to end on the built-in tabletop."""

from __future__ import annotations

import json

import pytest

from omnistream_cli.main import main
from omnistream_sim.report import shard_range

pytest.importorskip("pybullet", reason="pybullet is not installed")


def test_eval_tabletop_scripted(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["sim", "eval", "--env", "tabletop", "--policy", "scripted", "--episodes", "4", "--out", str(out),
                 "--videos", "1", "--quiet", "--image-size", "64"])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["env"] == "tabletop" and results["policy"] == "scripted"
    assert results["episodes"] == 4 and results["success_rate"] == 1.0
    assert (out / "report.md").is_file() and len(results["videos"]) == 1
    assert "success 1.000 over 4 episodes" in capsys.readouterr().out


def test_shards_then_merge_equal_one_run(tmp_path):
    for i in range(2):
        code = main(["sim", "eval", "--policy", "scripted", "--episodes", "3", "--shard", f"{i}/2", "--quiet",
                     "--videos", "0", "--image-size", "48", "--out", str(tmp_path / f"s{i}")])  # fmt: skip
        assert code == 0
    assert main(["sim", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert [r["episode"] for r in merged["records"]] == [0, 1, 2]
    assert merged["shards"]["count"] == 2 and "shard" not in merged
    whole = tmp_path / "whole"
    assert main(["sim", "eval", "--policy", "scripted", "--episodes", "3", "--quiet", "--videos", "0",
                 "--image-size", "48", "--out", str(whole)]) == 0  # fmt: skip
    single = json.loads((whole / "results.json").read_text())
    assert [r["success"] for r in single["records"]] == [r["success"] for r in merged["records"]]
    assert [r["steps"] for r in single["records"]] == [r["steps"] for r in merged["records"]]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--policy", "expert"], "unknown policy"),
        (["--shard", "2/2"], "--shard"),
        (["--shard", "x"], "--shard"),
        (["--tasks", "fly_red"], "unknown tabletop task"),
        (["--episodes", "0"], "--episodes"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, argv, message):
    assert main(["sim", "eval", "--out", str(tmp_path), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_shard_ranges_cover_everything_once():
    for total in (1, 5, 30, 1000):
        for count in (1, 3, 7):
            ranges = [shard_range(total, (i, count)) for i in range(count)]
            covered = [x for start, stop in ranges for x in range(start, stop)]
            assert covered == list(range(total))


def test_demos_and_geometry_commands(tmp_path):
    assert main(["sim", "geometry", "--sequences", "1", "--frames", "3", "--image-size", "32",
                 "--out", str(tmp_path / "geo")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "geo" / "index.json").read_text())["sequences"][0]["frames"] == 3
    assert main(["sim", "demos", "--episodes", "1", "--tasks", "lift_blue", "--out", str(tmp_path / "demos")]) == 0
    index = json.loads((tmp_path / "demos" / "index.json").read_text())
    assert index["episodes"][0]["task"] == "lift_blue"
