"""Rerun files from the offline commands: `omnistream sim eval --rerun` (tabletop rollouts: images, actions,
success per episode) and `omnistream data view --rerun` (a LeRobot episode), read back with Rerun's reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("rerun", reason="rerun-sdk is not installed (requirements.txt: # visualisation)")

from omnistream_cli.main import main as cli_main  # noqa: E402
from omnistream_perception.visualization import read_rrd  # noqa: E402


def test_sim_eval_logs_every_rollout(tmp_path):
    out, rrd_path = tmp_path / "eval", tmp_path / "rollouts.rrd"
    args = ["sim", "eval", "--env", "tabletop", "--policy", "scripted", "--episodes", "2", "--max-steps", "12",
            "--image-size", "48", "--videos", "0", "--quiet", "--out", str(out), "--rerun", str(rrd_path)]  # fmt: skip
    assert cli_main(args) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    rrd = read_rrd(rrd_path)
    assert len(records) == 2
    for record in records:
        episode = f"rollouts/episode_{record['episode']:06d}"
        steps = record["steps"]
        # one image per observation (first and after each action), one action per executed step
        for camera in ("static", "wrist"):
            times, images = rrd.column(f"{episode}/{camera}", "EncodedImage:blob", "step")
            assert times == list(range(steps + 1)), camera
        times, actions = rrd.column(f"{episode}/action", "Scalars:scalars", "step")
        assert times == list(range(steps)) and all(len(a) == 7 for a in actions)
        assert all(abs(a[6]) == 1.0 for a in actions)  # the executed (converted) gripper command
        _, text = rrd.column(f"{episode}/instruction", "TextDocument:text", "episode", mono=True)
        assert text == [record["instruction"]]
    times, success = rrd.column("rollouts/success", "Scalars:scalars", "episode", mono=True)
    assert times == [r["episode"] for r in records]
    assert success == [float(r["success"]) for r in records]


def test_sim_eval_rerun_bad_use_is_a_user_error(tmp_path, capsys):
    base = ["sim", "eval", "--policy", "scripted", "--episodes", "1", "--out", str(tmp_path / "o")]
    assert cli_main([*base, "--rerun", str(tmp_path / "x.mp4")]) == 2
    assert cli_main([*base, "--env", "calvin", "--rerun", str(tmp_path / "x.rrd")]) == 2
    assert "--rerun needs --env tabletop" in capsys.readouterr().err


def _dataset(root, lengths=(3, 5)):
    from omnistream_train.lerobot_dataset import LeRobotDatasetWriter

    features = {
        "observation.images.front": {"dtype": "video", "shape": [24, 32, 3]},
        "observation.state": {"dtype": "float32", "shape": [2], "names": ["q0", "q1"]},
        "action": {"dtype": "float32", "shape": [7], "names": None},
    }
    with LeRobotDatasetWriter(root, fps=10, features=features) as writer:
        for e, length in enumerate(lengths):
            for i in range(length):
                writer.add_frame({
                    "observation.images.front": np.full((24, 32, 3), 20 * i + 40 * e, np.uint8),
                    "observation.state": np.array([i, e], np.float32),
                    "action": np.array([0.1 * i, e, 0, 0, 0, 0, 1], np.float32),
                    "task": f"task {e}",
                })  # fmt: skip
            writer.save_episode()


def test_data_view_logs_a_lerobot_episode(tmp_path, capsys):
    root, rrd_path = tmp_path / "ds", tmp_path / "ep1.rrd"
    _dataset(root)
    assert cli_main(["data", "view", str(root), "--episode", "1", "--rerun", str(rrd_path)]) == 0
    assert not list(tmp_path.glob("*.png"))  # --rerun alone writes no picture
    rrd = read_rrd(rrd_path)
    frames, _ = rrd.column("observation/images/front", "EncodedImage:blob", "frame")
    assert frames == list(range(5))
    times, actions = rrd.column("action", "Scalars:scalars", "time")
    assert [t.total_seconds() for t in times] == pytest.approx([i / 10 for i in range(5)], abs=1e-6)
    assert [a[0] for a in actions] == pytest.approx([0.1 * i for i in range(5)]) and actions[0][1] == 1.0
    _, names = rrd.column("observation/state", "SeriesLines:names")
    assert names == [["q0", "q1"]]
    _, task = rrd.column("task", "TextDocument:text", "frame", mono=True)
    assert task == ["task 1"]
    assert cli_main(["data", "view", str(root), "--episode", "1", "--rerun", str(tmp_path / "x.png")]) == 2
