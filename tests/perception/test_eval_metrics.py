"""Video-depth and trajectory metrics of the evaluation protocols, against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omnistream_perception.evaluation import (
    absolute_trajectory_error,
    align_trajectory,
    depth_metrics,
    pooled_depth_metrics,
    pooled_pose_metrics,
    pose_metrics,
    relative_pose_errors,
    umeyama_alignment,
)
from omnistream_perception.evaluation.formats import associate_timestamps, read_tum_trajectory, write_tum_trajectory


def test_per_sequence_scale_by_hand():
    gt = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 1.0, 2.0, 2.0])
    m = depth_metrics(pred, gt, align="per-sequence-scale")
    # median(gt) / median(pred) = 2.5 / 1.5; aligned = [5/3, 5/3, 10/3, 10/3]
    assert m["scale"] == pytest.approx(5 / 3)
    assert m["abs_rel"] == pytest.approx((2 / 3 + 1 / 6 + 1 / 9 + 1 / 6) / 4)
    assert m["delta1"] == pytest.approx(3 / 4)  # 5/3 vs 1 fails; 1.2, 1.11, 1.2 pass
    assert m["pixels"] == 4


def test_scale_shift_is_least_squares_by_hand():
    m = depth_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 4.0]), align="scale-shift")
    # s = cov(p, g) / var(p) = 3 / 2; t = mean(g) - s mean(p) = 8/3 - 3
    assert m["scale"] == pytest.approx(1.5) and m["shift"] == pytest.approx(-1 / 3)
    aligned = 1.5 * np.array([1.0, 2.0, 3.0]) - 1 / 3
    assert m["abs_rel"] == pytest.approx(np.mean(np.abs(aligned - [1, 3, 4]) / [1, 3, 4]))
    rng = np.random.default_rng(0)
    gt = rng.uniform(3.0, 10.0, (3, 5, 5))
    exact = depth_metrics(0.5 * gt - 1.0, gt, align="scale-shift")
    assert exact["abs_rel"] == pytest.approx(0.0, abs=1e-12) and exact["delta1"] == 1.0
    # the same affine error is not removed by a scale alone, nor by nothing
    assert depth_metrics(0.5 * gt - 1.0, gt, align="per-sequence-scale")["abs_rel"] > 0.01
    assert depth_metrics(0.5 * gt - 1.0, gt, align="metric")["abs_rel"] > 0.4


def test_invalid_pixels_cap_and_clip():
    gt = np.array([[0.0, np.nan, 2.0], [80.0, 10.0, 5.0]])
    pred = np.array([[3.0, 3.0, 2.0], [1.0, 0.0, 6.0]])  # the 0 prediction is invalid as well
    m = depth_metrics(pred, gt, align="metric", max_depth=70.0)
    assert m["pixels"] == 2  # 2 and 5 remain (80 m is beyond the cap)
    assert m["abs_rel"] == pytest.approx((0 + 1 / 5) / 2)
    clipped = depth_metrics(np.array([100.0, 50.0]), np.array([60.0, 50.0]), align="metric", clip_max=70.0)
    assert clipped["abs_rel"] == pytest.approx((10 / 60) / 2)
    with pytest.raises(ValueError, match="no valid pixels"):
        depth_metrics(np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="align must be"):
        depth_metrics(np.ones(3), np.ones(3), align="median-of-means")


def test_overall_weights_every_pixel_equally():
    a = {"abs_rel": 0.1, "delta1": 1.0, "rmse": 1.0, "pixels": 300}
    b = {"abs_rel": 0.5, "delta1": 0.0, "rmse": 3.0, "pixels": 100}
    o = pooled_depth_metrics([a, b])
    assert o["abs_rel"] == pytest.approx((0.1 * 300 + 0.5 * 100) / 400)
    assert o["delta1"] == pytest.approx(0.75)
    assert o["rmse"] == pytest.approx(math.sqrt((300 * 1 + 100 * 9) / 400))
    # the same as scoring all pixels at once (metric alignment, so nothing is fitted per sequence)
    rng = np.random.default_rng(1)
    g1, g2 = rng.uniform(1, 5, 30), rng.uniform(1, 5, 10)
    p1, p2 = g1 * rng.uniform(0.7, 1.3, 30), g2 * rng.uniform(0.5, 1.5, 10)
    rows = [depth_metrics(p1, g1, "metric"), depth_metrics(p2, g2, "metric")]
    together = depth_metrics(np.concatenate([p1, p2]), np.concatenate([g1, g2]), "metric")
    assert pooled_depth_metrics(rows)["abs_rel"] == pytest.approx(together["abs_rel"])


def _rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def test_umeyama_recovers_known_similarity():
    rng = np.random.default_rng(2)
    src = rng.normal(size=(25, 3))
    rot = _rotation([1.0, 2.0, -0.5], 0.9)
    dst = 2.5 * src @ rot.T + np.array([0.3, -1.0, 4.0])
    s, r, t = umeyama_alignment(src, dst)
    assert s == pytest.approx(2.5)
    np.testing.assert_allclose(r, rot, atol=1e-9)
    np.testing.assert_allclose(t, [0.3, -1.0, 4.0], atol=1e-9)
    s_rigid, r_rigid, _ = umeyama_alignment(src, dst, with_scale=False)
    assert s_rigid == 1.0 and np.allclose(r_rigid, rot, atol=1e-9)  # rotation is scale-free


def _line(n, step=1.0):
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, 0, 3] = step * np.arange(n)
    return poses


def test_ate_sim3_vs_se3_by_hand():
    gt = np.tile(np.eye(4), (4, 1, 1))
    gt[:, :3, 3] = [[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0]]
    pred = gt.copy()
    pred[:, :3, 3] *= 2.0
    assert pose_metrics(pred, gt, "sim3")["ate"] == pytest.approx(0.0, abs=1e-12)
    # rigid alignment cannot undo the factor 2: every centre is |g| = 1 m off
    assert pose_metrics(pred, gt, "se3")["ate"] == pytest.approx(1.0)
    assert absolute_trajectory_error(pred, gt, with_scale=False) == pytest.approx(1.0)
    aligned, scale = align_trajectory(pred, gt, "sim3")
    assert scale == pytest.approx(0.5) and np.allclose(aligned, gt)


def test_rpe_on_known_drift():
    gt = _line(6)
    drift = _line(6, step=1.1)  # 0.1 m too far every frame
    t_err, r_err = relative_pose_errors(drift, gt)
    np.testing.assert_allclose(t_err, 0.1, atol=1e-12)
    np.testing.assert_allclose(r_err, 0.0, atol=1e-6)
    m = pose_metrics(drift, gt, "se3")
    assert m["rpe_trans"] == pytest.approx(0.1) and m["rpe_rot"] == pytest.approx(0.0, abs=1e-6)

    # a heading that drifts 1 degree per frame along the true path: RPE rot 1 deg; the step, seen from the
    # rotated camera, misses by 2 sin(i / 2 deg) at frame i
    yaw = _line(6)
    for i in range(6):
        yaw[i, :3, :3] = _rotation([0, 0, 1], math.radians(i))
    t_err, r_err = relative_pose_errors(yaw, gt)
    np.testing.assert_allclose(r_err, 1.0, atol=1e-6)
    np.testing.assert_allclose(t_err, [2 * math.sin(math.radians(i) / 2) for i in range(5)], atol=1e-9)
    m = pose_metrics(yaw, gt, "se3")
    assert m["rpe_rot"] == pytest.approx(1.0, abs=1e-6)
    assert m["ate"] == pytest.approx(0.0, abs=1e-9)  # the centres are right


def test_pooled_pose_is_mean_over_sequences():
    rows = [{"ate": 0.1, "rpe_trans": 0.01, "rpe_rot": 1.0, "frames": 10},
            {"ate": 0.3, "rpe_trans": 0.03, "rpe_rot": 3.0, "frames": 90}]  # fmt: skip
    o = pooled_pose_metrics(rows)
    assert o["ate"] == pytest.approx(0.2) and o["rpe_rot"] == pytest.approx(2.0) and o["frames"] == 100


def test_tum_round_trip_and_quaternion_convention(tmp_path):
    poses = _line(3)
    poses[1, :3, :3] = _rotation([0, 0, 1], math.pi / 2)
    path = write_tum_trajectory(tmp_path / "t.txt", [0.5, 1.0, 1.5], poses)
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    qx, qy, qz, qw = (float(v) for v in lines[1].split()[4:])
    assert (qx, qy) == pytest.approx((0.0, 0.0), abs=1e-9)
    assert (qz, qw) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)))  # real part last
    back = read_tum_trajectory(path)
    np.testing.assert_allclose(back.poses, poses, atol=1e-8)
    np.testing.assert_allclose(back.timestamps, [0.5, 1.0, 1.5])
    (tmp_path / "bad.txt").write_text("0 1 2 3\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected 8 values"):
        read_tum_trajectory(tmp_path / "bad.txt")


def test_timestamp_association_is_one_to_one_closest_first():
    a = np.array([0.00, 0.10, 0.20, 0.30])
    b = np.array([0.011, 0.097, 0.105, 0.5])
    pairs = associate_timestamps(a, b, max_difference=0.02)
    # 0.10 takes 0.097 (closer than 0.105); 0.20 and 0.30 have nothing within 0.02 s
    assert pairs.tolist() == [[0, 0], [1, 1]]
