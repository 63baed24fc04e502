"""perception_node in one process with real rclpy publishers/subscribers: every output, reset, bad input,
real-time behaviour (latest frame only, no work without subscribers) and parameter validation.

The backbone is the authors' tiny fixture (``../shared/fixtures/upstream_tiny_a``); depth/pose/points use a
copy of it with randomly initialised ``GeometryHeads`` saved beside the backbone (values are meaningless,
the wiring is real).
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy is not installed (make setup)")

from geometry_msgs.msg import PoseStamped  # noqa: E402
from nav_msgs.msg import Path  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from ros_helpers import wait_for  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from omnistream_msgs.msg import StreamFeatures  # noqa: E402
from omnistream_perception.image_codec import image_to_depth  # noqa: E402
from omnistream_perception.ros.image import camera_info_from_intrinsics, rgb_to_compressed, rgb_to_image  # noqa: E402
from omnistream_perception.ros.perception_node import PerceptionNode  # noqa: E402
from omnistream_perception.ros.pointcloud import pointcloud2_to_xyzrgb  # noqa: E402

pytestmark = pytest.mark.ros

H, W = 64, 96  # -> 4x6 patches -> 2x3 after 2x2 pooling
_names = itertools.count()


@pytest.fixture(scope="module")
def ros_context():
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope="module")
def heads_checkpoint(fixture_a, tmp_path_factory):
    """The fixture backbone plus random tiny geometry heads (what `omnistream train heads` would save)."""
    from omnistream_perception.model import OmniStreamModel
    from omnistream_perception.model.heads import GeometryHeads, GeometryHeadsConfig

    directory = tmp_path_factory.mktemp("with_heads")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixture_a / name, directory / name)
    config = OmniStreamModel.from_pretrained(fixture_a).config
    GeometryHeads(GeometryHeadsConfig.for_backbone(config.hidden_size, config.depth, "tiny")).save_pretrained(directory)
    return directory


def image(seed: int, sec: int, h: int = H, w: int = W, frame_id: str = "cam") -> Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    msg = rgb_to_image(rgb)
    msg.header.stamp.sec, msg.header.frame_id = sec, frame_id
    return msg


class Harness:
    """A perception node and a tester node spinning on one MultiThreadedExecutor in a background thread."""

    def __init__(self, context, checkpoint, **params):
        params = {"checkpoint": str(checkpoint), "diagnostics_period": 0.2, **params}
        self.name = f"perception_{next(_names)}"
        self.node = PerceptionNode(
            node_name=self.name,
            context=context,
            parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
        )
        self.tester = rclpy.create_node(f"tester_{self.name}", context=context)
        self.executor = MultiThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.tester)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.publishers = {}

    def topic(self, relative: str) -> str:
        return f"/{self.name}/{relative}"

    def subscribe(self, relative: str, msg_type) -> list:
        received: list = []
        self.tester.create_subscription(msg_type, self.topic(relative), received.append, 10)
        return received

    def publish(self, msg, topic: str = "image") -> None:
        if topic not in self.publishers:
            pub = self.tester.create_publisher(type(msg), topic, 10)
            wait_for(lambda: pub.get_subscription_count() > 0, what=f"the node to subscribe to {topic}")
            self.publishers[topic] = pub
        self.publishers[topic].publish(msg)

    def wait_matched(self, key: str = "features", camera: str = "camera") -> None:
        pub = self.node.cameras[camera].publishers[key]
        wait_for(lambda: pub.get_subscription_count() > 0, what=f"the {key} subscription to match")

    def stats(self, camera: str = "camera") -> dict[str, int]:
        return self.node.cameras[camera].stats.counts

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=5)
        self.node.destroy_node()
        self.tester.destroy_node()


@pytest.fixture
def harness(ros_context):
    made = []

    def make(checkpoint, **params):
        made.append(Harness(ros_context, checkpoint, **params))
        return made[-1]

    yield make
    for h in made:
        h.close()


# -- outputs ------------------------------------------------------------------------------------------------------
def test_features_only_one_message_per_image_with_stamp_and_growing_index(harness, fixture_a):
    h = harness(fixture_a)
    features = h.subscribe("features", StreamFeatures)
    h.wait_matched()
    for i in range(4):
        h.publish(image(i, sec=100 + i))
        wait_for(lambda i=i: len(features) == i + 1, what=f"features of frame {i}")
    assert [f.header.stamp.sec for f in features] == [100, 101, 102, 103]
    assert [f.frame_index for f in features] == [0, 1, 2, 3]
    f = features[-1]
    assert f.header.frame_id == "cam" and f.dtype == "float16"
    assert (f.grid_height, f.grid_width, f.dim) == (2, 3, 64)
    assert len(f.patch_tokens) == 2 * 3 * 64 * 2 and len(f.cls_token) == 64
    assert len(f.camera_token) == 0  # no heads: the camera token is off under camera_token=auto
    tokens = np.frombuffer(bytes(f.patch_tokens), "<f2").reshape(2, 3, 64)
    assert np.isfinite(tokens).all() and tokens.std() > 0
    # no heads: features only, and the geometry outputs are not even advertised
    assert not h.node.has_heads
    assert h.tester.count_publishers(h.topic("depth")) == 0 and h.tester.count_publishers(h.topic("pose")) == 0


def test_features_equal_the_bare_session_on_the_same_frames(harness, fixture_a):
    """The node adds transport, not numerics: its tokens equal a PerceptionSession's on the same frames."""
    from omnistream_perception.perception import PerceptionConfig, PerceptionSession

    h = harness(fixture_a, feature_dtype="float32")
    features = h.subscribe("features", StreamFeatures)
    h.wait_matched()
    frames = [image(10 + i, sec=1 + i) for i in range(3)]
    for i, msg in enumerate(frames):
        h.publish(msg)
        wait_for(lambda i=i: len(features) == i + 1)
    session = PerceptionSession.from_config(PerceptionConfig(str(fixture_a), feature_dtype="float32"))
    for msg, feat in zip(frames, features):
        rgb = np.frombuffer(bytes(msg.data), np.uint8).reshape(H, W, 3)
        expected = session.process(rgb, want_depth=False, want_pose=False)
        got = np.frombuffer(bytes(feat.patch_tokens), "<f4").reshape(expected.patch_tokens.shape)
        np.testing.assert_allclose(got, expected.patch_tokens, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(feat.cls_token), expected.cls_token, rtol=1e-5, atol=1e-5)


def test_compressed_input(harness, fixture_a):
    h = harness(fixture_a)
    features = h.subscribe("features", StreamFeatures)
    h.wait_matched()
    rgb = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    msg = rgb_to_compressed(rgb, fmt="png")
    msg.header.stamp.sec = 7
    h.publish(msg, "image/compressed")
    wait_for(lambda: len(features) == 1, what="features of a compressed image")
    assert features[0].header.stamp.sec == 7 and features[0].frame_index == 0


def test_geometry_outputs_with_heads_and_camera_info(harness, heads_checkpoint):
    h = harness(heads_checkpoint, points_stride=4, world_frame_id="map_test")
    assert h.node.has_heads
    out = {
        "features": h.subscribe("features", StreamFeatures),
        "depth": h.subscribe("depth_scale_free", Image),  # no scale_source: the depth is not metres
        "info": h.subscribe("depth_scale_free/camera_info", CameraInfo),
        "pose": h.subscribe("pose", PoseStamped),
        "path": h.subscribe("path", Path),
        "points": h.subscribe("points", PointCloud2),
    }
    for key in ("features", "depth", "depth_info", "pose", "path", "points"):
        h.wait_matched(key)
    for i in range(2):  # first without CameraInfo (predicted intrinsics), then with it
        h.publish(image(20 + i, sec=50 + i))
        wait_for(lambda i=i: all(len(v) == i + 1 for v in out.values()), what=f"all outputs of frame {i}")
        if i == 0:
            predicted_k = np.asarray(out["info"][0].k).reshape(3, 3)
            k_given = np.array([[80.0, 0, 48], [0, 80.0, 32], [0, 0, 1]])
            # CameraInfo of the image's size (another size is ignored: test_perception_node_units)
            h.publish(camera_info_from_intrinsics(k_given, W, H), "camera_info")
            wait_for(lambda: h.node.cameras["camera"].camera_info is not None, what="camera_info")

    depth = out["depth"][-1]
    assert depth.encoding == "32FC1" and (depth.height, depth.width) == (H, W) and depth.header.stamp.sec == 51
    assert depth.header.frame_id == "cam"
    assert (image_to_depth(depth) > 0).all()
    assert predicted_k[0, 0] > 0 and not np.allclose(predicted_k, k_given)
    np.testing.assert_allclose(np.asarray(out["info"][-1].k).reshape(3, 3), k_given)
    assert (out["info"][-1].width, out["info"][-1].height) == (W, H)

    pose = out["pose"][-1]
    assert pose.header.frame_id == "map_test" and pose.header.stamp.sec == 51
    q = pose.pose.orientation
    assert abs(q.x**2 + q.y**2 + q.z**2 + q.w**2 - 1) < 1e-6
    assert [len(p.poses) for p in out["path"]] == [1, 2] and out["path"][-1].header.frame_id == "map_test"

    cloud = out["points"][-1]
    points, colors = pointcloud2_to_xyzrgb(cloud)
    assert cloud.header.frame_id == "map_test" and len(points) == (H // 4) * (W // 4)
    assert np.isfinite(points).all() and colors is not None
    sent = np.frombuffer(bytes(image(21, sec=0).data), np.uint8).reshape(H, W, 3)
    np.testing.assert_array_equal(colors, sent[::4, ::4].reshape(-1, 3))


def test_reset_service_restarts_the_stream_and_path(harness, heads_checkpoint):
    h = harness(heads_checkpoint)
    features = h.subscribe("features", StreamFeatures)
    paths = h.subscribe("path", Path)
    h.wait_matched()
    h.wait_matched("path")
    for i in range(2):
        h.publish(image(i, sec=1 + i))
        wait_for(lambda i=i: len(features) == i + 1)
    client = h.tester.create_client(Trigger, f"/{h.name}/reset")
    assert client.wait_for_service(timeout_sec=10)
    future = client.call_async(Trigger.Request())
    wait_for(future.done, what="the reset service")
    assert future.result().success
    # the restart is immediate, or (a frame still in flight) applied before the next frame: never blocking
    restarted_now = h.node.cameras["camera"].session.frames_seen == 0
    assert restarted_now or "after the frame in flight" in future.result().message, future.result().message
    h.publish(image(5, sec=3))
    wait_for(lambda: len(features) == 3 and len(paths) == 3)
    assert [f.frame_index for f in features] == [0, 1, 0]
    assert [len(p.poses) for p in paths] == [1, 2, 1]


def test_time_going_backwards_and_resolution_change_restart_the_stream(harness, fixture_a):
    h = harness(fixture_a)
    features = h.subscribe("features", StreamFeatures)
    h.wait_matched()
    frames = [
        image(0, sec=10),
        image(1, sec=11),
        image(2, sec=5),
        image(3, sec=6, h=32, w=64),
        image(4, sec=7, h=32, w=64),
    ]
    for i, msg in enumerate(frames):
        h.publish(msg)
        wait_for(lambda i=i: len(features) == i + 1, what=f"features of frame {i}")
    #             10 11 | 5 (looped bag) 6 (new size) 7
    assert [f.frame_index for f in features] == [0, 1, 0, 0, 1]
    assert (features[3].grid_height, features[3].grid_width) == (1, 2)


# -- bad input ----------------------------------------------------------------------------------------------------
def bad_messages():
    nan = np.array([[0.5, np.nan]], "<f4")
    return [
        ("image", Image(height=2, width=2, encoding="yuv422_weird", step=4, data=bytes(8))),
        ("image", Image(height=8, width=8, encoding="rgb8", step=24, data=bytes(100))),
        ("image", Image(height=0, width=0, encoding="rgb8", step=0, data=b"")),
        ("image", Image(height=1, width=2, encoding="32FC1", step=8, data=nan.tobytes())),
        ("image/compressed", CompressedImage(format="jpeg", data=b"\xff\xd8\xff\xe0 broken")),
        ("image/compressed", CompressedImage(format="png", data=b"")),
    ]


def test_bad_input_is_reported_and_dropped_and_the_node_keeps_serving(harness, fixture_a):
    from diagnostic_msgs.msg import DiagnosticArray

    from omnistream_perception.ros.diagnostics import status_values

    h = harness(fixture_a)
    features = h.subscribe("features", StreamFeatures)
    diagnostics: list = []
    h.tester.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
    h.wait_matched()
    h.publish(image(0, sec=1))
    wait_for(lambda: len(features) == 1)
    bad = bad_messages()
    for n, (topic, msg) in enumerate(bad, start=1):
        h.publish(msg, topic)
        wait_for(lambda n=n: h.stats()["errors"] == n, what=f"bad message {n} to be reported")
    h.publish(image(1, sec=2))
    wait_for(lambda: len(features) == 2, what="features after the bad burst")
    assert [f.frame_index for f in features] == [0, 1]  # bad frames never entered the stream
    assert h.stats()["processed"] == 2

    def reported() -> dict | None:
        for array in reversed(diagnostics):
            for status in array.status:
                values = status_values(status)
                if status.name.startswith(h.name) and values.get("errors") == str(len(bad)):
                    return values
        return None

    wait_for(lambda: reported() is not None, what="/diagnostics to report the errors")
    values = reported()
    assert "zero-size compressed image" in values["last_error"]  # the last bad message of the burst
    assert {"rate_hz", "latency_mean_ms", "cache_frames", "dropped"} <= set(values)


def test_bad_input_burst_sets_warn_level(harness, fixture_a):
    from omnistream_perception.ros.diagnostics import WARN, status_values

    h = harness(fixture_a, diagnostics_period=60.0)  # publish by hand below
    h.subscribe("features", StreamFeatures)
    h.wait_matched()
    for n, (topic, msg) in enumerate(bad_messages(), start=1):
        h.publish(msg, topic)
        wait_for(lambda n=n: h.stats()["errors"] == n)
    report = h.node.diagnostics.publish().status[0]
    assert report.level == bytes([WARN]) and "bad input" in report.message
    assert status_values(report)["errors"] == "6"
    assert h.node.diagnostics.publish().status[0].level != bytes([WARN])  # errors are per report period


# -- real-time behaviour ------------------------------------------------------------------------------------------
def test_slow_model_drops_frames_instead_of_queueing(harness, fixture_a):
    h = harness(fixture_a)
    features = h.subscribe("features", StreamFeatures)
    h.wait_matched()
    session = h.node.cameras["camera"].session
    real_process = session.process

    def slow_process(*args, **kwargs):
        time.sleep(0.25)  # a model ~8x slower than the 30 Hz input
        return real_process(*args, **kwargs)

    session.process = slow_process
    published = 15
    for i in range(published):
        h.publish(image(i, sec=1 + i))
        time.sleep(1 / 30)
    last_stamp = 1 + published - 1
    wait_for(lambda: features and features[-1].header.stamp.sec == last_stamp, what="the newest frame")
    time.sleep(0.4)
    stats = h.stats()
    assert stats["processed"] == len(features) < published / 2
    assert stats["dropped"] > 0 and stats["processed"] + stats["dropped"] == stats["received"]
    assert [f.frame_index for f in features] == list(range(len(features)))  # dropped frames never entered


def test_no_subscribers_no_model_run(harness, fixture_a):
    h = harness(fixture_a)
    h.publish(image(0, sec=1))
    wait_for(lambda: h.stats()["received"] == 1)
    time.sleep(0.3)
    assert h.node.cameras["camera"].session.frames_seen == 0 and h.stats()["processed"] == 0


def test_two_cameras_have_their_own_streams(harness, fixture_a):
    h = harness(fixture_a, cameras=["front", "wrist"])
    front = h.subscribe("front/features", StreamFeatures)
    wrist = h.subscribe("wrist/features", StreamFeatures)
    h.wait_matched(camera="front")
    h.wait_matched(camera="wrist")
    for i in range(2):
        h.publish(image(i, sec=1 + i), "front/image")
        wait_for(lambda i=i: len(front) == i + 1)
    h.publish(image(9, sec=1), "wrist/image")
    wait_for(lambda: len(wrist) == 1)
    assert [f.frame_index for f in front] == [0, 1] and [f.frame_index for f in wrist] == [0]


# -- parameters ---------------------------------------------------------------------------------------------------
def test_parameters_are_validated_at_start_and_at_runtime(ros_context, fixture_a):
    with pytest.raises(ValueError, match="checkpoint is required"):
        PerceptionNode(context=ros_context)
    with pytest.raises(ValueError, match="feature_pooling must be >= 1"):
        PerceptionNode(
            context=ros_context,
            parameter_overrides=[Parameter("checkpoint", value=str(fixture_a)), Parameter("feature_pooling", value=0)],
        )
    with pytest.raises(ValueError, match="camera names must be unique"):
        PerceptionNode(
            context=ros_context,
            parameter_overrides=[Parameter("checkpoint", value=str(fixture_a)), Parameter("cameras", value=["a", "a"])],
        )
    node = PerceptionNode(context=ros_context, parameter_overrides=[Parameter("checkpoint", value=str(fixture_a))])
    try:
        assert not node.set_parameters([Parameter("points_stride", value=0)])[0].successful
        assert not node.set_parameters([Parameter("checkpoint", value="elsewhere")])[0].successful  # read-only
        assert node.set_parameters([Parameter("points_stride", value=2)])[0].successful
        assert node.get_parameter("points_stride").value == 2
        assert "hub id" in node.describe_parameter("checkpoint").description
    finally:
        node.destroy_node()


# -- logs, services and stamps under abuse --------------------------------------------------------------------------
def test_alternating_resolutions_restart_the_stream_with_throttled_warnings(harness, fixture_a, capfd):
    h = harness(fixture_a)
    features = h.subscribe("features", StreamFeatures)
    h.wait_matched()
    capfd.readouterr()
    for i in range(20):
        size = (H, W) if i % 2 == 0 else (32, 64)
        h.publish(image(i, sec=1 + i, h=size[0], w=size[1]))
        wait_for(lambda i=i: len(features) == i + 1, what=f"features of frame {i}")
    assert all(f.frame_index == 0 for f in features)  # every frame restarted the stream (behaviour kept)
    assert h.node.cameras["camera"].pipeline.restarts == 19
    warnings = [line for line in capfd.readouterr().err.splitlines() if "resolution changed" in line]
    assert 1 <= len(warnings) <= 2, warnings  # not 19 lines


def test_fifty_concurrent_resets_all_get_answers(harness, fixture_a):
    h = harness(fixture_a)
    clients = [h.tester.create_client(Trigger, f"/{h.name}/reset") for _ in range(50)]
    for client in clients:
        assert client.wait_for_service(timeout_sec=10)
    futures = [client.call_async(Trigger.Request()) for client in clients]
    wait_for(lambda: all(f.done() for f in futures), timeout=30, what="50 reset answers")
    assert all(f.result().success for f in futures)


def test_a_frame_stamped_ten_years_ahead_is_dropped_and_the_next_is_no_looping_bag(harness, fixture_a, capfd):
    h = harness(fixture_a)
    features = h.subscribe("features", StreamFeatures)
    h.wait_matched()
    now = int(time.time())
    h.publish(image(0, sec=now))
    wait_for(lambda: len(features) == 1)
    capfd.readouterr()
    h.publish(image(1, sec=now + 10 * 365 * 86400))
    wait_for(lambda: h.stats()["errors"] == 1, what="the future frame to be reported")
    h.publish(image(2, sec=now + 1))
    wait_for(lambda: len(features) == 2, what="the next normal frame")
    assert [f.header.stamp.sec for f in features] == [now, now + 1]
    assert [f.frame_index for f in features] == [0, 1]  # no restart
    err = capfd.readouterr().err
    assert "ahead of this node's clock" in err and "max_stamp_ahead" in err
    assert "backwards" not in err
