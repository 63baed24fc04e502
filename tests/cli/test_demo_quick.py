"""`omnistream demo --quick`: every stage of the main job runs end to end on tiny settings (the real figures come
from `make demo`; here only the plumbing and the report's contents are checked), and a second run reuses the
trained checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

REPORT_KEYS = {
    "success_rate",
    "success_rate_swapped_instructions",
    "episodes",
    "depth_abs_rel",
    "depth_delta1",
    "pose_ate",
    "perception_ms_per_frame",
    "vla_ms_per_step",
    "train_minutes",
    "stage_minutes",
    "seed",
    "checkpoints",
}


def test_quick_demo_runs_every_stage_and_reuses_checkpoints(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "omnistream_cli.main", "demo", "--quick", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert 0.0 <= report["success_rate"] <= 1.0 and report["episodes"] >= 1
    assert report["seed"] == 0 and set(report["stage_minutes"]) == {
        "data",
        "pretrain",
        "vla",
        "perception_eval",
        "closed_loop",
    }
    assert report["perception"]["stream_equals_recompute"], report["perception"]["stream_vs_recompute_max_abs_diff"]
    for picture in ("depth.png", "trajectory.png", "success.png"):
        assert (out / "figures" / picture).stat().st_size > 1000, picture
    assert "| task |" in (out / "report.md").read_text()

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "pretrain: cached" in second.stdout and "vla: cached" in second.stdout
