"""TF from perception_node (REP-105 frames, REP-103 optical axes), with real rclpy: the tf2_msgs interface (the
robot's, or the wire-compatible build of `make setup`), the camera transform per frame on /tf, the anchor on
/tf_static, a depth pixel through CameraInfo and /tf landing on the point cloud, and bad tf parameters at start.

The node runs the authors' tiny backbone with random tiny geometry heads (values meaningless, the geometry real).
"""

from __future__ import annotations

import itertools
import math
import shutil
import subprocess

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy is not installed (make setup)")

from geometry_msgs.msg import PoseStamped, TransformStamped  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from ros_helpers import spin_in_thread, wait_for  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from omnistream_msgs.msg import StreamFeatures  # noqa: E402
from omnistream_perception.image_codec import image_to_depth  # noqa: E402
from omnistream_perception.ros.image import camera_info_from_intrinsics, rgb_to_image  # noqa: E402
from omnistream_perception.ros.perception_node import PerceptionNode  # noqa: E402
from omnistream_perception.ros.perception_parameters import validate_parameter  # noqa: E402
from omnistream_perception.ros.pointcloud import pointcloud2_to_xyzrgb  # noqa: E402
from omnistream_perception.ros.transforms import TF_QOS, TF_STATIC_QOS, TfSettings, camera_transform  # noqa: E402

pytestmark = pytest.mark.ros

H, W = 64, 96
STRIDE = 4
ANCHOR_T = [0.1, -0.2, 1.5]
BODY_TO_OPTICAL = [-0.5, 0.5, -0.5, 0.5]  # the rotation the parameter description gives
_names = itertools.count()


def _matrix(translation, quaternion) -> np.ndarray:
    x, y, z, w = np.asarray(quaternion, dtype=np.float64) / np.linalg.norm(quaternion)
    m = np.eye(4)
    m[:3, :3] = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    m[:3, 3] = translation
    return m


def _transform_matrix(t: TransformStamped) -> np.ndarray:
    tr, q = t.transform.translation, t.transform.rotation
    return _matrix([tr.x, tr.y, tr.z], [q.x, q.y, q.z, q.w])


def _stamp(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


# -- parameters and math, no node ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, value, words",
    [
        ("tf.anchor_translation", [math.nan, 0.0, 0.0], "finite"),
        ("tf.anchor_translation", [0.0, math.inf, 0.0], "finite"),
        ("tf.anchor_translation", [0.0, 0.0], "3 numbers"),
        ("tf.anchor_translation", [0, 0, 1], "as floats"),
        ("tf.anchor_rotation", [0.0, 0.0, 0.0, 2.0], "norm 2"),
        ("tf.anchor_rotation", [0.0, 0.0, 0.0, 0.0], "norm 0"),
        ("tf.anchor_rotation", [math.nan, 0.0, 0.0, 1.0], "finite"),
        ("world_frame_id", "", "must be a frame id"),
        ("tf.anchor_parent_frame", "/base_link", "leading '/'"),
        ("tf.camera_frame", "my camera", "spaces"),
    ],
)
def test_bad_tf_parameter_values_are_refused_with_the_reason(name, value, words):
    reason = validate_parameter(name, value)
    assert reason is not None and reason.startswith(name) and words in reason, reason


def test_good_tf_parameter_values_pass():
    for name, value in [
        ("tf.anchor_rotation", [0.0, 0.0, 0.7071, 0.7071]),  # four decimals: normalised before use
        ("tf.anchor_rotation", BODY_TO_OPTICAL),
        ("tf.anchor_translation", ANCHOR_T),
        ("tf.camera_frame", ""),
        ("tf.anchor_parent_frame", ""),
        ("world_frame_id", "map"),
    ]:
        assert validate_parameter(name, value) is None, (name, value)


def test_the_documented_body_to_optical_rotation_is_rep_103():
    r = _matrix([0, 0, 0], BODY_TO_OPTICAL)[:3, :3]
    # optical z (forward) is the body's x, optical x (right) its -y, optical y (down) its -z
    np.testing.assert_allclose(r @ [0, 0, 1], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(r @ [1, 0, 0], [0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(r @ [0, 1, 0], [0, 0, -1], atol=1e-12)


def test_camera_transform_is_the_pose_matrix():
    from builtin_interfaces.msg import Time

    rng = np.random.default_rng(0)
    for _ in range(20):  # rotations near pi too (the quaternion's safe branch)
        q = rng.normal(size=4)
        pose = _matrix(rng.normal(size=3), q)
        t = camera_transform(pose, Time(sec=5, nanosec=7), "world", "cam")
        assert (t.header.frame_id, t.child_frame_id, t.header.stamp.sec, t.header.stamp.nanosec) == (
            "world",
            "cam",
            5,
            7,
        )
        np.testing.assert_allclose(_transform_matrix(t), pose, atol=1e-6)


def test_settings_refuse_frames_that_cannot_form_a_tree():
    anchored = TfSettings(anchor_parent_frame="base_link")
    with pytest.raises(ValueError, match="several cameras"):
        anchored.check({"front": "w_front", "wrist": "w_wrist"}, suffixed=True)
    with pytest.raises(ValueError, match="to itself"):
        TfSettings(anchor_parent_frame="w").check({"camera": "w"}, suffixed=False)
    with pytest.raises(ValueError, match="loop"):
        TfSettings(camera_frame="base_link", anchor_parent_frame="base_link").check({"camera": "w"}, suffixed=False)
    anchored.check({"camera": "w"}, suffixed=False)
    frames = TfSettings(camera_frame="est").camera_frames(["front", "wrist"], suffixed=True)
    assert frames == {"front": "est_front", "wrist": "est_wrist"}
    assert TfSettings().camera_frames(["camera"], suffixed=False) == {"camera": ""}


# -- (1) the interface ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ros_context():
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


def test_tf2_messages_round_trip_over_a_topic_with_tf2s_type_hash(ros_context):
    from rosbags.typesys import Stores, get_typestore

    node = rclpy.create_node(f"tf_round_trip_{next(_names)}", context=ros_context)
    executor, thread = spin_in_thread([node], context=ros_context)
    try:
        received: list[TFMessage] = []
        node.create_subscription(TFMessage, "/tf_round_trip", received.append, TF_QOS)
        pub = node.create_publisher(TFMessage, "/tf_round_trip", TF_QOS)
        wait_for(lambda: pub.get_subscription_count() > 0, what="the subscription to match")
        sent = TFMessage(transforms=[TransformStamped(child_frame_id=f"c{i}") for i in range(2)])
        sent.transforms[0].header.frame_id, sent.transforms[0].header.stamp.sec = "world", 42
        sent.transforms[1].transform.translation.x, sent.transforms[1].transform.rotation.w = -1.25, 1.0
        pub.publish(sent)
        wait_for(lambda: len(received) == 1, what="the TFMessage")
        assert received[0] == sent
        # The hash the middleware announces is tf2_msgs' own (ROS 2 Jazzy and Kilted): a robot's tf2 reads ours.
        (info,) = node.get_publishers_info_by_topic("/tf_round_trip")
        assert info.topic_type == "tf2_msgs/msg/TFMessage"
        for store in (Stores.ROS2_JAZZY, Stores.ROS2_KILTED):
            assert str(info.topic_type_hash) == get_typestore(store).hash_rihs01("tf2_msgs/msg/TFMessage"), store
    finally:
        executor.shutdown()
        thread.join(timeout=5)
        node.destroy_node()


# -- (2), (3) the node ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def heads_checkpoint(fixture_a, tmp_path_factory):
    import torch

    from omnistream_perception.model import OmniStreamModel
    from omnistream_perception.model.heads import GeometryHeads, GeometryHeadsConfig

    directory = tmp_path_factory.mktemp("with_heads")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixture_a / name, directory / name)
    config = OmniStreamModel.from_pretrained(fixture_a).config
    heads = GeometryHeads(GeometryHeadsConfig.for_backbone(config.hidden_size, config.depth, "tiny"))
    # an untrained camera head says "identity" for every frame: make it give a real, frame-dependent pose
    last = heads.camera_head.mlp[-1]
    with torch.no_grad():
        torch.nn.init.normal_(last.weight, std=0.05, generator=torch.Generator().manual_seed(0))
        last.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.9, 0.4, -0.3, 0.8, math.pi / 3, math.pi / 3]))
    heads.save_pretrained(directory)
    return directory


def _image(seed: int, sec: int, frame_id: str) -> Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    msg = rgb_to_image(rgb)
    msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id = sec, 250_000_000, frame_id
    return msg


class Live:
    """A perception node and a tester on one executor; ``take(topic, type, qos)`` collects a topic's messages."""

    def __init__(self, context, checkpoint, **params):
        self.name = f"perception_tf_{next(_names)}"
        params = {"checkpoint": str(checkpoint), "points_stride": STRIDE, **params}
        self.node = PerceptionNode(
            node_name=self.name, context=context, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()]
        )
        self.tester = rclpy.create_node(f"tester_{self.name}", context=context)
        self.executor, self.thread = spin_in_thread([self.node, self.tester], context=context)
        self.inbox: dict[str, list] = {}
        self._pubs: dict[str, object] = {}

    def take(self, topic: str, msg_type, qos=10) -> list:
        topic = topic if topic.startswith("/") else f"/{self.name}/{topic}"
        return self._take(topic, msg_type, qos)

    def take_output(self, key: str, msg_type, camera: str = "camera") -> list:
        """The messages of the node's output ``key`` (depth, depth_info, ...) on whatever topic it publishes it."""
        return self._take(self.node.cameras[camera].publishers[key].topic_name, msg_type, 10)

    def _take(self, topic: str, msg_type, qos) -> list:
        sub = self.tester.create_subscription(msg_type, topic, self.inbox.setdefault(topic, []).append, qos)
        wait_for(lambda: sub.get_publisher_count() > 0, what=f"a publisher of {topic}")
        return self.inbox[topic]

    def publish(self, msg, topic: str = "image") -> None:
        if topic not in self._pubs:
            self._pubs[topic] = self.tester.create_publisher(type(msg), topic, 10)
            wait_for(lambda: self._pubs[topic].get_subscription_count() > 0, what=f"the node to subscribe to {topic}")
        self._pubs[topic].publish(msg)

    def wait_subscribed(self, topic: str, count: int = 1) -> None:
        wait_for(lambda: self.tester.count_subscribers(topic) >= count, what=f"{count} subscriber(s) of {topic}")

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=5)
        self.node.destroy_node()
        self.tester.destroy_node()


@pytest.fixture(scope="module")
def anchored(ros_context, heads_checkpoint):
    """One camera anchored to base_link: frame 0 with only /tf listened to, frames 1-2 with every output and a
    CameraInfo at twice the image size (ignored: the model's intrinsics go out); a fixed scale makes ~/depth metres."""
    live = Live(
        ros_context,
        heads_checkpoint,
        **{
            "world_frame_id": "stream_world",
            "scale_source": "fixed",
            "scale": 1.0,
            "tf.anchor_parent_frame": "base_link",
            "tf.anchor_translation": ANCHOR_T,
            "tf.anchor_rotation": BODY_TO_OPTICAL,
        },
    )
    try:
        tf = live.take("/tf", TFMessage, TF_QOS)
        live.wait_subscribed("/tf")
        live.publish(_image(0, 10, "cam_optical"))
        wait_for(lambda: len(tf) == 1, what="the transform of frame 0 (only /tf listened to)")
        # subscribed after the node became active: /tf_static is latched (transient local)
        static = live.take("/tf_static", TFMessage, TF_STATIC_QOS)
        out = {key: live.take_output(key, msg_type) for key, msg_type in
               [("depth", Image), ("depth_info", CameraInfo), ("pose", PoseStamped), ("points", PointCloud2)]}  # fmt: skip
        k = np.array([[80.0, 0, 47.5], [0, 75.0, 31.5], [0, 0, 1]])
        live.publish(camera_info_from_intrinsics(k, W, H), "camera_info")
        wait_for(lambda: live.node.cameras["camera"].camera_info is not None, what="the camera_info")
        for i in (1, 2):
            live.publish(_image(i, 10 + i, "cam_optical"))
            wait_for(lambda i=i: len(tf) == i + 1 and all(len(v) == i for v in out.values()), what=f"frame {i}")
        wait_for(lambda: len(static) >= 1, what="the latched /tf_static")
        yield {"tf": [m for msg in tf for m in msg.transforms], "static": static, **out}
    finally:
        live.close()


def test_tf_carries_world_to_camera_with_the_image_stamps_and_the_pose(anchored):
    transforms = anchored["tf"]
    assert [_stamp(t) for t in transforms] == [10.25, 11.25, 12.25]
    assert {(t.header.frame_id, t.child_frame_id) for t in transforms} == {("stream_world", "cam_optical")}
    # the transform is ~/pose (which is in the world frame), frame by frame
    poses = anchored["pose"]
    assert [_stamp(p) for p in poses] == [11.25, 12.25] and {p.header.frame_id for p in poses} == {"stream_world"}
    for t, p in zip(transforms[1:], poses):
        pose = _matrix([p.pose.position.x, p.pose.position.y, p.pose.position.z],
                       [p.pose.orientation.x, p.pose.orientation.y, p.pose.orientation.z, p.pose.orientation.w])  # fmt: skip
        np.testing.assert_allclose(_transform_matrix(t), pose, atol=1e-9)
    # depth and its CameraInfo are in the camera frame that /tf names; the cloud in the world frame
    assert {m.header.frame_id for m in anchored["depth"] + anchored["depth_info"]} == {"cam_optical"}
    assert {m.header.frame_id for m in anchored["points"]} == {"stream_world"}


def test_tf_static_carries_the_anchor_latched(anchored):
    (msg,) = anchored["static"][-1:]
    (t,) = msg.transforms
    assert (t.header.frame_id, t.child_frame_id) == ("base_link", "stream_world")
    np.testing.assert_allclose(_transform_matrix(t), _matrix(ANCHOR_T, BODY_TO_OPTICAL), atol=1e-12)


def test_a_depth_pixel_through_camera_info_and_tf_lands_on_the_point_cloud(anchored):
    """Each frame: pixels (every cloud pixel of the stride grid, NaN depth skipped) back-projected with the
    published CameraInfo and the /tf transform of the same stamp are the cloud's points, in the world frame."""
    by_stamp = {_stamp(t): _transform_matrix(t) for t in anchored["tf"]}
    checked = 0
    for depth_msg, info, cloud in zip(anchored["depth"], anchored["depth_info"], anchored["points"]):
        stamp = _stamp(depth_msg)
        assert _stamp(info) == stamp == _stamp(cloud)
        depth, k = image_to_depth(depth_msg), np.asarray(info.k).reshape(3, 3)
        cam_to_world = by_stamp[stamp]
        points, _ = pointcloud2_to_xyzrgb(cloud)
        v, u = np.mgrid[0:H:STRIDE, 0:W:STRIDE]
        d = depth[v, u]
        keep = np.isfinite(d)
        rays = np.linalg.inv(k) @ np.stack([u[keep], v[keep], np.ones(keep.sum())])
        expected = (cam_to_world[:3, :3] @ (rays * d[keep]) + cam_to_world[:3, 3:4]).T
        tolerance = 1e-4 * (1.0 + np.abs(expected).max())  # float32 cloud
        if len(points) == keep.size:  # no pixel dropped: the cloud is the stride grid in row-major order
            np.testing.assert_allclose(points[keep.reshape(-1)], expected, atol=tolerance)
        nearest = np.linalg.norm(points[None, :, :] - expected[:, None, :], axis=-1).min(axis=1)
        assert nearest.max() < tolerance, f"a back-projected pixel is {nearest.max():.3g} from the cloud"
        # the check has teeth: without the transform (or with another frame's) the points do not match
        assert np.linalg.norm(rays.T * d[keep][:, None] - expected, axis=1).max() > 100 * tolerance
        checked += int(keep.sum())
    assert checked >= (H // STRIDE) * (W // STRIDE)  # two frames, at most half of the pixels without depth


def test_several_cameras_a_named_camera_frame_and_tf_publish_at_runtime(ros_context, heads_checkpoint):
    live = Live(ros_context, heads_checkpoint, cameras=["front", "wrist"], **{"tf.camera_frame": "estimated"})
    try:
        tf = live.take("/tf", TFMessage, TF_QOS)
        live.wait_subscribed("/tf")
        live.publish(_image(0, 20, "front_optical"), "front/image")
        live.publish(_image(1, 21, ""), "wrist/image")  # no frame id: tf.camera_frame names the frame
        wait_for(lambda: len(tf) == 2, what="a transform per camera")
        pairs = sorted((t.header.frame_id, t.child_frame_id, _stamp(t)) for m in tf for t in m.transforms)
        assert pairs == [("omnistream_world_front", "estimated_front", 20.25),
                         ("omnistream_world_wrist", "estimated_wrist", 21.25)]  # fmt: skip
        # tf.publish off at runtime: frames are still processed, nothing more on /tf
        live.node.set_parameters([Parameter("tf.publish", value=False)])
        features = live.take("front/features", StreamFeatures)
        live.publish(_image(2, 22, "front_optical"), "front/image")
        wait_for(lambda: len(features) == 1, what="the features of the next frame")
        assert len(tf) == 2
    finally:
        live.close()


def test_an_image_without_frame_id_and_no_camera_frame_gives_no_transform_and_a_warning(
    ros_context, heads_checkpoint, capfd
):
    live = Live(ros_context, heads_checkpoint)
    try:
        tf = live.take("/tf", TFMessage, TF_QOS)
        pose = live.take("pose", PoseStamped)
        live.wait_subscribed("/tf")
        for i in range(2):
            live.publish(_image(i, 30 + i, ""))
            wait_for(lambda i=i: len(pose) == i + 1, what=f"the pose of frame {i}")
        assert tf == []
        assert "set tf.camera_frame" in capfd.readouterr().err
    finally:
        live.close()


# -- (4) bad tf parameters at start ---------------------------------------------------------------------------------
START_CASES = {
    "nan_translation": (["tf.anchor_parent_frame:=base_link", "tf.anchor_translation:=[.nan, 0.0, 0.0]"],
                        ["tf.anchor_translation", "finite"]),
    "integer_translation": (["tf.anchor_translation:=[0, 0, 1]"], ["tf.anchor_translation", "as floats"]),
    "non_unit_quaternion": (["tf.anchor_rotation:=[0.0, 0.0, 0.0, 2.0]"], ["tf.anchor_rotation", "norm 2"]),
    "empty_world_frame": (["world_frame_id:=''"], ["world_frame_id must be a frame id"]),
    "slash_anchor_frame": (["tf.anchor_parent_frame:=/base_link"], ["tf.anchor_parent_frame", "leading '/'"]),
    "anchor_with_two_cameras": (["cameras:=[front, wrist]", "tf.anchor_parent_frame:=base_link"],
                                ["several cameras"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def start_results(fixture_a):
    from test_perception_node_process import _perception_node_command

    processes = {
        case: subprocess.Popen(
            [_perception_node_command(), "--ros-args", "-p", f"checkpoint:={fixture_a}"]
            + [a for p in params for a in ("-p", p)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for case, (params, _) in START_CASES.items()
    }
    out = {}
    for case, process in processes.items():
        try:
            output, _ = process.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0] + "\n(killed after 180 s: the node kept running)"
        out[case] = (process.returncode, output)
    return out


@pytest.mark.parametrize("case", list(START_CASES))
def test_bad_tf_parameters_at_start_are_one_fatal_line_and_exit_2(start_results, case):
    returncode, output = start_results[case]
    lines = [line for line in output.splitlines() if line.strip()]
    assert returncode == 2, f"exit code {returncode}:\n{output}"
    assert len(lines) == 1 and "[FATAL]" in lines[0], output
    for words in START_CASES[case][1]:
        assert words in lines[0], f"{words!r} not in {lines[0]!r}"
