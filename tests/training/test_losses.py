"""Each pretraining loss on small cases whose value can be worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from omnistream_train.geometry_targets import normalised_geometry_targets
from omnistream_train.losses import (
    depth_confidence_loss,
    dino_loss,
    geometry_loss,
    gram_loss,
    ibot_loss,
    koleo_loss,
    masked_l1,
    sinkhorn_knopp,
)
from omnistream_train.synthetic import SyntheticTabletopStandIn


# -- KoLeo ----------------------------------------------------------------------------------------------
def test_koleo_of_square_corners_is_minus_log_sqrt2():
    # four unit vectors at 0, 90, 180, 270 degrees: every nearest neighbour is sqrt(2) away
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert koleo_loss(pts).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-5)


def test_koleo_normalises_and_punishes_close_points():
    spread = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # distance 2 -> -log 2
    assert koleo_loss(spread * 5).item() == pytest.approx(-math.log(2), abs=1e-5)
    close = torch.tensor([[1.0, 0.0], [math.cos(0.01), math.sin(0.01)]])
    assert koleo_loss(close).item() > 4.0  # -log(~0.01)
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.ones(1, 3))


# -- Gram anchoring -------------------------------------------------------------------------------------
def test_gram_of_identical_features_is_zero():
    x = torch.randn(2, 5, 8)
    assert gram_loss(x, x).item() == 0.0
    assert gram_loss(x, 3 * x).item() == pytest.approx(0.0, abs=1e-10)  # rows are L2-normalised first


def test_gram_hand_case():
    student = torch.eye(2)[None]  # orthogonal patches: Gram = I
    anchor = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # identical patches: Gram = all ones
    assert gram_loss(student, anchor).item() == pytest.approx(0.5)  # two of four entries differ by 1


# -- depth with confidence ------------------------------------------------------------------------------
def test_depth_loss_constant_offset_with_confidence():
    gt = torch.rand(1, 1, 4, 5) + 1
    pred = gt + 1.0  # |error| = 1 everywhere, gradients identical
    conf = torch.full_like(gt, 2.0)
    got = depth_confidence_loss(pred, gt, conf, alpha=0.5)
    assert got.item() == pytest.approx(2.0 - 0.5 * math.log(2.0), abs=1e-5)


def test_depth_loss_gradient_term():
    gt = torch.zeros(1, 2, 3)
    pred = torch.tensor([[[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]])  # mean |D| = 1, x-gradient error 1, y 0
    got = depth_confidence_loss(pred, gt, torch.ones_like(gt), alpha=0.3)
    assert got.item() == pytest.approx(2.0, abs=1e-6)


def test_depth_loss_ignores_invalid_pixels_and_rewards_confidence_only_where_right():
    gt = torch.ones(1, 2, 2)
    pred = gt.clone()
    pred[0, 0, 0] = 100.0
    valid = torch.ones_like(gt, dtype=torch.bool)
    valid[0, 0, 0] = False
    assert depth_confidence_loss(pred, gt, torch.ones_like(gt), valid).item() == pytest.approx(0.0, abs=1e-6)
    # with a correct prediction, higher confidence lowers the loss (-alpha log c); with a wrong one it raises it
    right = depth_confidence_loss(gt, gt, torch.full_like(gt, 3.0)) < depth_confidence_loss(gt, gt, torch.ones_like(gt))
    wrong = depth_confidence_loss(gt + 1, gt, torch.full_like(gt, 3.0)) > depth_confidence_loss(
        gt + 1, gt, torch.ones_like(gt)
    )
    assert bool(right) and bool(wrong)


def test_masked_l1_broadcasts_validity_over_channels():
    pred = torch.zeros(1, 2, 2, 3)
    target = torch.ones(1, 2, 2, 3)
    target[0, 0, 0] = 10
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    valid[0, 0, 0] = False
    assert masked_l1(pred, target, valid).item() == pytest.approx(1.0)


# -- DINO / iBOT / Sinkhorn-Knopp -----------------------------------------------------------------------
def test_dino_loss_sanity():
    k = 8
    target = torch.nn.functional.one_hot(torch.tensor([3, 5]), k).float()
    confident = torch.full((2, k), -10.0)
    confident[0, 3] = confident[1, 5] = 10.0
    assert dino_loss(confident, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dino_loss(torch.zeros(2, k), target).item() == pytest.approx(math.log(k), abs=1e-6)  # uniform student
    wrong = confident.roll(1, dims=1)
    assert dino_loss(wrong, target).item() > 100


def test_sinkhorn_knopp_balances_prototypes():
    torch.manual_seed(0)
    logits = torch.randn(64, 4)
    logits[:, 0] += 3.0  # a prototype every sample prefers: plain softmax would collapse onto it
    q = sinkhorn_knopp(logits, temperature=1.0, iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)  # rows are distributions
    assert torch.allclose(q.sum(0), torch.full((4,), 16.0), atol=1e-2)  # each prototype used N/K times
    assert torch.softmax(logits, 1).sum(0)[0] > 40  # whereas softmax piles onto prototype 0


def test_ibot_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    student = torch.randn(2, 4, 6)
    teacher = torch.softmax(torch.randn(2, 4, 6), -1)
    masks = torch.tensor([[True, False, True, False], [False, False, False, True]])
    base = ibot_loss(student, teacher, masks)
    changed = student.clone()
    changed[~masks] = 100 * torch.randn_like(changed[~masks])
    assert ibot_loss(changed, teacher, masks).item() == pytest.approx(base.item(), abs=1e-6)
    # per view mean, then mean over views
    v0 = dino_loss(student[0, [0, 2]], teacher[0, [0, 2]])
    v1 = dino_loss(student[1, [3]], teacher[1, [3]])
    assert base.item() == pytest.approx(((v0 + v1) / 2).item(), abs=1e-6)
    assert ibot_loss(student, teacher, torch.zeros_like(masks)).item() == 0.0


# -- geometry targets + loss ----------------------------------------------------------------------------
def test_geometry_targets_are_scale_free_and_consistent():
    item = SyntheticTabletopStandIn(sequences=1, frames=3, size=24, seed=1)[0]
    depth, k, c2w = item["depth"][None], item["intrinsics"][None], item["cam_to_world"][None]
    t1 = normalised_geometry_targets(depth, k, c2w)
    scaled = c2w.clone()
    scaled[..., :3, 3] *= 3.0
    t3 = normalised_geometry_targets(depth * 3.0, k, scaled)
    for key in ("depth", "rays", "points", "pose_enc"):
        assert torch.allclose(t1[key], t3[key], atol=1e-4), key
    assert t3["scale"].item() == pytest.approx(3 * t1["scale"].item(), rel=1e-5)
    # the first camera is the world frame: identity quaternion (xyzw), zero translation
    assert torch.allclose(t1["pose_enc"][0, 0, :7], torch.tensor([0, 0, 0, 1.0, 0, 0, 0]), atol=1e-5)
    # points = origin + depth * direction, and their mean distance to the first camera is 1
    rebuilt = t1["rays"][..., :3] + t1["depth"][..., None] * t1["rays"][..., 3:]
    assert torch.allclose(rebuilt, t1["points"], atol=1e-5)
    assert t1["points"].norm(dim=-1).mean().item() == pytest.approx(1.0, abs=1e-4)


def test_geometry_loss_zero_for_perfect_prediction_up_to_confidence_term():
    item = SyntheticTabletopStandIn(sequences=1, frames=2, size=16, seed=2)[0]
    t = normalised_geometry_targets(item["depth"][None], item["intrinsics"][None], item["cam_to_world"][None])
    pred = {
        "depth": t["depth"],
        "depth_conf": torch.ones_like(t["depth"]),
        "rays": t["rays"],
        "points": t["points"],
        "pose_enc": t["pose_enc"],
    }
    terms = geometry_loss(pred, t)
    assert terms["geo"].item() == pytest.approx(0.0, abs=1e-6)
    pred["pose_enc"] = t["pose_enc"] + 0.5
    assert geometry_loss(pred, t)["camera"].item() == pytest.approx(0.5, abs=1e-6)


def test_geometry_targets_reject_bad_shapes():
    with pytest.raises(ValueError, match="expected depth"):
        normalised_geometry_targets(torch.ones(2, 8, 8), torch.eye(3).expand(2, 3, 3), torch.eye(4).expand(2, 4, 4))
