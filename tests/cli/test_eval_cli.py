"""`omnistream eval depth|pose|stream`: results.json, report.md and pictures; bad input is a one-line error (exit 2);
`eval stream --dataset tabletop` gives the demo's perception figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from omnistream_cli.main import main
from omnistream_perception.evaluation.formats import write_depth_dir, write_tum_trajectory


def _depth_dirs(tmp_path):
    rng = np.random.default_rng(0)
    gt_a, gt_b = rng.uniform(1, 10, (3, 8, 10)), rng.uniform(1, 10, (2, 8, 10))
    gt_b[0, :4] = 0.0  # 40 invalid pixels
    write_depth_dir(tmp_path / "gt", "seq_a", gt_a)
    write_depth_dir(tmp_path / "gt", "seq_b", gt_b)
    write_depth_dir(tmp_path / "pred", "seq_a", 3.0 * gt_a)  # a pure scale error
    write_depth_dir(tmp_path / "pred", "seq_b", 2.0 * gt_b * rng.uniform(0.8, 1.2, gt_b.shape))
    return gt_a, gt_b


def test_eval_depth_writes_results_report_and_pictures(tmp_path, capsys):
    gt_a, gt_b = _depth_dirs(tmp_path)
    out = tmp_path / "out"
    assert (
        main(["eval", "depth", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out)]) == 0
    )
    results = json.loads((out / "results.json").read_text())
    rows = {r["sequence"]: r for r in results["depth"]["sequences"]}
    assert rows["seq_a"]["abs_rel"] == pytest.approx(0.0, abs=1e-6) and rows["seq_a"]["scale"] == pytest.approx(1 / 3)
    assert rows["seq_b"]["pixels"] == 2 * 80 - 40 and rows["seq_b"]["abs_rel"] > 0.01
    overall = results["depth"]["overall"]
    assert overall["pixels"] == 240 + 120
    assert overall["abs_rel"] == pytest.approx(rows["seq_b"]["abs_rel"] * 120 / 360, rel=1e-6)
    assert "| **overall**" in (out / "report.md").read_text()
    assert (out / "depth_errors.png").stat().st_size > 1000
    assert "AbsRel" in capsys.readouterr().out

    main(["eval", "depth", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out),
          "--align", "metric"])  # fmt: skip
    metric = json.loads((out / "results.json").read_text())["depth"]
    assert {r["sequence"]: r for r in metric["sequences"]}["seq_a"]["abs_rel"] == pytest.approx(2.0)
    assert metric["settings"]["align"] == "metric"


def test_eval_depth_protocol_cap(tmp_path):
    gt = np.full((1, 4, 4), 10.0)
    gt[0, 0] = 90.0  # beyond Sintel's 70 m cap
    write_depth_dir(tmp_path / "gt", "s", gt)
    write_depth_dir(tmp_path / "pred", "s", gt)
    out = tmp_path / "out"
    main(["eval", "depth", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out),
          "--protocol", "sintel"])  # fmt: skip
    depth = json.loads((out / "results.json").read_text())["depth"]
    assert depth["overall"]["pixels"] == 12 and depth["settings"]["max_depth"] == 70.0


def test_eval_depth_errors_say_what_to_fix(tmp_path, capsys):
    _depth_dirs(tmp_path)
    (tmp_path / "pred" / "seq_b" / "000001.npy").unlink()
    code = main(
        ["eval", "depth", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "seq_b" in err and "000001.npy" in err and "Traceback" not in err
    assert main(["eval", "depth", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path / "gt")]) == 2
    assert "prediction directory" in capsys.readouterr().err


def _rot_z(angle):
    return np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])


def _trajectory(n=20):
    poses = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        poses[i, :3, :3] = _rot_z(0.05 * i)
        poses[i, :3, 3] = [math.cos(0.2 * i), math.sin(0.2 * i), 0.02 * i]
    return poses


def test_eval_pose_sim3_and_se3(tmp_path, capsys):
    gt = _trajectory()
    stamps = 100.0 + np.arange(len(gt)) / 30
    sim = np.tile(np.eye(4), (len(gt), 1, 1))  # the same path in another frame, at 0.4x scale
    rot, shift = _rot_z(1.0), np.array([5.0, -2.0, 0.3])
    sim[:, :3, :3] = rot @ gt[:, :3, :3]
    sim[:, :3, 3] = 0.4 * gt[:, :3, 3] @ rot.T + shift
    write_tum_trajectory(tmp_path / "gt" / "walk.txt", stamps, gt)
    write_tum_trajectory(tmp_path / "pred" / "walk.txt", stamps + 0.004, sim)  # stamps off by 4 ms
    out = tmp_path / "out"
    assert (
        main(["eval", "pose", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out)]) == 0
    )
    pose = json.loads((out / "results.json").read_text())["pose"]
    assert pose["overall"]["ate"] == pytest.approx(0.0, abs=1e-6)
    assert pose["overall"]["rpe_rot"] == pytest.approx(0.0, abs=1e-4)
    assert pose["sequences"][0]["scale"] == pytest.approx(2.5)
    assert (out / "trajectories.png").stat().st_size > 1000 and "ATE" in (out / "report.md").read_text()

    # single files and a rigid alignment: the 0.4x scale is now an error
    main(["eval", "pose", "--pred", str(tmp_path / "pred" / "walk.txt"), "--gt", str(tmp_path / "gt" / "walk.txt"),
          "--align", "se3", "--out", str(out)])  # fmt: skip
    assert json.loads((out / "results.json").read_text())["pose"]["overall"]["ate"] > 0.1

    (tmp_path / "pred" / "walk.txt").write_text("100.0 1 2 3 0 0 0\n")
    assert (
        main(["eval", "pose", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out)]) == 2
    )
    assert "walk.txt:1: expected 8 values" in capsys.readouterr().err
    write_tum_trajectory(tmp_path / "pred" / "walk.txt", stamps + 1.0, sim)
    assert (
        main(["eval", "pose", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out)]) == 2
    )
    assert "--max-time-diff" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from omnistream_perception.model import OmniStreamModel
    from omnistream_perception.model.heads import GeometryHeads, GeometryHeadsConfig

    directory = tmp_path_factory.mktemp("ckpt")
    model = OmniStreamModel.from_preset("debug")
    model.save_pretrained(directory)
    c = model.config
    GeometryHeads(GeometryHeadsConfig.for_backbone(c.hidden_size, c.depth, "tiny")).save_pretrained(directory)
    return directory


def test_eval_stream_tabletop_gives_the_demos_figures(checkpoint, tmp_path, capsys):
    from omnistream_cli.demo import DemoConfig, stage_perception
    from omnistream_perception.evaluation.datasets import TABLETOP_HELDOUT_SEED
    from omnistream_sim.tabletop.data import generate_geometry_sequences

    cfg = DemoConfig(heldout_sequences=1, heldout_frames=3)
    heldout = tmp_path / "heldout"
    generate_geometry_sequences(cfg.heldout_sequences, cfg.heldout_frames, seed=cfg.seed + TABLETOP_HELDOUT_SEED,
                                out_dir=heldout, progress=False)  # fmt: skip
    (tmp_path / "demo" / "figures").mkdir(parents=True)
    demo = stage_perception(cfg, checkpoint, heldout, tmp_path / "demo" / "figures")
    assert demo["stream_equals_recompute"], demo["stream_vs_recompute_max_abs_diff"]
    assert (tmp_path / "demo" / "figures" / "depth.png").is_file()

    out = tmp_path / "eval"
    code = main(["eval", "stream", "--checkpoint", str(checkpoint), "--dataset", "tabletop", "--tabletop-sequences",
                 "1", "--tabletop-frames", "3", "--no-progress", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    for key in ("depth_abs_rel", "depth_delta1", "pose_ate", "pose_rpe_trans", "pose_rpe_rot"):
        assert results[key] == pytest.approx(demo[key], rel=1e-9, abs=1e-12), key
    assert results["depth"]["overall"]["pixels"] == 3 * 128 * 128  # every tabletop pixel has depth
    assert (out / "depth_errors.png").is_file() and (out / "trajectories.png").is_file()


def test_eval_stream_errors(checkpoint, tmp_path, capsys):
    assert main(["eval", "stream", "--checkpoint", str(checkpoint), "--dataset", "sintel"]) == 2
    assert "needs --root" in capsys.readouterr().err
    assert main(["eval", "stream", "--checkpoint", str(tmp_path / "none"), "--dataset", "tabletop"]) == 2
    assert "not a directory" in capsys.readouterr().err
    code = main(["eval", "stream", "--checkpoint", str(checkpoint), "--dataset", "bonn", "--root", str(tmp_path)])
    assert code == 2 and "Bonn" in capsys.readouterr().err


def _sintel_sample(root, frames=3):
    from PIL import Image

    from omnistream_perception.evaluation.formats import write_sintel_camera, write_sintel_depth

    rng = np.random.default_rng(3)
    k = np.array([[40.0, 0, 15.5], [0, 40.0, 11.5], [0, 0, 1]])
    gt = {}
    for seq in ("alley_1", "alley_2"):  # alley_2 is scored for pose as well
        depths = rng.uniform(2.0, 90.0, (frames, 24, 32)).astype(np.float32)  # some beyond the 70 m cap
        gt[seq] = depths
        for i in range(frames):
            name = f"frame_{i + 1:04d}"
            for sub in ("final", "depth", "camdata_left"):
                (root / "training" / sub / seq).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
                root / "training" / "final" / seq / f"{name}.png"
            )
            write_sintel_depth(root / "training" / "depth" / seq / f"{name}.dpt", depths[i])
            pose = np.eye(4)
            pose[:3, 3] = [0.3 * i, 0.05 * i * i, 0.1]
            write_sintel_camera(root / "training" / "camdata_left" / seq / f"{name}.cam", k, pose)
    return gt


def test_eval_stream_on_a_dataset_matches_eval_depth_and_pose_on_its_predictions(checkpoint, tmp_path):
    gt = _sintel_sample(tmp_path / "sintel")
    out = tmp_path / "eval"
    code = main(["eval", "stream", "--checkpoint", str(checkpoint), "--dataset", "sintel", "--root",
                 str(tmp_path / "sintel"), "--sequences", "all", "--save-predictions", "--no-progress",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    streamed = json.loads((out / "results.json").read_text())
    assert [r["sequence"] for r in streamed["depth"]["sequences"]] == ["alley_1", "alley_2"]
    assert [r["sequence"] for r in streamed["pose"]["sequences"]] == ["alley_1", "alley_2"]
    assert streamed["depth"]["settings"] == {"align": "per-sequence-scale", "max_depth": 70.0, "clip_max": 70.0}
    valid = sum(int((d < 70.0).sum()) for d in gt.values())
    assert streamed["depth"]["overall"]["pixels"] == valid

    for seq, depths in gt.items():
        write_depth_dir(tmp_path / "gt_depth", seq, depths)
    main(["eval", "depth", "--pred", str(out / "predictions" / "depth"), "--gt", str(tmp_path / "gt_depth"),
          "--protocol", "sintel", "--out", str(tmp_path / "d")])  # fmt: skip
    offline = json.loads((tmp_path / "d" / "results.json").read_text())["depth"]["overall"]
    assert offline["abs_rel"] == pytest.approx(streamed["depth"]["overall"]["abs_rel"], rel=1e-6)
    assert offline["delta1"] == pytest.approx(streamed["depth"]["overall"]["delta1"], rel=1e-6)

    from omnistream_perception.evaluation.datasets import read_sintel

    (seq,) = read_sintel(tmp_path / "sintel", "pose", sequences=["alley_2"])
    write_tum_trajectory(tmp_path / "gt_poses" / "alley_2.txt", seq.timestamps, seq.cam_to_world)
    main(["eval", "pose", "--pred", str(out / "predictions" / "poses" / "alley_2.txt"), "--gt",
          str(tmp_path / "gt_poses" / "alley_2.txt"), "--out", str(tmp_path / "p")])  # fmt: skip
    pose = json.loads((tmp_path / "p" / "results.json").read_text())["pose"]["overall"]
    for key in ("ate", "rpe_trans", "rpe_rot"):
        assert pose[key] == pytest.approx(streamed["pose"]["overall"][key], rel=1e-5, abs=1e-7), key


def test_eval_depth_resizes_predictions_to_the_ground_truth(tmp_path):
    gt = np.full((2, 8, 12), 4.0)
    write_depth_dir(tmp_path / "gt", "s", gt)
    write_depth_dir(tmp_path / "pred", "s", np.full((2, 4, 6), 2.0))  # half resolution, half the depth
    assert main(["eval", "depth", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    depth = json.loads((tmp_path / "o" / "results.json").read_text())["depth"]
    assert depth["overall"]["pixels"] == 2 * 8 * 12 and depth["overall"]["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert depth["sequences"][0]["scale"] == pytest.approx(2.0)


def test_the_earlier_evaluate_sequences_api_still_works(checkpoint):
    from types import SimpleNamespace

    from omnistream_perception.evaluation import evaluate_sequences, session_config
    from omnistream_perception.perception import PerceptionSession

    rng = np.random.default_rng(5)
    poses = np.tile(np.eye(4), (3, 1, 1))
    poses[:, 0, 3] = [0.0, 0.1, 0.2]
    seq = SimpleNamespace(rgb=rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8),
                          depth=rng.uniform(0.5, 2.0, (3, 32, 32)), cam_to_world=poses, seed=7)  # fmt: skip
    session = PerceptionSession.from_config(session_config(str(checkpoint)))
    out = evaluate_sequences(session, [seq], progress=False)
    assert out["sequences"][0]["frames"] == 3 and 0.0 <= out["depth_delta1"] <= 1.0 and out["pose_ate"] >= 0.0
