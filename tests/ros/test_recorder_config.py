"""recorder_node as configured on a robot: latched topics with their QoS, relative names, parameters applied or
refused (at start: one FATAL line, exit 2), the shipped params file, publishers with other QoS appearing later."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from ros_helpers import call_trigger, spin_in_thread, stop_spinning, wait_for

from omnistream_vla.recording import BagRecorder, qos_profile_dict, read_episode_events, string_cdr

REPO = Path(__file__).resolve().parents[2]
PARAMS_FILE = REPO / "ros2_ws" / "src" / "omnistream_vla" / "config" / "recorder.yaml"


def _read(bag: Path, topic: str) -> list:
    from rosbags.highlevel import AnyReader

    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        if not conns:  # rosbags reads every topic for an empty list
            return []
        return [reader.deserialize(raw, c.msgtype) for c, _, raw in reader.messages(connections=conns)]


def _metadata_qos(bag: Path, topic: str) -> list[dict]:
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    (entry,) = [t["topic_metadata"] for t in meta["topics_with_message_count"] if t["topic_metadata"]["name"] == topic]
    return yaml.safe_load(entry["offered_qos_profiles"]) or []


# ----------------------------------------------------------------------------------------------- core, no ROS


def test_parameter_validation():
    from omnistream_perception.ros.node_params import problem
    from omnistream_vla.recorder_controller import topic_names
    from omnistream_vla.ros.recorder_parameters import PARAMETERS

    assert problem("chunk_max_mb", 10, PARAMETERS) is None  # an integer is a number too (read as 10.0)
    assert problem("topics", "/camera/image_raw", PARAMETERS) is None
    assert topic_names("/camera/image_raw") == ["/camera/image_raw"]
    assert topic_names(["", " /a "]) == ["/a"]
    for name, value, words in [
        ("chunk_max_mb", math.nan, "finite"),
        ("chunk_max_mb", math.inf, "finite"),
        ("chunk_max_mb", 0.0, "(0, inf]"),
        ("chunk_max_mb", "abc", "a finite number"),
        ("chunk_duration_s", -1.0, "(0, inf]"),
        ("retry_period_s", True, "a finite number"),
        ("min_free_mb", -0.5, "[0, inf]"),
        ("queue_depth", -5, ">= 1 and <= 1000000"),
        ("queue_depth", 0, ">= 1 and <= 1000000"),
        ("queue_depth", 2.5, "an integer"),
        ("record_always", "yes", "true or false"),
        ("output_dir", " ", "must not be empty"),
        ("topics", [1, 2], "list of topic names"),
    ]:
        reason = problem(name, value, PARAMETERS)
        assert reason and name in reason and words in reason, (name, reason)
    assert {n for n, s in PARAMETERS.items() if s.read_only} == {"bag_name", "queue_depth"}


def test_offered_qos_in_metadata_and_mcap_channels(tmp_path):
    from rosbags.highlevel import AnyReader
    from rosbags.interfaces import QosDurability, QosReliability

    latched = qos_profile_dict(history=1, depth=1, reliability=1, durability=1)
    rec = BagRecorder(tmp_path, bag_name="q", min_free_bytes=0)
    rec.add_topic("/instruction", "std_msgs/msg/String", [latched])
    rec.add("/instruction", 5, string_cdr("stack the cups"))
    rec.flush()
    (profile,) = _metadata_qos(tmp_path / "q", "/instruction")
    assert profile["durability"] == 1 and profile["reliability"] == 1 and profile["depth"] == 1
    assert profile["deadline"] == {"sec": 9223372036, "nsec": 854775807}  # RMW_DURATION_INFINITE
    with AnyReader([tmp_path / "q"]) as reader:
        (conn,) = [c for c in reader.connections if c.topic == "/instruction"]
        (qos,) = conn.ext.offered_qos_profiles
        assert qos.durability == QosDurability.TRANSIENT_LOCAL and qos.reliability == QosReliability.RELIABLE


def test_close_is_idempotent(tmp_path):
    rec = BagRecorder(tmp_path, bag_name="c", min_free_bytes=0)
    rec.add_topic("/x", "std_msgs/msg/String")
    rec.start_episode("wave", 1)
    for k in range(3):
        rec.add("/x", 2 + k, string_cdr(str(k)))
    assert rec.close(10) is not None
    assert rec.close(11) is None and rec.close(12) is None  # nothing left to stop or write
    assert [m.data for m in _read(tmp_path / "c", "/x")] == ["0", "1", "2"]
    (episode,) = read_episode_events(tmp_path / "c")
    assert episode["stop_ns"] == 10


# ----------------------------------------------------------------------------------------------- live ROS


@pytest.fixture
def ros():
    import rclpy

    rclpy.init()
    yield
    rclpy.try_shutdown()


def _recorder(tmp_path, **params):
    from rclpy.parameter import Parameter

    from omnistream_vla.ros.recorder_node import RecorderNode

    namespace = params.pop("namespace", None)
    values = {"output_dir": str(tmp_path / "bags"), "bag_name": "b", "min_free_mb": 0.0, **params}
    overrides = [Parameter(k, value=v) for k, v in values.items()]
    return RecorderNode(parameter_overrides=overrides, **({"namespace": namespace} if namespace else {}))


def _close(recorder, *nodes) -> None:
    """Stop the recorder (writing its buffer), then destroy it and ``nodes``."""
    recorder.shutdown()
    for node in (recorder, *nodes):
        node.destroy_node()


@pytest.mark.ros
def test_latched_instruction_published_before_start_is_recorded_with_its_qos(tmp_path, ros):
    """A transient-local instruction published before the recorder exists: the episode carries it, the bag has
    it with its QoS, and bag-to-lerobot --instruction-topic uses it."""
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.time import Time
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float32MultiArray, String
    from std_srvs.srv import Trigger

    from omnistream_perception.ros.image import rgb_to_image
    from omnistream_train.bag_to_lerobot import BagConversionConfig, convert_bags
    from omnistream_train.lerobot_dataset import LeRobotDataset

    task = "stack the cups"
    pub_node = Node("latched_publisher")
    latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
    pub_node.create_publisher(String, "/instruction", latched).publish(String(data=task))
    recorder = _recorder(tmp_path, topics=["/camera/image_raw", "/action"])
    image_pub = pub_node.create_publisher(Image, "/camera/image_raw", 50)
    action_pub = pub_node.create_publisher(Float32MultiArray, "/action", 50)
    start, stop = (pub_node.create_client(Trigger, f"/recorder_node/{n}") for n in ("start", "stop"))
    executor, thread = spin_in_thread([recorder, pub_node])
    try:
        wait_for(lambda: recorder.control.instruction == task, what="the latched instruction")
        assert recorder.control.sub_qos["/instruction"] == (True, True)  # reliable, transient local
        wait_for(lambda: image_pub.get_subscription_count() and action_pub.get_subscription_count(), what="matching")
        reply = call_trigger(start)
        assert reply.success and task in reply.message
        base = pub_node.get_clock().now().nanoseconds
        for k in range(6):
            stamp = base + k * 50_000_000
            while pub_node.get_clock().now().nanoseconds < stamp:  # never stamp in the future (episode bounds)
                time.sleep(0.002)
            img = rgb_to_image(np.full((8, 8, 3), 30 * k, np.uint8))
            img.header.stamp = Time(nanoseconds=stamp).to_msg()
            image_pub.publish(img)
            action_pub.publish(Float32MultiArray(data=[float(k)]))
        wait_for(lambda: recorder.control.recorder.buffered_messages >= 12 + 2, what="messages")
        assert call_trigger(stop).success
    finally:
        stop_spinning(executor, thread, [recorder, pub_node])

    bag = tmp_path / "bags" / "b"
    assert [m.data for m in _read(bag, "/instruction")] == [task]
    (profile,) = _metadata_qos(bag, "/instruction")
    assert profile["durability"] == 1 and profile["reliability"] == 1  # transient local, reliable: as offered
    assert _metadata_qos(bag, "/action")[0]["durability"] == 2  # volatile
    (episode,) = read_episode_events(bag)
    assert episode["instruction"] == task
    cfg = BagConversionConfig(["/camera/image_raw"], "/action", instruction_topic="/instruction", fps=20)
    summary = convert_bags([bag], tmp_path / "ds", cfg)
    assert summary["episodes"] == 1 and summary["frames"] == 6
    ds = LeRobotDataset(tmp_path / "ds")
    assert [ds[i]["task"] for i in range(6)] == [task] * 6


@pytest.mark.ros
def test_relative_topic_names_resolve_in_the_node_namespace(tmp_path, ros):
    from rclpy.node import Node
    from std_msgs.msg import Float32MultiArray, String

    recorder = _recorder(
        tmp_path, namespace="/robot1", topics=["joint_cmd"], instruction_topic="instruction", record_always=True
    )
    assert recorder.control.wanted == ["/robot1/joint_cmd", "/robot1/instruction"]
    node = Node("robot1_publishers")
    pub = node.create_publisher(Float32MultiArray, "/robot1/joint_cmd", 100)
    instruction = node.create_publisher(String, "/robot1/instruction", 10)
    executor, thread = spin_in_thread([recorder, node])
    try:
        wait_for(lambda: pub.get_subscription_count() and instruction.get_subscription_count(), what="subscriptions")
        instruction.publish(String(data="wave"))
        for k in range(5):
            pub.publish(Float32MultiArray(data=[float(k)]))
        wait_for(lambda: recorder.control.recorder.buffered_messages >= 6, what="messages")
        assert recorder.control.instruction == "wave"
    finally:
        stop_spinning(executor, thread)
    _close(recorder, node)
    assert [m.data.tolist() for m in _read(tmp_path / "bags" / "b", "/robot1/joint_cmd")] == [[k] for k in range(5)]


@pytest.mark.ros
def test_runtime_parameters_are_applied_or_refused(tmp_path, ros):
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from std_msgs.msg import String

    recorder = _recorder(tmp_path, topics=["/a"], record_always=True, chunk_duration_s=600.0, instruction_topic="")
    node = Node("ab_publishers")
    pub_a, pub_b = (node.create_publisher(String, t, 100) for t in ("/a", "/b"))
    executor, thread = spin_in_thread([recorder, node])
    try:
        wait_for(lambda: pub_a.get_subscription_count() > 0, what="/a subscribed")
        # Refused: the reason says why, nothing changes.
        for name, value in [
            ("chunk_max_mb", math.nan),
            ("chunk_max_mb", -1.0),
            ("chunk_max_mb", "abc"),
            ("queue_depth", -5),
            ("queue_depth", 10),  # read-only: subscriptions keep the depth they were made with
            ("bag_name", "other"),  # read-only
            ("retry_period_s", math.inf),
            ("topics", ["bad name!"]),
        ]:
            (result,) = recorder.set_parameters([Parameter(name, value=value)])
            assert not result.successful and result.reason, (name, value)
        assert recorder.get_parameter("chunk_max_mb").value == 256.0 and recorder.get_parameter("queue_depth").value
        assert recorder.control.wanted == ["/a"] and recorder.control.recorder.chunk_max_bytes == int(256e6)
        # Applied: the topic set changes (the old subscription goes), a small chunk size closes chunks at once.
        (result,) = recorder.set_parameters([Parameter("topics", value=["/b"])])
        assert result.successful
        wait_for(lambda: pub_b.get_subscription_count() > 0, what="/b subscribed")
        wait_for(lambda: pub_a.get_subscription_count() == 0, what="/a unsubscribed")
        (result,) = recorder.set_parameters([Parameter("chunk_max_mb", value=1e-4)])  # 100 bytes
        assert result.successful and recorder.control.recorder.chunk_max_bytes == 100
        for k in range(5):
            pub_a.publish(String(data=f"a{k}"))
            pub_b.publish(String(data=f"b{k}" + "-" * 60))  # 5 x ~70 bytes: past 100 bytes
        meta = tmp_path / "bags" / "b" / "metadata.yaml"
        wait_for(meta.is_file, what="a chunk closed by size (chunk_duration_s is 600 s)")
        (result,) = recorder.set_parameters([Parameter("instruction_topic", value="task")])
        assert (
            result.successful
            and recorder.control.instruction_topic == "/task"
            and recorder.control.wanted == ["/b", "/task"]
        )
    finally:
        stop_spinning(executor, thread)
    _close(recorder, node)
    bag = tmp_path / "bags" / "b"
    assert [m.data for m in _read(bag, "/b")] == [f"b{k}" + "-" * 60 for k in range(5)]
    assert _read(bag, "/a") == []


@pytest.mark.ros
def test_one_topic_given_as_a_string(tmp_path, ros):
    """`topics: /camera/image_raw` (a string, not a list) names one topic, at start and when changed."""
    from rclpy.parameter import Parameter

    recorder = _recorder(tmp_path, topics="/a", instruction_topic="")
    assert recorder.control.wanted == ["/a"]
    (result,) = recorder.set_parameters([Parameter("topics", value="b")])
    assert result.successful and recorder.control.wanted == ["/b"]
    recorder.destroy_node()


@pytest.mark.ros
def test_publisher_with_weaker_qos_appearing_later_is_heard(tmp_path, ros):
    """Subscribed reliable + transient local for a latched publisher; a best-effort volatile one appears: the
    recorder subscribes again so that it hears both, and stores both offered profiles."""
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    recorder = _recorder(tmp_path, topics=["/x"], record_always=True, instruction_topic="")
    node = Node("x_publishers")
    latched = QoSProfile(depth=5, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
    first = node.create_publisher(String, "/x", latched)
    executor, thread = spin_in_thread([recorder, node])
    try:
        wait_for(
            lambda: recorder.control.sub_qos.get("/x") == (True, True), what="reliable transient-local subscription"
        )
        first.publish(String(data="latched"))
        wait_for(lambda: recorder.control.recorder.buffered_messages >= 1, what="the first message")
        second = node.create_publisher(String, "/x", QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT))
        wait_for(lambda: recorder.control.sub_qos.get("/x") == (False, False), what="subscribed again")
        wait_for(lambda: second.get_subscription_count() > 0, what="the best-effort publisher matched")
        second.publish(String(data="best effort"))
        wait_for(lambda: recorder.control.recorder.buffered_messages >= 2, what="the second message")
    finally:
        stop_spinning(executor, thread)
    _close(recorder, node)
    bag = tmp_path / "bags" / "b"
    assert [m.data for m in _read(bag, "/x")] == ["latched", "best effort"]
    assert sorted(p["reliability"] for p in _metadata_qos(bag, "/x")) == [1, 2]


# ----------------------------------------------------------------------------------------------- processes


def _run(args: list[str], tmp_path: Path, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "omnistream_vla.ros.recorder_node", "--ros-args", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))


@pytest.mark.ros
@pytest.mark.parametrize(
    "param, words",
    [("queue_depth:=-5", "queue_depth must be >= 1"), ("chunk_max_mb:=.nan", "chunk_max_mb must be a finite number"),
     ("topics:=['bad name!']", "invalid topic name 'bad name!'")],
)  # fmt: skip
def test_bad_start_parameter_is_one_fatal_line_and_exit_2(tmp_path, param, words):
    proc = _run(["-p", param, "-p", f"output_dir:={tmp_path}"], tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "FATAL" in lines[0] and words in lines[0], out


def test_params_file_is_keyed_by_the_node_name():
    from omnistream_vla.ros.recorder_node import NODE_NAME

    (key,) = yaml.safe_load(PARAMS_FILE.read_text())
    assert key == f"/**/{NODE_NAME}"


@pytest.mark.ros
def test_readme_command_records_the_configured_topics(tmp_path):
    """`recorder_node --ros-args --params-file config/recorder.yaml` subscribes to the file's topics."""
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import Image, JointState

    from omnistream_msgs.msg import EndEffectorAction

    configured = yaml.safe_load(PARAMS_FILE.read_text())["/**/recorder_node"]["ros__parameters"]["topics"]
    proc = _run(
        ["--params-file", str(PARAMS_FILE), "-p", f"output_dir:={tmp_path}", "-p", "min_free_mb:=0.0"], tmp_path
    )
    rclpy.init()
    try:
        node = Node("configured_publishers")
        types = {"/camera/image_raw": Image, "/joint_states": JointState, "/vla_node/action": EndEffectorAction}
        assert set(configured) == set(types)
        pubs = [node.create_publisher(types[t], t, 10) for t in configured]
        wait_for(lambda: all(p.get_subscription_count() > 0 for p in pubs), timeout=30, what="configured topics")
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
