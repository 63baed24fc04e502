"""Geometry heads: shapes and conventions, save/load beside the backbone, clear errors without heads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from omnistream_perception.model import OmniStreamModel
from omnistream_perception.model.geometry import (
    depth_to_world_points,
    fov_from_intrinsics,
    intrinsics_from_fov,
    matrix_to_pose_encoding,
    matrix_to_quaternion,
    pose_encoding_to_matrix,
    quaternion_to_matrix,
)
from omnistream_perception.model.heads import GeometryHeads, GeometryHeadsConfig, MissingHeadsError
from omnistream_perception.perception import PerceptionConfig, PerceptionSession


def random_rotation(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return quaternion_to_matrix(q)


def test_quaternion_round_trip_and_orthonormality():
    rot = random_rotation(64)
    assert torch.allclose(rot @ rot.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(64, 3, 3), atol=1e-12)
    assert torch.allclose(quaternion_to_matrix(matrix_to_quaternion(rot)), rot, atol=1e-10)
    # identity is (0, 0, 0, 1) in xyzw
    assert torch.allclose(matrix_to_quaternion(torch.eye(3)), torch.tensor([0.0, 0, 0, 1]))


def test_fov_intrinsics_round_trip_and_principal_point_at_centre():
    fov = torch.tensor([math.radians(50), math.radians(70)])
    k = intrinsics_from_fov(fov, 480, 640)
    assert k[0, 2] == 319.5 and k[1, 2] == 239.5  # OpenCV/ROS pixel centres
    assert torch.allclose(fov_from_intrinsics(k, 480, 640), fov)


def test_pose_encoding_round_trip():
    c2w = torch.eye(4, dtype=torch.float64).repeat(5, 1, 1)
    c2w[:, :3, :3] = random_rotation(5, seed=1)
    c2w[:, :3, 3] = torch.randn(5, 3, dtype=torch.float64)
    k = intrinsics_from_fov(torch.tensor([1.0, 1.2], dtype=torch.float64), 48, 64).expand(5, 3, 3)
    enc = matrix_to_pose_encoding(c2w, k, 48, 64)
    assert enc.shape == (5, 9)
    assert torch.allclose(pose_encoding_to_matrix(enc), c2w, atol=1e-10)


def test_back_projected_points_reproject_to_their_pixels():
    k = intrinsics_from_fov(torch.tensor([1.0, 1.2], dtype=torch.float64), 6, 8)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = random_rotation(1, seed=2)[0]
    c2w[:3, 3] = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    depth = 1 + torch.rand(6, 8, dtype=torch.float64)
    pts = depth_to_world_points(depth, k, c2w)
    cam = (pts - c2w[:3, 3]) @ c2w[:3, :3]  # world -> camera
    assert torch.allclose(cam[..., 2], depth)
    uv = (cam @ k.T)[..., :2] / cam[..., 2:]
    v, u = torch.meshgrid(torch.arange(6), torch.arange(8), indexing="ij")
    assert torch.allclose(uv[..., 0], u.double()) and torch.allclose(uv[..., 1], v.double())


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    OmniStreamModel.from_preset("debug").save_pretrained(tmp_path)
    GeometryHeads(GeometryHeadsConfig.for_backbone(64, 2)).save_pretrained(tmp_path)
    return tmp_path


def test_heads_outputs_and_conventions(tiny_checkpoint):
    model = OmniStreamModel.from_pretrained(tiny_checkpoint)
    heads = GeometryHeads.from_pretrained(tiny_checkpoint)
    clip = torch.randn(2, 3, 3, 32, 48)
    with torch.no_grad():
        out = model(clip, camera_token=True, output_hidden_states=heads.layers)
        pred = heads(out, (32, 48))
    assert pred["depth"].shape == (2, 3, 32, 48) and (pred["depth"] > 0).all()
    assert (pred["depth_conf"] > 1).all()
    assert pred["rays"].shape == (2, 3, 32, 48, 6)
    assert torch.allclose(pred["points"], pred["rays"][..., :3] + pred["depth"][..., None] * pred["rays"][..., 3:])
    assert pred["pose_enc"].shape == (2, 3, 9)
    assert torch.allclose(pred["pose_enc"][..., :4].norm(dim=-1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="output_hidden_states"):
        heads(model(clip), (32, 48))


def test_heads_round_trip_beside_the_backbone(tiny_checkpoint, tmp_path_factory):
    heads = GeometryHeads.from_pretrained(tiny_checkpoint)
    other = tmp_path_factory.mktemp("copy")
    heads.save_pretrained(other)
    again = GeometryHeads.from_pretrained(other)
    for (k, a), (_, b) in zip(heads.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_missing_heads_say_how_to_get_them(fixture_a):
    assert not GeometryHeads.present(fixture_a)
    with pytest.raises(MissingHeadsError, match="omnistream train heads"):
        GeometryHeads.from_pretrained(fixture_a)


def test_perception_session_with_and_without_heads(tiny_checkpoint, fixture_a):
    session = PerceptionSession.from_config(PerceptionConfig(checkpoint=str(tiny_checkpoint)))
    assert session.has_heads
    rgb = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    first = session.process(rgb, want_points=True)
    second = session.process(rgb, want_points=True)
    assert (first.frame_index, second.frame_index) == (0, 1)
    assert second.depth.shape == (50, 70) and second.points.shape == (50 * 70, 3)
    assert second.pose.shape == (4, 4) and np.allclose(second.pose[3], [0, 0, 0, 1])
    assert second.intrinsics[0, 2] == 34.5 and second.intrinsics[1, 2] == 24.5
    # 50x70 -> multiples of 32 (patch 16 x pooling 2) -> 32x64 -> grid 2x4 -> pooled 1x2
    assert second.grid == (1, 2) and second.patch_tokens.shape == (1, 2, 64) and second.patch_tokens.dtype == np.float16
    # nothing asked, nothing computed
    lean = session.process(rgb, want_depth=False, want_pose=False)
    assert lean.depth is None and lean.pose is None

    features_only = PerceptionSession.from_config(PerceptionConfig(checkpoint=str(fixture_a), feature_pooling=1))
    res = features_only.process(rgb)
    assert not features_only.has_heads and res.depth is None and res.pose is None and res.camera_token is None
    assert res.patch_tokens.shape == (3, 4, 64)
    with pytest.raises(ValueError, match="uint8"):
        features_only.process(rgb.astype(np.float32))
