"""perception_node's units and invalid pixels with real rclpy topics: no ``~/depth`` without a scale (depth goes on
``~/depth_scale_free``), metres with a fixed scale, NaN where the heads' confidence is low, a CameraInfo of another
size ignored (warned, counted on /diagnostics) and one with a lens republished with the depth, and metres on the
tabletop from a sparse noisy depth sensor on ``depth_sensor``.

The model is the fixture backbone with spread-out random heads (``test_depth_units.save_spread_heads``)."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy is not installed (make setup)")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseStamped  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from ros_helpers import wait_for  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402
from test_depth_units import K640, LENSES, save_spread_heads, sparse_noisy  # noqa: E402
from test_depth_units_messages import camera_info, depth_msg  # noqa: E402

from omnistream_perception.depth_units import invert_pose  # noqa: E402
from omnistream_perception.perception import PerceptionConfig, PerceptionSession  # noqa: E402
from omnistream_perception.ros.image import rgb_to_image  # noqa: E402
from omnistream_perception.ros.perception_node import PerceptionNode  # noqa: E402
from omnistream_perception.ros.pointcloud import pointcloud2_to_xyzrgb  # noqa: E402
from omnistream_perception.ros.rerun_bridge import depth_array  # noqa: E402

pytestmark = pytest.mark.ros

H, W = 64, 96
_names = itertools.count()


@pytest.fixture(scope="module")
def ros_context():
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope="module")
def checkpoint(fixture_a, tmp_path_factory):
    return save_spread_heads(fixture_a, tmp_path_factory.mktemp("spread_heads_node"))


def rgb_of(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def image_msg(rgb: np.ndarray, sec: int, nanosec: int = 0) -> Image:
    msg = rgb_to_image(rgb)
    msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id = sec, nanosec, "cam"
    return msg


class Node:
    """perception_node and a tester node on one executor in a thread."""

    def __init__(self, context, checkpoint, **params):
        params = {"checkpoint": str(checkpoint), "diagnostics_period": 0.2, **params}
        self.name = f"units_{next(_names)}"
        self.node = PerceptionNode(node_name=self.name, context=context,
                                   parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])  # fmt: skip
        self.tester = rclpy.create_node(f"tester_{self.name}", context=context)
        self.executor = MultiThreadedExecutor(context=context)
        for node in (self.node, self.tester):
            self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.pubs: dict[str, object] = {}
        self.diagnostics = self.subscribe("/diagnostics", DiagnosticArray, absolute=True)

    def subscribe(self, topic: str, msg_type, absolute: bool = False) -> list:
        received: list = []
        self.tester.create_subscription(msg_type, topic if absolute else f"/{self.name}/{topic}", received.append, 10)
        return received

    def publish(self, msg, topic: str = "image") -> None:
        if topic not in self.pubs:
            self.pubs[topic] = self.tester.create_publisher(type(msg), topic, 10)
            wait_for(lambda: self.pubs[topic].get_subscription_count() > 0, what=f"the node to subscribe to {topic}")
        self.pubs[topic].publish(msg)

    def wait_matched(self, *keys: str) -> None:
        for key in keys:
            pub = self.node.cameras["camera"].publishers[key]
            wait_for(lambda pub=pub: pub.get_subscription_count() > 0, what=f"the {key} subscription to match")

    def status_values(self, key: str, accept=lambda value: True) -> dict[str, str]:
        """The camera's latest /diagnostics values once they carry ``key`` with a value ``accept`` takes (the values
        follow the frames on a timer)."""
        found: dict[str, str] = {}

        def seen() -> bool:
            for array in reversed(self.diagnostics):
                for status in array.status:
                    values = {kv.key: kv.value for kv in status.values}
                    if status.name == f"{self.name}: camera" and key in values and accept(values[key]):
                        found.update(values)
                        return True
            return False

        wait_for(seen, what=f"/diagnostics with {key}")
        return found

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=5)
        self.node.destroy_node()
        self.tester.destroy_node()


@pytest.fixture
def start(ros_context):
    made: list[Node] = []

    def make(checkpoint, **params) -> Node:
        made.append(Node(ros_context, checkpoint, **params))
        return made[-1]

    yield make
    for n in made:
        n.close()


def bare_results(checkpoint, frames: list[np.ndarray]):
    session = PerceptionSession.from_config(PerceptionConfig(str(checkpoint)))
    return [session.process(rgb, want_depth=True, want_pose=True) for rgb in frames]


def test_without_a_scale_nothing_is_published_on_depth(start, checkpoint, capfd):
    n = start(checkpoint)
    metric = n.subscribe("depth", Image)
    scale_free = n.subscribe("depth_scale_free", Image)
    info = n.subscribe("depth_scale_free/camera_info", CameraInfo)
    n.wait_matched("depth", "depth_info")
    assert n.node.count_publishers(f"/{n.name}/depth") == 0  # nobody offers ~/depth at all
    for i in range(2):
        n.publish(image_msg(rgb_of(i), sec=10 + i))
        wait_for(lambda i=i: len(scale_free) == i + 1 and len(info) == i + 1, what=f"depth_scale_free of frame {i}")
    assert metric == [] and scale_free[-1].encoding == "32FC1"
    values = n.status_values("units")
    assert values["units"] == "scale-free" and values["scale_source"] == "none" and values["scale_m_per_unit"] == ""
    assert "~/depth_scale_free" in capfd.readouterr().err  # said once at start


def test_a_fixed_scale_gives_metres_and_the_first_pose_is_the_identity(start, checkpoint):
    frames = [rgb_of(20 + i) for i in range(2)]
    expected = bare_results(checkpoint, frames)
    n = start(checkpoint, scale_source="fixed", scale=2.5, min_depth_confidence=1.0)
    depth, poses, points = (
        n.subscribe("depth", Image),
        n.subscribe("pose", PoseStamped),
        n.subscribe("points", PointCloud2),
    )
    n.wait_matched("depth", "pose", "points")
    for i, rgb in enumerate(frames):
        n.publish(image_msg(rgb, sec=30 + i))
        wait_for(lambda i=i: len(depth) == len(poses) == len(points) == i + 1, what=f"the outputs of frame {i}")
    for i in range(2):
        np.testing.assert_allclose(depth_array(depth[i]), 2.5 * expected[i].depth, rtol=1e-4)
    first, second = poses[0].pose, poses[1].pose
    assert (first.position.x, first.position.y, first.position.z) == (0.0, 0.0, 0.0)
    assert (first.orientation.x, first.orientation.y, first.orientation.z, first.orientation.w) == (0, 0, 0, 1.0)
    relative = invert_pose(expected[0].pose) @ expected[1].pose
    p = second.position
    np.testing.assert_allclose([p.x, p.y, p.z], 2.5 * relative[:3, 3], rtol=1e-4, atol=1e-6)
    xyz, _ = pointcloud2_to_xyzrgb(points[0])
    assert len(xyz) == (H // 4) * (W // 4)  # every strided pixel is valid at min_depth_confidence 1
    assert np.median(xyz[:, 2]) == pytest.approx(2.5 * np.median(expected[0].depth[::4, ::4]), rel=0.05)
    assert n.status_values("units", lambda v: v == "metres")["scale_m_per_unit"] == "2.5"


def test_pixels_with_low_confidence_are_nan_and_left_out_of_the_cloud(start, checkpoint):
    rgb = rgb_of(40)
    (expected,) = bare_results(checkpoint, [rgb])
    threshold = float(np.median(expected.confidence))
    n = start(checkpoint, min_depth_confidence=threshold)
    depth, points = n.subscribe("depth_scale_free", Image), n.subscribe("points", PointCloud2)
    n.wait_matched("depth", "points")
    n.publish(image_msg(rgb, sec=50))
    wait_for(lambda: len(depth) == 1 and len(points) == 1, what="depth and points")
    published = depth_array(depth[0])
    low = expected.confidence < threshold
    clear = np.abs(expected.confidence - threshold) > 1e-4  # pixels away from the threshold's rounding
    assert 0.3 < low.mean() < 0.7
    np.testing.assert_array_equal(np.isnan(published)[clear], low[clear])
    np.testing.assert_allclose(published[~np.isnan(published)], expected.depth[~np.isnan(published)], rtol=1e-4)
    xyz, _ = pointcloud2_to_xyzrgb(points[0])
    assert len(xyz) == int(np.isfinite(published[::4, ::4]).sum()) and np.isfinite(xyz).all()
    assert 0.3 < float(n.status_values("depth_valid_fraction", lambda v: v != "")["depth_valid_fraction"]) < 0.7


def test_a_camera_info_of_another_size_is_ignored_warned_and_counted(start, checkpoint, capfd):
    n = start(checkpoint)
    info = n.subscribe("depth_scale_free/camera_info", CameraInfo)
    n.wait_matched("depth_info")
    n.publish(camera_info(K640, 640, 480, *LENSES[0]), "camera_info")  # an earlier stream's camera
    wait_for(lambda: n.node.cameras["camera"].camera_info is not None, what="camera_info")
    n.publish(image_msg(rgb_of(60), sec=70))
    wait_for(lambda: len(info) == 1, what="the depth camera_info")
    assert (info[0].width, info[0].height) == (W, H) and not any(info[0].d)  # the model's intrinsics, not 640x480
    assert np.asarray(info[0].k)[0] != 600.0
    values = n.status_values("camera_info_ignored", lambda v: int(v) >= 1)
    assert "640x480" in values["camera_info_problem"]
    assert "camera_info ignored" in capfd.readouterr().err
    k = np.array([[80.0, 0, 47.5], [0, 80.0, 31.5], [0, 0, 1]])
    n.publish(camera_info(k, W, H, *LENSES[1]), "camera_info")  # this camera's, with its lens
    wait_for(lambda: n.node.cameras["camera"].camera_info.width == W, what="the second camera_info")
    n.publish(image_msg(rgb_of(61), sec=71))
    wait_for(lambda: len(info) == 2, what="the second depth camera_info")
    assert info[1].distortion_model == "plumb_bob" and list(info[1].d) == pytest.approx(LENSES[1][1])
    np.testing.assert_allclose(np.asarray(info[1].k).reshape(3, 3), k)
    assert info[1].header.stamp.sec == 71


@pytest.mark.margin
def test_tabletop_depth_in_metres_from_a_depth_sensor_topic(start, checkpoint, seed, margin):
    """``scale_source: depth_topic`` with the simulator's depth as a sensor sees it (16UC1 mm, 40 % holes, 1 %
    noise, 2 % wild readings) on ``depth_sensor``: ``~/depth`` is the ground truth's metres (median ratio 1)."""
    from omnistream_perception.evaluation.datasets import TABLETOP_HELDOUT_SEED
    from omnistream_sim.tabletop.data import generate_geometry_sequences

    (seq,) = generate_geometry_sequences(1, frames=8, seed=TABLETOP_HELDOUT_SEED + seed, image_size=64, progress=False)
    rng = np.random.default_rng(seed)
    n = start(checkpoint, scale_source="depth_topic", scale_time_constant=0.2, min_depth_confidence=1.0)
    depth = n.subscribe("depth", Image)
    n.wait_matched("depth")
    worst = 0.0
    for i in range(len(seq.rgb)):
        sec, nanosec = 100, i * 33_000_000
        sensor = depth_msg(sparse_noisy(seq.depth[i], rng), "16UC1", sec * 10**9 + nanosec)
        n.publish(sensor, "depth_sensor")
        wait_for(lambda i=i: n.node.cameras["camera"].pipeline.geometry.sensor.received == i + 1, what="the sensor")
        n.publish(image_msg(seq.rgb[i], sec, nanosec))
        wait_for(lambda i=i: len(depth) == i + 1, what=f"~/depth of frame {i}")
        worst = max(worst, abs(np.log(np.nanmedian(depth_array(depth[i]) / seq.depth[i]))))
    values = n.status_values("scale_measurements", lambda v: int(v) == len(seq.rgb))
    assert values["units"] == "metres" and values["frames_without_scale"] == "0"
    margin("tabletop node |log median(~/depth / ground truth)|", worst, 0.15, higher_is_better=False)


def test_the_viewer_also_takes_the_scale_free_depth():
    from omnistream_perception.ros.rerun_bridge import with_scale_free

    assert with_scale_free("perception_node/depth") == ["perception_node/depth", "perception_node/depth_scale_free"]
    assert with_scale_free("perception_node/depth/camera_info")[1] == "perception_node/depth_scale_free/camera_info"
    assert with_scale_free("/cam/depth_registered") == ["/cam/depth_registered"]
