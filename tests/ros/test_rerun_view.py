"""Live visualisation: the Rerun logging library, the ``omnistream view`` bridge on real rclpy topics, and the
command in its own process (SIGTERM finishes the file). Every check reads the written ``.rrd`` back with Rerun's
own chunk reader (``omnistream_perception.visualization.read_rrd``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("rerun", reason="rerun-sdk is not installed (requirements.txt: # visualisation)")

from ros_helpers import spin_in_thread, wait_for  # noqa: E402

from omnistream_perception import visualization as vis  # noqa: E402
from omnistream_perception.visualization import RerunLog, read_rrd  # noqa: E402

T0 = 1_700_000_000_000_000_000  # a ROS stamp in ns (2023); frames 50 ms apart
DT = 50_000_000


def _ns(times) -> list[int]:
    return [int(np.datetime64(t, "ns").astype(np.int64)) for t in times]


def test_library_logs_every_kind_on_the_given_stamps(tmp_path):
    path = tmp_path / "lib.rrd"
    rng = np.random.default_rng(0)
    k = np.array([[20.0, 0, 8], [0, 20.0, 6], [0, 0, 1]])
    with RerunLog("test", save=path) as log:
        log.set_time_ns(T0)
        log.pinhole(k, 16, 12)
        log.instruction("lift the red block")
        for i in range(4):
            log.set_time_ns(T0 + i * DT)
            log.image(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
            log.depth(np.full((12, 16), 1.0 + i, np.float32))
            log.points(rng.normal(size=(30, 3)), rng.integers(0, 255, (30, 3), dtype=np.uint8))
            log.pose([0.1 * i, 0, 0], [0, 0, 0, 1])
            log.action([0.01 * i, 0, 0, 0, 0, 0, 1.0], stop=i == 3)
    rrd = read_rrd(path)
    for entity in (vis.IMAGE, vis.DEPTH, vis.POINTS, vis.CAMERA_PATH, vis.ACTION, vis.STOP):
        assert rrd.rows["/" + entity] == 4, (entity, rrd.rows)
    times, values = rrd.column(vis.ACTION, "Scalars:scalars", vis.ROS_TIMELINE)
    assert _ns(times) == [T0 + i * DT for i in range(4)]
    assert [v[0] for v in values] == pytest.approx([0.0, 0.01, 0.02, 0.03])
    _, stops = rrd.column(vis.STOP, "Scalars:scalars", vis.ROS_TIMELINE)
    assert [s[0] for s in stops] == [0.0, 0.0, 0.0, 1.0]
    _, names = rrd.column(vis.ACTION, "SeriesLines:names")
    assert names == [list(vis.ACTION_NAMES)]
    _, poses = rrd.column(vis.CAMERA, "Transform3D:translation", vis.ROS_TIMELINE, mono=True)
    assert [p[0] for p in poses] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    _, strips = rrd.column(vis.CAMERA_PATH, "LineStrips3D:strips", vis.ROS_TIMELINE, mono=True)
    assert [len(s) for s in strips] == [1, 2, 3, 4]  # the path grows by one camera centre per pose
    _, texts = rrd.column(vis.INSTRUCTION, "TextDocument:text", vis.ROS_TIMELINE, mono=True)
    assert texts == ["lift the red block"]
    _, depths = rrd.column(vis.DEPTH, "DepthImage:buffer", vis.ROS_TIMELINE, mono=True)
    assert np.frombuffer(bytes(depths[-1]), np.float32) == pytest.approx(np.full(12 * 16, 4.0))  # exact, not JPEG


def test_library_rejects_bad_input_with_a_clear_error(tmp_path):
    log = RerunLog("test", memory=True)
    with pytest.raises(ValueError, match="uint8"):
        log.image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="7 values"):
        log.action([0.0] * 6)
    with pytest.raises(ValueError, match="not a rotation"):
        log.pose([0, 0, 0], [0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        log.points(np.zeros((5, 2)))
    log.close()
    with pytest.raises(ValueError, match=r"\.rrd"):
        RerunLog("test", save=tmp_path / "x.txt")
    with pytest.raises(ValueError, match="exactly one"):
        RerunLog("test", save=tmp_path / "x.rrd", memory=True)


def _stack_publishers(node_factory):
    """Publishers named and typed like perception_node's and vla_node's outputs (and a camera)."""
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from std_msgs.msg import String

    from omnistream_msgs.msg import EndEffectorAction

    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    perception = node_factory("perception_node")
    vla = node_factory("vla_node")
    camera = node_factory("camera")
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    pubs = {
        "image": camera.create_publisher(
            Image, "image", QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
        ),
        "depth": perception.create_publisher(Image, "~/depth", reliable),
        "depth_info": perception.create_publisher(CameraInfo, "~/depth/camera_info", reliable),
        "points": perception.create_publisher(PointCloud2, "~/points", reliable),
        "pose": perception.create_publisher(PoseStamped, "~/pose", reliable),
        "action": vla.create_publisher(EndEffectorAction, "~/action", reliable),
        "instruction": camera.create_publisher(String, "instruction", latched),
    }
    return [perception, vla, camera], pubs


def _publish_frame(pubs, i: int, rng) -> None:
    from builtin_interfaces.msg import Time
    from geometry_msgs.msg import PoseStamped
    from std_msgs.msg import Header

    from omnistream_msgs.msg import EndEffectorAction
    from omnistream_perception.ros.image import camera_info_from_intrinsics, depth_to_msg, rgb_to_image
    from omnistream_perception.ros.pointcloud import xyzrgb_to_pointcloud2

    ns = T0 + i * DT
    header = Header(stamp=Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000), frame_id="omnistream_world")
    pubs["image"].publish(rgb_to_image(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), header))
    depth = np.full((24, 32), 1.0 + 0.1 * i, np.float32)
    depth[0, 0] = np.nan  # an invalid pixel (REP 118): logged, not a reason to drop the frame
    pubs["depth"].publish(depth_to_msg(depth, header))
    k = np.array([[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]])
    pubs["depth_info"].publish(camera_info_from_intrinsics(k, 32, 24, header))
    pubs["points"].publish(xyzrgb_to_pointcloud2(rng.normal(size=(50, 3)).astype(np.float32), None, header))
    pose = PoseStamped(header=header)
    pose.pose.position.x, pose.pose.orientation.w = 0.05 * i, 1.0
    pubs["pose"].publish(pose)
    action = EndEffectorAction(header=header, gripper=1.0, mode="relative")
    action.translation.x = 0.01 * i
    pubs["action"].publish(action)


@pytest.mark.ros
def test_bridge_logs_a_stack_on_header_stamps(tmp_path):
    """The bridge on its default topic names, against publishers named like the stack's nodes: every message is
    in the file at its header stamp; a malformed one is counted and dropped while the rest goes on."""
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from omnistream_perception.ros.rerun_bridge import RerunBridgeNode

    frames, path = 5, tmp_path / "bridge.rrd"
    rng = np.random.default_rng(1)
    rclpy.init()
    try:
        log = RerunLog("test", save=path)
        bridge = RerunBridgeNode(log, node_name="view_under_test")
        nodes, pubs = _stack_publishers(Node)
        executor, thread = spin_in_thread([bridge, *nodes])
        wait_for(lambda: all(p.get_subscription_count() > 0 for p in pubs.values()), 20, "the bridge's subscriptions")
        pubs["instruction"].publish(String(data="push the blue block"))
        bad = Image(height=2, width=2, encoding="32FC1", step=8, data=[0] * 3)  # data length wrong
        pubs["depth"].publish(bad)
        for i in range(frames):
            _publish_frame(pubs, i, rng)
            time.sleep(0.02)  # best-effort camera frames: a paced publisher, as a camera is
        kinds = ("image", "depth", "points", "pose", "action", "depth_info", "instruction")
        want = {k: (1 if k == "instruction" else frames) for k in kinds}
        want["depth"] += 1  # the malformed one
        wait_for(lambda: all(bridge.received.get(k, 0) >= n for k, n in want.items()), 20,
                 f"all messages at the bridge (have {bridge.received})")  # fmt: skip
        executor.shutdown()
        thread.join(timeout=5)
        log.close()
        assert bridge.errors == {"depth": 1}
        for node in (bridge, *nodes):
            node.destroy_node()
    finally:
        rclpy.try_shutdown()

    rrd = read_rrd(path)
    stamps = [T0 + i * DT for i in range(frames)]
    for entity, component in [(vis.IMAGE, "EncodedImage:blob"), (vis.DEPTH, "DepthImage:buffer"),
                              (vis.POINTS, "Points3D:positions"), (vis.CAMERA, "Transform3D:translation"),
                              (vis.ACTION, "Scalars:scalars")]:  # fmt: skip
        times, _ = rrd.column(entity, component, vis.ROS_TIMELINE)
        assert _ns(times) == stamps, entity
    times, pinholes = rrd.column(vis.CAMERA, "Pinhole:image_from_camera", vis.ROS_TIMELINE)
    assert len(pinholes) == 1  # logged once: the intrinsics did not change
    _, strips = rrd.column(vis.CAMERA_PATH, "LineStrips3D:strips", vis.ROS_TIMELINE, mono=True)
    assert np.asarray(strips[-1])[:, 0] == pytest.approx([0.05 * i for i in range(frames)])
    _, actions = rrd.column(vis.ACTION, "Scalars:scalars", vis.ROS_TIMELINE)
    assert [a[0] for a in actions] == pytest.approx([0.01 * i for i in range(frames)])
    _, texts = rrd.column(vis.INSTRUCTION, "TextDocument:text", vis.ROS_TIMELINE, mono=True)
    assert texts == ["push the blue block"]
    _, depths = rrd.column(vis.DEPTH, "DepthImage:buffer", vis.ROS_TIMELINE, mono=True)
    last = np.frombuffer(bytes(depths[-1]), np.float32)
    assert np.isnan(last[0]) and last[1:] == pytest.approx(1.0 + 0.1 * (frames - 1))


@pytest.mark.ros
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_view_command_signal_finishes_the_file(tmp_path, signum):
    """`omnistream view --save` in its own process: it logs what a stack publishes and, on Ctrl-C (SIGINT) or
    SIGTERM, exits 0 with a complete file (Rerun's reader finds every frame)."""
    import rclpy
    from rclpy.node import Node

    path = tmp_path / "live.rrd"
    log_path = tmp_path / "view.log"
    cmd = [sys.executable, "-m", "omnistream_cli.main", "view", "--save", str(path)]
    rng = np.random.default_rng(2)
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
        rclpy.init()
        try:
            nodes, pubs = _stack_publishers(Node)
            executor, thread = spin_in_thread(nodes)
            wait_for(lambda: all(pub.get_subscription_count() > 0 for pub in pubs.values()), 60,
                     f"omnistream view to subscribe: {log_path.read_text()}")  # fmt: skip
            for i in range(3):
                _publish_frame(pubs, i, rng)
                time.sleep(0.05)
            # time for the view to log them before the signal: its first frames wait for Rerun's lazy set-up
            # (about 3 s in a fresh checkout; messages still queued at the signal are not logged)
            time.sleep(6.0)
            proc.send_signal(signum)
            assert proc.wait(timeout=30) == 0, log_path.read_text()
            executor.shutdown()
            thread.join(timeout=5)
            for node in nodes:
                node.destroy_node()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            rclpy.try_shutdown()
    text = log_path.read_text()
    assert "Traceback" not in text, text
    from rerun.chunk import RrdReader

    assert RrdReader(path).store().summary()  # the footer (manifest) is only written by a clean finish
    rrd = read_rrd(path)
    for entity in (vis.POINTS, vis.ACTION, vis.DEPTH):
        assert rrd.rows.get("/" + entity) == 3, (entity, rrd.rows, text)
    assert f"wrote {path}" in text


def test_view_command_bad_options_are_user_errors(tmp_path, capsys):
    from omnistream_cli.main import main as cli_main

    assert cli_main(["view", "--save", str(tmp_path / "live.mp4")]) == 2
    assert "--save must name an .rrd file" in capsys.readouterr().err
    assert cli_main(["view", "--save", str(tmp_path / "live.rrd"), "--duration", "0"]) == 2
    assert cli_main(["view", "--save", str(tmp_path / "live.rrd"), "--jpeg-quality", "101"]) == 2


def test_plot_script_draws_a_recording(tmp_path):
    """scripts/plot_rrd.py (the README picture) reads a recording back and draws it."""
    import runpy
    from pathlib import Path

    path = tmp_path / "rec.rrd"
    rng = np.random.default_rng(3)
    with RerunLog("test", save=path) as log:
        log.instruction("lift")
        for i in range(3):
            log.set_time_ns(T0 + i * DT)
            log.image(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
            log.depth(np.full((12, 16), 1.0 + i, np.float32))
            log.points(rng.normal(size=(20, 3)), rng.integers(0, 255, (20, 3), dtype=np.uint8))
            log.pose([0.1 * i, 0, 0], [0, 0, 0, 1])
            log.action(rng.normal(size=7), stop=False)
    script = Path(__file__).resolve().parents[2] / "scripts" / "plot_rrd.py"
    png = tmp_path / "out.png"
    assert runpy.run_path(str(script))["main"]([str(path), "--out", str(png)]) == 0
    from PIL import Image

    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 300
