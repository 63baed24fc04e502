"""Perception metrics on hand-checkable cases."""

from __future__ import annotations

import numpy as np
import pytest

from omnistream_perception.evaluation import absolute_trajectory_error, depth_metrics, relative_to_first


def test_depth_metrics_hand_values():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])  # the zero is invalid
    pred = np.array([[1.1, 2.0], [2.0, 5.0]])
    m = depth_metrics(pred, gt, align="none")
    assert m["pixels"] == 3
    assert m["abs_rel"] == pytest.approx((0.1 + 0 + 0.5) / 3)
    assert m["delta1"] == pytest.approx(2 / 3)  # 4 vs 2 fails the 1.25 ratio


def test_median_alignment_removes_a_global_scale():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 3.0, (4, 8, 8))
    m = depth_metrics(gt * 7.5, gt, align="median")
    assert m["abs_rel"] == pytest.approx(0.0, abs=1e-12) and m["delta1"] == 1.0
    assert m["scale"] == pytest.approx(1 / 7.5)
    with pytest.raises(ValueError, match="shape"):
        depth_metrics(gt[0], gt)


def _poses(n, rng):
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, 3] = np.cumsum(rng.normal(size=(n, 3)) * 0.1, axis=0)
    return poses


def test_ate_is_zero_under_similarity_and_grows_with_noise():
    rng = np.random.default_rng(1)
    gt = _poses(20, rng)
    angle = 0.7
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    pred = gt.copy()
    pred[:, :3, 3] = 3.0 * gt[:, :3, 3] @ rot.T + np.array([1.0, -2.0, 0.5])
    assert absolute_trajectory_error(pred, gt) == pytest.approx(0.0, abs=1e-9)
    noisy = pred.copy()
    noisy[:, :3, 3] += rng.normal(size=(20, 3)) * 0.3
    assert absolute_trajectory_error(noisy, gt) > 0.01


def test_relative_to_first_starts_at_identity():
    rng = np.random.default_rng(2)
    poses = _poses(5, rng)
    poses[:, :3, 3] += 4.0
    rel = relative_to_first(poses)
    assert np.allclose(rel[0], np.eye(4))
    assert np.allclose(rel[3, :3, 3], poses[3, :3, 3] - poses[0, :3, 3])
