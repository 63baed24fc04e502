"""What the published depth, points and pose mean, without ROS nodes: intrinsics resizing (the training code's
convention), lens undistortion, CameraInfo of another size ignored, NaN for invalid pixels, the first pose exactly
the identity, the scale (none / fixed / a depth sensor) and, on the tabletop, metres from a sparse noisy depth
sensor.

The model is the authors' tiny fixture with random geometry heads whose outputs are spread out on purpose
(depth, confidence and pose vary across pixels and frames); the metric checks do not depend on its quality."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from omnistream_perception.camera_model import CameraModel, distort, rescale_intrinsics, rescale_pixel, undistort
from omnistream_perception.camera_pipeline import CameraPipeline, Wanted
from omnistream_perception.depth_units import (
    MIN_SCALE_PIXELS,
    SCALE_FREE,
    ScaleEstimator,
    StreamGeometry,
    UnitsConfig,
    depth_topic_name,
    invert_pose,
    valid_depth,
)
from omnistream_perception.perception import PerceptionConfig, PerceptionResult, PerceptionSession

SEC = 1_000_000_000
K640 = np.array([[600.0, 0.0, 319.5], [0.0, 600.0, 239.5], [0.0, 0.0, 1.0]])
# a RealSense-like plumb_bob lens, a strong barrel lens, and a wide rational_polynomial one
LENSES = [
    ("plumb_bob", (0.12, -0.25, 0.001, -0.0007, 0.1)),
    ("plumb_bob", (-0.28, 0.07, 0.001, -0.0005, 0.0)),
    ("rational_polynomial", (2.1, 0.5, 0.001, 0.0003, 0.01, 2.4, 1.0, 0.1)),
]


def save_spread_heads(fixture_a, directory):
    """The fixture backbone with random tiny heads, spread out: depth and confidence vary across the image, the pose
    is far from the identity (untrained heads start at the identity pose and almost flat depth)."""
    from omnistream_perception.model import OmniStreamModel
    from omnistream_perception.model.heads import GeometryHeads, GeometryHeadsConfig

    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixture_a / name, directory / name)
    config = OmniStreamModel.from_pretrained(fixture_a).config
    torch.manual_seed(0)
    heads = GeometryHeads(GeometryHeadsConfig.for_backbone(config.hidden_size, config.depth, "tiny"))
    with torch.no_grad():
        heads.depth_head.head_out[-1].weight.mul_(30)
        torch.nn.init.normal_(heads.camera_head.mlp[-1].weight, std=0.3)
    heads.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def geometry_checkpoint(fixture_a, tmp_path_factory):
    return save_spread_heads(fixture_a, tmp_path_factory.mktemp("spread_heads"))


def session_of(checkpoint) -> PerceptionSession:
    return PerceptionSession.from_config(PerceptionConfig(str(checkpoint)))


def rotation_angle_deg(pose: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(pose[:3, :3]) - 1) / 2, -1.0, 1.0))))


def result_of(frame_index: int, depth=None, confidence=None, pose=None, intrinsics=None) -> PerceptionResult:
    return PerceptionResult(frame_index, (1, 1), np.zeros((1, 1, 4), np.float16), np.zeros(4, np.float32), None,
                            depth=depth, confidence=confidence, pose=pose, intrinsics=intrinsics)  # fmt: skip


def finish(geometry: StreamGeometry, result: PerceptionResult, stamp_ns: int, info=None):
    size = result.depth.shape if result.depth is not None else (1, 1)
    return geometry.finish(result, info, size, stamp_ns)


def pose_of(angle: float, axis, t) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    x = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    pose = np.eye(4)
    pose[:3, :3] = np.eye(3) + np.sin(angle) * x + (1 - np.cos(angle)) * x @ x
    pose[:3, 3] = t
    return pose


# -- intrinsics: one resize convention --------------------------------------------------------------------------------
def test_rescaled_intrinsics_keep_pixel_centres_and_are_the_training_codes():
    from omnistream_train import data as training_data

    half = rescale_intrinsics(K640, 0.5, 0.5)  # 640x480 -> 320x240: the image centre stays the image centre
    np.testing.assert_allclose(half, [[300.0, 0, 159.5], [0, 300.0, 119.5], [0, 0, 1]])
    assert rescale_pixel(0.0, 2.0) == 0.5  # the first pixel of a 2x upsample sits a quarter of a source pixel in
    odd = rescale_intrinsics(K640, 224 / 640, 160 / 480)  # the processor's aspect-changing resize
    assert odd[0, 2] == pytest.approx((319.5 + 0.5) * 224 / 640 - 0.5) and odd[1, 2] == pytest.approx(79.5)
    assert training_data.rescale_intrinsics is rescale_intrinsics  # the training data resize uses the same helper
    as_torch = rescale_intrinsics(torch.tensor(K640), 0.5, 0.25)
    assert as_torch.dtype == torch.float32
    np.testing.assert_allclose(as_torch.numpy(), rescale_intrinsics(K640, 0.5, 0.25), rtol=1e-6)


# -- lens distortion ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "d"), LENSES)
def test_undistortion_inverts_the_lens_model(model, d):
    camera = CameraModel(K640, 640, 480, model, d)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-0.5, 0.5, 5000), rng.uniform(-0.38, 0.38, 5000)  # the 640x480 image's field of view
    ux, uy = undistort(*distort(x, y, camera.coefficients), camera.coefficients)
    assert np.abs(ux - x).max() < 1e-10 and np.abs(uy - y).max() < 1e-10
    # back-projected pixels project (with the lens) onto themselves; points are off the pinhole rays
    depth = np.full((480, 640), 2.0)
    points = camera.backproject(depth, stride=8)
    xd, yd = distort(points[..., 0] / points[..., 2], points[..., 1] / points[..., 2], camera.coefficients)
    u, v = K640[0, 0] * xd + K640[0, 2], K640[1, 1] * yd + K640[1, 2]
    rows, cols = np.mgrid[0:480:8, 0:640:8]
    assert np.abs(u - cols).max() < 1e-6 and np.abs(v - rows).max() < 1e-6
    pinhole = CameraModel.pinhole(K640, 640, 480).backproject(depth, stride=8)
    assert np.abs(points - pinhole).max() > 0.01  # 1 cm at 2 m: the lens matters


def test_invalid_pixels_are_nan_from_the_heads_confidence():
    depth = np.array([[1.0, 2.0, 3.0], [np.inf, -1.0, 5e3]], np.float32)
    confidence = np.array([[1.2, 1.5, 9.0], [9.0, 9.0, 9.0]], np.float32)
    out = valid_depth(depth, confidence, 1.5)
    np.testing.assert_array_equal(np.isnan(out), [[True, False, False], [True, True, True]])
    assert out[0, 1] == 2.0 and out[0, 2] == 3.0
    assert np.isnan(valid_depth(depth, confidence, 1.0)).sum() == 3  # 1.0 keeps every confidence (always > 1)


def test_poses_are_relative_to_the_streams_first_pose_which_is_exactly_the_identity():
    geometry = StreamGeometry()
    first, second = pose_of(0.01, (1, 2, 3), (0.01, -0.005, 0.012)), pose_of(0.3, (0, 1, 0), (0.2, 0.0, 0.1))
    out0 = finish(geometry, result_of(0, pose=first), 0)
    assert np.array_equal(out0.pose, np.eye(4))
    out1 = finish(geometry, result_of(1, pose=second), SEC)
    np.testing.assert_allclose(out1.pose, invert_pose(first) @ second, atol=1e-12)
    assert out0.units == SCALE_FREE and out1.scale is None
    out = finish(geometry, result_of(0, pose=second), 2 * SEC)  # a new stream: a new world
    assert np.array_equal(out.pose, np.eye(4))


def test_the_first_pose_of_a_stream_through_the_pipeline_is_the_identity(geometry_checkpoint):
    session = session_of(geometry_checkpoint)
    pipeline = CameraPipeline("cam", session)
    rgb = [np.random.default_rng(i).integers(0, 256, (64, 96, 3), dtype=np.uint8) for i in range(3)]
    raw = session_of(geometry_checkpoint)
    expected = [raw.process(x, want_depth=False, want_pose=True).pose for x in rgb]
    assert rotation_angle_deg(expected[0]) > 1.0  # the raw first pose is not the identity
    poses = []
    for i, x in enumerate(rgb):
        pipeline.prepare(i * SEC, x.shape[:2])
        # only features wanted for frame 0: its pose is still computed, it is the world frame
        wanted = Wanted(features=True) if i == 0 else Wanted(pose=True)
        poses.append(pipeline.finish(pipeline.run(x, wanted), None, x.shape[:2], i * SEC).pose)
    assert np.array_equal(poses[0], np.eye(4))
    np.testing.assert_allclose(poses[2], invert_pose(expected[0]) @ expected[2], atol=1e-5)
    pipeline.restart()
    pipeline.prepare(5 * SEC, rgb[2].shape[:2])
    assert np.array_equal(
        pipeline.finish(pipeline.run(rgb[2], Wanted(pose=True)), None, (64, 96), 5 * SEC).pose, np.eye(4)
    )


# -- units ----------------------------------------------------------------------------------------------------------------
def test_units_config_and_topics():
    assert depth_topic_name("none") == "depth_scale_free" and depth_topic_name("fixed") == "depth"
    assert depth_topic_name("depth_topic") == "depth"
    with pytest.raises(ValueError, match="scale > 0"):
        UnitsConfig("fixed", 0.0)
    with pytest.raises(ValueError, match="scale_source"):
        UnitsConfig("metres")


def test_fixed_scale_gives_metres_for_depth_pose_translation_and_points():
    geometry = StreamGeometry(UnitsConfig("fixed", 2.5, min_depth_confidence=1.0))
    depth = np.full((4, 6), 0.8, np.float32)
    k = np.array([[5.0, 0, 2.5], [0, 5.0, 1.5], [0, 0, 1]])
    first, second = np.eye(4), pose_of(0.2, (0, 0, 1), (0.1, 0.2, -0.3))
    finish(geometry, result_of(0, depth, np.full_like(depth, 3.0), first, k), 0)
    out = finish(geometry, result_of(1, depth, np.full_like(depth, 3.0), second, k), SEC)
    assert out.units == "metres" and out.scale == 2.5
    np.testing.assert_allclose(out.depth, 2.0)
    np.testing.assert_allclose(out.pose[:3, 3], 2.5 * second[:3, 3])
    np.testing.assert_allclose(out.pose[:3, :3], second[:3, :3])
    centre = out.world_points().reshape(4, 6, 3)[1, 2]  # near the principal point: 2 m in front of the camera
    np.testing.assert_allclose(centre, second[:3, :3] @ [-0.2, -0.2, 2.0] + 2.5 * second[:3, 3], atol=1e-5)
    values = geometry.diagnostics_values()
    assert values["units"] == "metres" and values["scale_m_per_unit"] == "2.5"


def test_scale_free_units_say_so():
    geometry = StreamGeometry()
    out = finish(geometry, result_of(0, np.ones((2, 2), np.float32), np.full((2, 2), 3.0)), 0)
    assert out.units == "scale-free" and out.scale is None and out.withheld is None
    np.testing.assert_allclose(out.depth, 1.0)
    assert geometry.diagnostics_values()["units"] == "scale-free"
    assert geometry.diagnostics_values()["scale_m_per_unit"] == ""


# -- the scale from a depth sensor ---------------------------------------------------------------------------------------
def sparse_noisy(depth_m: np.ndarray, rng: np.random.Generator, holes: float = 0.4, noise: float = 0.01):
    """A depth sensor's view of ``depth_m``: holes (0 = no reading), multiplicative noise, a few wild outliers."""
    out = depth_m * (1 + noise * rng.standard_normal(depth_m.shape))
    out[rng.random(depth_m.shape) < holes] = np.nan
    wild = rng.random(depth_m.shape) < 0.02
    out[wild] = rng.uniform(0.2, 10.0, int(wild.sum()))
    return out.astype(np.float32)


def test_the_scale_is_the_robust_median_ratio():
    rng = np.random.default_rng(0)
    predicted = rng.uniform(0.5, 2.0, (48, 64)).astype(np.float32)
    estimator = ScaleEstimator(time_constant_s=0.0)
    assert estimator.update(sparse_noisy(3.7 * predicted, rng), predicted, 0.0) == pytest.approx(3.7, rel=0.01)
    # a sensor of half the resolution (same view) is read at its own pixel centres
    half = (3.7 * predicted).reshape(24, 2, 32, 2).mean(axis=(1, 3))
    ratio, pixels = estimator.frame_ratio(half, predicted)
    assert pixels == 24 * 32 and ratio == pytest.approx(3.7, rel=0.1)
    with pytest.raises(ValueError, match="aspect ratio"):
        estimator.frame_ratio(np.ones((48, 48)), predicted)
    empty = np.full_like(predicted, np.nan)
    empty.ravel()[: MIN_SCALE_PIXELS - 1] = 1.0
    assert estimator.update(empty, predicted, 1.0) is None and estimator.scale == pytest.approx(3.7, rel=0.01)


def test_the_scale_follows_a_step_with_its_time_constant_and_restarts_with_the_stream():
    predicted = np.ones((16, 16), np.float32)
    estimator = ScaleEstimator(time_constant_s=1.0)
    estimator.update(2.0 * predicted, predicted, 10.0)
    assert estimator.scale == pytest.approx(2.0)
    estimator.update(4.0 * predicted, predicted, 11.0)  # one time constant later: 63 % of the way (in log)
    assert np.log(estimator.scale / 2.0) / np.log(2.0) == pytest.approx(1 - np.exp(-1), rel=1e-9)
    for t in np.arange(11.1, 20.0, 0.1):
        estimator.update(4.0 * predicted, predicted, t)
    assert estimator.scale == pytest.approx(4.0, rel=1e-3)
    estimator.reset()
    assert estimator.scale is None
    estimator.update(3.0 * predicted, predicted, 30.0)
    assert estimator.scale == pytest.approx(3.0)


@pytest.fixture(scope="module")
def tabletop_sequence(seed):
    from omnistream_perception.evaluation.datasets import TABLETOP_HELDOUT_SEED, tabletop_eval_sequence
    from omnistream_sim.tabletop.data import generate_geometry_sequences

    seq = generate_geometry_sequences(1, frames=10, seed=TABLETOP_HELDOUT_SEED + seed, image_size=64, progress=False)
    return tabletop_eval_sequence(seq[0], 0)
