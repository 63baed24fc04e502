"""The depth-units rules that read ROS messages (CameraInfo, depth images, PointCloud2): lenses from a CameraInfo,
a CameraInfo of another size, the point cloud without invalid pixels, depth sensor images in millimetres and metres
paired by stamp, and metres on the tabletop from a sparse noisy depth sensor. The rules themselves, without
messages, are in perception/test_depth_units.py, whose helpers and fixtures these tests share."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sensor_msgs", reason="the ROS wheels are not installed (make setup)")

from test_depth_units import (  # noqa: E402  (shared helpers and fixtures)
    K640,
    LENSES,
    SEC,
    finish,
    geometry_checkpoint,  # noqa: F401  (a fixture of this module too)
    pose_of,
    result_of,
    session_of,
    sparse_noisy,
    tabletop_sequence,  # noqa: F401  (a fixture)
)

from omnistream_perception.camera_model import CameraModel  # noqa: E402
from omnistream_perception.camera_pipeline import CameraPipeline, Wanted  # noqa: E402
from omnistream_perception.depth_units import StreamGeometry, UnitsConfig, depth_image_metres, valid_depth  # noqa: E402


def camera_info(k: np.ndarray, width: int, height: int, model: str = "plumb_bob", d=(0.0,) * 5):
    from sensor_msgs.msg import CameraInfo

    info = CameraInfo(width=width, height=height, distortion_model=model, d=list(d), k=k.reshape(-1).tolist())
    info.r, info.p = np.eye(3).reshape(-1).tolist(), np.hstack([k, np.zeros((3, 1))]).reshape(-1).tolist()
    return info


def depth_msg(depth_m: np.ndarray, encoding: str = "16UC1", stamp_ns: int = 0):
    from omnistream_perception.ros.image import numpy_to_image

    if encoding == "16UC1":
        array = np.nan_to_num(np.round(depth_m * 1000.0), nan=0.0).astype(np.uint16)
    else:
        array = depth_m.astype(np.float32)
    msg = numpy_to_image(array, "32FC1" if encoding == "32FC1" else "16UC1")
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, SEC)
    return msg


def test_camera_info_lenses_we_cannot_undistort_are_refused_by_name():
    with pytest.raises(ValueError, match="equidistant"):
        CameraModel.from_camera_info(camera_info(K640, 640, 480, "equidistant", (0.1, 0.01, 0.0, 0.0)))
    with pytest.raises(ValueError, match="extra terms"):
        CameraModel.from_camera_info(camera_info(K640, 640, 480, "plumb_bob", (0.1, 0, 0, 0, 0, 0.2, 0, 0)))
    info = camera_info(K640, 640, 480, "plumb_bob", (0.1, 0, 0, 0, 0))
    info.binning_x = 2
    with pytest.raises(ValueError, match="binning"):
        CameraModel.from_camera_info(info)
    assert not CameraModel.from_camera_info(camera_info(K640, 640, 480, "", ())).distorted  # no model, D = 0


def test_a_camera_info_of_another_size_is_ignored_and_counted():
    geometry = StreamGeometry()
    camera, problem = geometry.camera(camera_info(K640, 640, 480), (240, 320))
    assert camera is None and "640x480" in problem and "320x240" in problem
    camera, problem = geometry.camera(camera_info(K640, 640, 480, "equidistant", (0.1, 0, 0, 0)), (480, 640))
    assert camera is None and "equidistant" in problem
    camera, problem = geometry.camera(camera_info(K640, 640, 480, *LENSES[0]), (480, 640))
    assert problem is None and camera.distorted and camera.distortion_model == "plumb_bob"
    assert geometry.diagnostics_values()["camera_info_ignored"] == 2


# -- invalid pixels --------------------------------------------------------------------------------------------------


def test_the_point_cloud_leaves_invalid_pixels_out():
    from omnistream_perception.depth_units import FrameGeometry
    from omnistream_perception.ros.pointcloud import pointcloud2_to_xyzrgb, xyzrgb_to_pointcloud2

    depth = np.full((4, 6), 2.0, np.float32)
    depth[1, 2] = depth[3, 5] = np.nan
    k = np.array([[5.0, 0, 2.5], [0, 5.0, 1.5], [0, 0, 1]])
    frame = FrameGeometry("metres", 1.0, depth, pose_of(0.3, (0, 1, 0), (1.0, 0, 0)), CameraModel.pinhole(k, 6, 4))
    points = frame.world_points()
    assert points.shape == (24, 3) and np.isnan(points).any(axis=1).sum() == 2
    cloud, _ = pointcloud2_to_xyzrgb(xyzrgb_to_pointcloud2(points))
    assert len(cloud) == 22 and np.isfinite(cloud).all()


# -- the world frame ---------------------------------------------------------------------------------------------------


def test_depth_sensor_images_in_millimetres_and_metres():
    depth = np.array([[0.5, np.nan], [1.25, 2.0]], np.float32)
    np.testing.assert_allclose(depth_image_metres(depth_msg(depth, "16UC1")), depth)  # 0 mm = no reading
    metres = depth.copy()
    metres[1, 1] = np.inf
    out = depth_image_metres(depth_msg(metres, "32FC1"))
    assert np.isnan(out[0, 1]) and np.isnan(out[1, 1]) and out[1, 0] == 1.25
    with pytest.raises(ValueError, match="16UC1"):
        from omnistream_perception.ros.image import numpy_to_image

        depth_image_metres(numpy_to_image(np.zeros((2, 2, 3), np.uint8), "rgb8"))


def test_depth_topic_withholds_metres_until_a_sensor_image_pairs_by_stamp():
    geometry = StreamGeometry(UnitsConfig("depth_topic", min_depth_confidence=1.0))
    predicted = np.full((24, 32), 0.5, np.float32)
    conf = np.full_like(predicted, 3.0)
    out = finish(geometry, result_of(0, predicted, conf, np.eye(4)), 1 * SEC)
    assert out.depth is None and out.pose is None and "withheld" in out.withheld
    geometry.sensor.add(3 * SEC, depth_msg(np.full((24, 32), 1.5), stamp_ns=3 * SEC))  # 1 s away: not this frame's
    out = finish(geometry, result_of(1, predicted, conf, np.eye(4)), 2 * SEC)
    assert out.depth is None and geometry.sensor_unmatched == 2  # frames 0 and 1
    geometry.sensor.add(4 * SEC + 10**7, depth_msg(np.full((24, 32), 1.5), stamp_ns=4 * SEC + 10**7))
    out = finish(geometry, result_of(2, predicted, conf, np.eye(4)), 4 * SEC)
    assert out.units == "metres" and out.scale == pytest.approx(3.0, rel=1e-3)
    np.testing.assert_allclose(out.depth, 1.5, rtol=1e-3)
    values = geometry.diagnostics_values()
    assert values["frames_without_scale"] == 2 and values["scale_measurements"] == 1
    finish(geometry, result_of(0, predicted, conf, np.eye(4)), 10 * SEC)  # a new stream: a new scale
    assert geometry.scale is None


# -- the tabletop: metres from a sparse noisy depth sensor -----------------------------------------------------------


@pytest.mark.margin
def test_tabletop_depth_in_metres_from_a_sparse_noisy_depth_sensor(geometry_checkpoint, tabletop_sequence, seed,  # noqa: F811
                                                                   margin):  # fmt: skip
    """The pipeline with ``depth_topic`` on the tabletop, fed the simulator's depth as a sensor sees it (40 % holes,
    1 % noise, 2 % wild readings), at 30 Hz stamps: the published depth is the ground truth's metres (its median
    ratio to it is 1), whatever the model's quality. Then the estimated scale recovers a known factor applied to the
    model's own depth (the same sensor defects), and the published depth is that factor times the model's."""
    rng = np.random.default_rng(seed)
    units = UnitsConfig("depth_topic", min_depth_confidence=1.0, scale_time_constant=0.2)
    pipeline = CameraPipeline("cam", session_of(geometry_checkpoint), units=units)
    worst_log_ratio = 0.0
    for i in range(len(tabletop_sequence)):
        stamp = 100 * SEC + i * SEC // 30
        truth = tabletop_sequence.gt_depth(i)
        pipeline.geometry.sensor.add(stamp, depth_msg(sparse_noisy(truth, rng), "16UC1", stamp))
        pipeline.prepare(stamp, truth.shape)
        frame = pipeline.finish(pipeline.run(tabletop_sequence.image(i), Wanted(depth=True)), None, truth.shape, stamp)
        assert frame.units == "metres" and frame.depth is not None
        worst_log_ratio = max(worst_log_ratio, abs(np.log(np.nanmedian(frame.depth / truth))))
    margin("tabletop |log median(published / ground truth)|", worst_log_ratio, 0.15, higher_is_better=False)

    factor = float(np.exp(rng.uniform(np.log(0.2), np.log(5.0))))
    pipeline.restart()
    worst_scale, worst_depth = 0.0, 0.0
    for i in range(len(tabletop_sequence)):
        stamp = 200 * SEC + i * SEC // 30
        pipeline.prepare(stamp, tabletop_sequence.gt_depth(i).shape)
        result = pipeline.run(tabletop_sequence.image(i), Wanted(depth=True))
        own = valid_depth(result.depth, result.confidence, units.min_depth_confidence)
        pipeline.geometry.sensor.add(stamp, depth_msg(sparse_noisy(factor * own, rng), "32FC1", stamp))
        frame = pipeline.finish(result, None, own.shape, stamp)
        worst_scale = max(worst_scale, abs(frame.scale / factor - 1))
        worst_depth = max(worst_depth, float(np.nanmax(np.abs(frame.depth / (factor * own) - 1))))
    margin("known factor: |scale / factor - 1|", worst_scale, 0.01, higher_is_better=False)
    margin("known factor: max |published / (factor x model depth) - 1|", worst_depth, 0.01, higher_is_better=False)
