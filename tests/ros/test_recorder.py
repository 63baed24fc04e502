"""recorder_node and its rclpy-free core: chunked MCAP bags, episodes, disk errors, SIGKILL, live conversion."""

from __future__ import annotations

import json
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

from omnistream_vla.recording import BagRecorder, RecordingError, read_episode_events, string_cdr


def _read_strings(bag: Path, topic: str) -> list[str]:
    from rosbags.highlevel import AnyReader

    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        return [reader.deserialize(raw, c.msgtype).data for c, _, raw in reader.messages(connections=conns)]


# ----------------------------------------------------------------------------------------------- core, no ROS


def test_chunks_metadata_and_episodes(tmp_path):
    rec = BagRecorder(tmp_path / "bags", bag_name="demo", min_free_bytes=0)
    rec.add_topic("/instruction", "std_msgs/String")
    rec.start_episode("stack the blocks", 1_000)
    for k in range(5):
        rec.add("/instruction", 2_000 + k, string_cdr(f"m{k}"))
    first = rec.flush()
    rec.annotate(3_000, success=True, note="clean grasp")
    for k in range(5, 8):
        rec.add("/instruction", 4_000 + k, string_cdr(f"m{k}"))
    rec.stop_episode(5_000)
    second = rec.flush()
    bag = tmp_path / "bags" / "demo"
    assert first.name == "demo_0.mcap" and second.name == "demo_1.mcap"
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["storage_identifier"] == "mcap"
    assert meta["relative_file_paths"] == ["demo_0.mcap", "demo_1.mcap"]
    counts = {t["topic_metadata"]["name"]: t["message_count"] for t in meta["topics_with_message_count"]}
    assert counts["/instruction"] == 8 and counts["/recorder/episode_events"] == 3
    assert meta["message_count"] == 11
    assert _read_strings(bag, "/instruction") == [f"m{k}" for k in range(8)]
    (episode,) = read_episode_events(bag)
    assert episode["instruction"] == "stack the blocks" and episode["success"] is True
    assert episode["notes"] == ["clean grasp"] and episode["start_ns"] == 1_000 and episode["stop_ns"] == 5_000
    assert json.loads((bag / "episodes.json").read_text())[0]["success"] is True
    assert json.loads(meta["custom_data"]["omnistream.episodes"])[0]["instruction"] == "stack the blocks"
    with pytest.raises(ValueError, match="no episode is running"):
        rec.stop_episode(6_000)


def test_disk_full_keeps_buffer_then_retry_writes_everything(tmp_path):
    rec = BagRecorder(tmp_path, bag_name="b", min_free_bytes=10**18)  # more than any disk: the real check fails
    rec.add_topic("/x", "std_msgs/msg/String")
    for k in range(4):
        rec.add("/x", 10 + k, string_cdr(str(k)))
    with pytest.raises(RecordingError, match="disk full: .* MB free"):
        rec.flush()
    assert rec.buffered_messages == 4 and "disk full" in rec.last_error
    rec.add("/x", 20, string_cdr("4"))  # keeps recording while the disk is full
    rec.min_free_bytes = 0
    rec.flush()
    assert rec.last_error is None and rec.buffered_messages == 0
    assert _read_strings(tmp_path / "b", "/x") == ["0", "1", "2", "3", "4"]


def test_enospc_during_a_chunk_keeps_earlier_chunks_and_the_buffer(tmp_path, monkeypatch):
    """The disk fills up while a chunk is written (fault injected into the rosbags writer): clear error, the
    half-written chunk is cleaned up, metadata.yaml still lists only the good chunks, nothing is lost."""
    import errno

    from rosbags.rosbag2 import Writer

    rec = BagRecorder(tmp_path, bag_name="b", min_free_bytes=0)
    rec.add_topic("/x", "std_msgs/msg/String")
    rec.add("/x", 1, string_cdr("first"))
    rec.flush()
    real_write = Writer.write

    def full_disk(self, connection, timestamp, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Writer, "write", full_disk)
    rec.add("/x", 2, string_cdr("second"))
    rec.add("/x", 3, string_cdr("third"))
    with pytest.raises(RecordingError, match="disk full: writing chunk b_1"):
        rec.flush()
    assert rec.buffered_messages == 2
    assert not any((tmp_path / "b" / ".incoming").iterdir())
    assert _read_strings(tmp_path / "b", "/x") == ["first"]  # the bag stays readable
    monkeypatch.setattr(Writer, "write", real_write)
    rec.flush()
    assert _read_strings(tmp_path / "b", "/x") == ["first", "second", "third"]


def test_unwritable_path_then_new_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rec = BagRecorder(blocker / "bags", bag_name="b", min_free_bytes=0)
    rec.add_topic("/x", "std_msgs/msg/String")
    rec.add("/x", 1, string_cdr("kept"))
    with pytest.raises(RecordingError, match="is a file, not a directory"):
        rec.flush()
    rec.set_output_dir(tmp_path / "elsewhere")
    rec.flush()
    assert _read_strings(tmp_path / "elsewhere" / "b", "/x") == ["kept"]


def test_custom_message_type_definition():
    from omnistream_vla.recording import TypeRegistry

    msgdef, rihs01 = TypeRegistry().definition("omnistream_msgs/msg/EndEffectorAction")
    assert "float32 gripper" in msgdef and "MSG: geometry_msgs/Vector3" in msgdef
    # The hash rosidl generated for the built package (share/.../EndEffectorAction.json) must match ours.
    share = Path(os.environ["AMENT_PREFIX_PATH"].split(os.pathsep)[0]) / "share" / "omnistream_msgs" / "msg"
    assert rihs01 in (share / "EndEffectorAction.json").read_text()
    with pytest.raises(RecordingError, match="no definition for message type"):
        TypeRegistry().definition("nonexistent_pkg/msg/Thing")


# ----------------------------------------------------------------------------------------------- live ROS


@pytest.mark.ros
def test_live_session_records_and_converts(tmp_path):
    """Real rclpy publishers -> recorder_node -> bag -> LeRobot v3.0: counts, timestamps, tasks, actions match."""
    import rclpy
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.time import Time
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from omnistream_msgs.msg import EndEffectorAction
    from omnistream_perception.ros.image import rgb_to_image
    from omnistream_train.bag_to_lerobot import BagConversionConfig, convert_bags
    from omnistream_train.lerobot_dataset import LeRobotDataset
    from omnistream_vla.ros.recorder_node import RecorderNode

    fps, frames_per_episode, period_ns = 20, 8, 50_000_000
    rclpy.init()
    try:
        recorder = RecorderNode(
            parameter_overrides=[
                Parameter("topics", value=["/camera/image_raw", "/ee_action"]),
                Parameter("output_dir", value=str(tmp_path / "bags")),
                Parameter("bag_name", value="live"),
                Parameter("min_free_mb", value=0.0),
            ]
        )
        pub_node = Node("test_publishers")
        image_pub = pub_node.create_publisher(Image, "/camera/image_raw", 50)
        action_pub = pub_node.create_publisher(EndEffectorAction, "/ee_action", 50)
        instruction_pub = pub_node.create_publisher(String, "/instruction", 10)
        start = pub_node.create_client(Trigger, "/recorder_node/start")
        stop = pub_node.create_client(Trigger, "/recorder_node/stop")
        success = pub_node.create_client(Trigger, "/recorder_node/mark_success")
        executor, thread = spin_in_thread([recorder, pub_node])
        wait_for(
            lambda: all(recorder.recorded_subscriptions.get(t) for t in ("/camera/image_raw", "/ee_action")),
            what="recorder subscriptions",
        )
        wait_for(lambda: image_pub.get_subscription_count() and action_pub.get_subscription_count(), what="matching")
        wait_for(lambda: instruction_pub.get_subscription_count() > 0, what="instruction matching")

        published = []  # (episode, stamp_ns, action vector, frame colour)
        tasks = ["pick up the red block", "open the drawer"]
        for episode, task in enumerate(tasks):
            instruction_pub.publish(String(data=task))
            wait_for(lambda task=task: recorder.control.instruction == task, what="instruction")
            assert call_trigger(start).success
            base = pub_node.get_clock().now().nanoseconds + 20_000_000
            for k in range(frames_per_episode):
                stamp = base + k * period_ns
                while pub_node.get_clock().now().nanoseconds < stamp:  # never stamp in the future
                    time.sleep(0.002)
                header = Time(nanoseconds=stamp).to_msg()
                colour = 20 + 25 * k
                img = rgb_to_image(np.full((16, 24, 3), colour, np.uint8))
                img.header.stamp = header
                act = EndEffectorAction(mode="relative", gripper=1.0 if k % 2 else -1.0)
                act.header.stamp = header
                act.translation.x, act.translation.y, act.translation.z = 0.01 * k, -0.02 * k, 0.001 * episode
                act.rotation.z = 0.1 * k
                image_pub.publish(img)
                action_pub.publish(act)
                published.append(
                    (episode, stamp, [0.01 * k, -0.02 * k, 0.001 * episode, 0, 0, 0.1 * k, act.gripper], colour)
                )
            n_before = len(published)
            wait_for(
                lambda n=n_before: recorder.control.recorder.buffered_messages >= 2 * frames_per_episode + 1,
                what="messages",
            )
            if episode == 0:
                assert call_trigger(success).success
            reply = call_trigger(stop)
            assert reply.success, reply.message
        stop_spinning(executor, thread, [recorder, pub_node])
    finally:
        rclpy.try_shutdown()

    bag = tmp_path / "bags" / "live"
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    counts = {t["topic_metadata"]["name"]: t["message_count"] for t in meta["topics_with_message_count"]}
    assert counts["/camera/image_raw"] == counts["/ee_action"] == 2 * frames_per_episode
    cfg = BagConversionConfig(
        camera_topics=["/camera/image_raw"], action_topic="/ee_action", instruction_topic="/instruction", fps=fps
    )
    summary = convert_bags([bag], tmp_path / "ds", cfg)
    assert summary["episodes"] == 2 and summary["frames"] == 2 * frames_per_episode
    ds = LeRobotDataset(tmp_path / "ds", image_format="uint8_hwc")
    assert len(ds) == 2 * frames_per_episode
    episodes = ds.meta.episodes
    assert episodes["length"].tolist() == [frames_per_episode] * 2
    assert episodes["success"].tolist() == [True, False]
    assert [list(t) for t in episodes["tasks"]] == [[tasks[0]], [tasks[1]]]
    for i, (episode, _stamp, action, colour) in enumerate(published):
        item = ds[i]
        assert int(item["episode_index"]) == episode
        assert item["task"] == tasks[episode]
        assert item["timestamp"].item() == pytest.approx((i % frames_per_episode) / fps, abs=1e-6)
        np.testing.assert_allclose(item["action"].numpy(), action, atol=1e-6)
        assert abs(float(item["observation.images.camera"].mean()) - colour) < 4
    starts = episodes["source_start_ns"].tolist()
    assert starts == [published[0][1], published[frames_per_episode][1]]


# ----------------------------------------------------------------------------------------------- SIGKILL


def _recorder_process(out: Path, bag_name: str, chunk_duration_s: float, log_file) -> subprocess.Popen:
    """recorder_node in a process of its own (the console script `recorder_node` runs this module's main()),
    recording /seq into ``out/bag_name``; its output goes to ``log_file``."""
    cmd = [
        sys.executable, "-m", "omnistream_vla.ros.recorder_node", "--ros-args",
        "-p", "topics:=['/seq']", "-p", f"output_dir:={out}", "-p", f"bag_name:={bag_name}",
        "-p", f"chunk_duration_s:={chunk_duration_s}", "-p", "min_free_mb:=0.0",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ))


@pytest.mark.ros  # no realtime mark: the default queue_depth (1000) holds every message a starved recorder gets late
def test_sigkill_mid_episode_leaves_readable_chunks(tmp_path):
    import rclpy
    from rclpy.node import Node
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    out = tmp_path / "bags"
    log_path = tmp_path / "recorder.log"
    log_file = log_path.open("w")
    proc = _recorder_process(out, "killed", 0.3, log_file)
    rclpy.init()
    try:
        node = Node("seq_publisher")
        pub = node.create_publisher(String, "/seq", 1000)
        start = node.create_client(Trigger, "/recorder_node/start")
        executor, thread = spin_in_thread([node])
        assert start.wait_for_service(timeout_sec=30), f"recorder_node did not come up: {log_path.read_text()}"
        wait_for(lambda: pub.get_subscription_count() > 0, timeout=20, what="recorder subscription")
        assert call_trigger(start).success
        meta_path = out / "killed" / "metadata.yaml"

        def chunks() -> int:
            if not meta_path.is_file():
                return 0
            return len(yaml.safe_load(meta_path.read_text())["rosbag2_bagfile_information"]["files"])

        k = 0
        deadline = time.monotonic() + 30
        while chunks() < 3:  # publish until at least 3 chunks are closed, then kill mid-episode
            assert time.monotonic() < deadline, "no chunks were written"
            pub.publish(String(data=str(k)))
            k += 1
            time.sleep(0.01)
        for _ in range(10):
            pub.publish(String(data=str(k)))
            k += 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        stop_spinning(executor, thread, [node])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
        rclpy.try_shutdown()

    assert "(reliable)" in log_path.read_text()  # QoS adapted to the reliable publisher
    bag = out / "killed"
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert len(meta["files"]) >= 3
    for f in meta["relative_file_paths"]:
        assert (bag / f).is_file()
    values = [int(v) for v in _read_strings(bag, "/seq")]
    counts = {t["topic_metadata"]["name"]: t["message_count"] for t in meta["topics_with_message_count"]}
    assert len(values) == counts["/seq"] > 0
    # Completed chunks hold a gap-free run of what was published (reliable QoS, same machine).
    assert values == list(range(values[0], values[0] + len(values)))
    assert values[-1] < k - 1  # the chunk in progress at the kill is the only thing missing
    (episode,) = read_episode_events(bag)
    assert episode["stop_ns"] is None  # killed mid-episode


@pytest.mark.ros
def test_node_disk_full_reports_keeps_episode_and_retries(tmp_path):
    """Disk full at stop: the service says so, /diagnostics reports ERROR, nothing is lost once space is back."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from std_msgs.msg import Float32MultiArray, String
    from std_srvs.srv import Trigger

    from omnistream_vla.ros.recorder_node import RecorderNode

    rclpy.init()
    try:
        recorder = RecorderNode(
            parameter_overrides=[
                Parameter("topics", value=["/joint_cmd"]),
                Parameter("output_dir", value=str(tmp_path / "bags")),
                Parameter("bag_name", value="full"),
                Parameter("min_free_mb", value=1e12),  # more than any disk: the real free-space check fails
                Parameter("retry_period_s", value=0.2),
            ]
        )
        node = Node("test_client")
        pub = node.create_publisher(Float32MultiArray, "/joint_cmd", 100)
        instruction = node.create_publisher(String, "/instruction", 10)
        errors = []
        node.create_subscription(
            DiagnosticArray,
            "/diagnostics",
            lambda m: errors.extend(s.message for s in m.status if s.level == DiagnosticStatus.ERROR),
            10,
        )
        start, stop = (node.create_client(Trigger, f"/recorder_node/{name}") for name in ("start", "stop"))
        executor, thread = spin_in_thread([recorder, node])
        wait_for(lambda: recorder.recorded_subscriptions.get("/joint_cmd"), what="subscription")
        wait_for(lambda: pub.get_subscription_count() > 0, what="matching")
        assert not call_trigger(stop).success  # no episode yet: a clear refusal, the node keeps running
        wait_for(lambda: instruction.get_subscription_count() > 0, what="instruction matching")
        instruction.publish(String(data="wave"))
        wait_for(lambda: recorder.control.instruction == "wave", what="instruction")
        assert call_trigger(start).success
        second = call_trigger(start)
        assert not second.success and "already running" in second.message
        for k in range(6):
            pub.publish(Float32MultiArray(data=[float(k), 0.5]))
        wait_for(lambda: recorder.control.recorder.buffered_messages >= 6 + 2, what="messages")
        reply = call_trigger(stop)
        assert not reply.success and "disk full" in reply.message and "kept for retry" in reply.message
        wait_for(lambda: any("disk full" in e for e in errors), what="diagnostics ERROR")
        assert not (tmp_path / "bags" / "full" / "metadata.yaml").exists()
        recorder.set_parameters([Parameter("min_free_mb", value=0.0)])  # space is back
        wait_for(lambda: (tmp_path / "bags" / "full" / "metadata.yaml").exists(), what="retry")
        wait_for(lambda: recorder.control.recorder.last_error is None, what="recovery")
        stop_spinning(executor, thread, [recorder, node])
    finally:
        rclpy.try_shutdown()

    from rosbags.highlevel import AnyReader

    bag = tmp_path / "bags" / "full"
    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == "/joint_cmd"]
        values = [reader.deserialize(raw, c.msgtype).data[0] for c, _, raw in reader.messages(connections=conns)]
    assert values == [0, 1, 2, 3, 4, 5]
    assert _read_strings(bag, "/instruction") == ["wave"]
    (episode,) = read_episode_events(bag)
    assert episode["instruction"] == "wave" and episode["stop_ns"] is not None


@pytest.mark.ros
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_episode_writes_everything(tmp_path, sig):
    """Ctrl-C (SIGINT) or a stop by docker/systemd (SIGTERM) mid-episode: the node stops the episode and writes
    every buffered message before exiting with 0."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    out = tmp_path / "bags"
    log_path = tmp_path / "recorder.log"
    with log_path.open("w") as log_file:
        proc = _recorder_process(out, "clean", 60.0, log_file)
        rclpy.init()
        try:
            node = Node("seq_publisher_sigint")
            pub = node.create_publisher(String, "/seq", 1000)
            start = node.create_client(Trigger, "/recorder_node/start")
            buffered = []  # the recorder's own count, from its 1 Hz /diagnostics
            node.create_subscription(
                DiagnosticArray,
                "/diagnostics",
                lambda m: buffered.extend(
                    int(kv.value) for s in m.status for kv in s.values if kv.key == "buffered_messages"
                ),
                10,
            )
            executor, thread = spin_in_thread([node])
            assert start.wait_for_service(timeout_sec=30), f"recorder_node did not come up: {log_path.read_text()}"
            wait_for(lambda: pub.get_subscription_count() > 0, timeout=20, what="recorder subscription")
            assert call_trigger(start).success
            for k in range(50):
                pub.publish(String(data=str(k)))
                time.sleep(0.005)
            # Wait until the recorder holds all 50 (a loaded machine may take seconds), then interrupt it.
            wait_for(lambda: buffered and buffered[-1] >= 50, timeout=30, what="recorder to buffer all 50")
            proc.send_signal(sig)
            assert proc.wait(timeout=20) == 0, log_path.read_text()
            stop_spinning(executor, thread, [node])
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            rclpy.try_shutdown()
    bag = out / "clean"
    assert [int(v) for v in _read_strings(bag, "/seq")] == list(range(50))
    (episode,) = read_episode_events(bag)
    assert episode["stop_ns"] is not None  # stopped on the way out
