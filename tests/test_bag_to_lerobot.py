"""Bags written with `rosbags` (how users' existing bags look) -> LeRobot v3.0, and the CLI around it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from omnistream_cli.main import main as cli_main
from omnistream_train.bag_to_lerobot import BagConversionConfig, convert_bags
from omnistream_train.lerobot_dataset import LeRobotDataset

FPS = 10
H, W = 32, 48
T0 = 1_700_000_000 * 1_000_000_000  # a realistic epoch time in ns


def _frame(k: int) -> np.ndarray:
    """A frame whose colour encodes its index (survives AV1 compression to within a few levels)."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = (10 * k) % 250
    img[..., 1] = 200 - (7 * k) % 150
    img[..., 2] = 60
    return img


def write_user_bag(path: Path, frames: int = 15, instruction_at: dict[int, str] | None = None) -> list[np.ndarray]:
    """A bag like users have: Image (bgr8, no header stamps), String instructions, Float32MultiArray actions."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    Image, Header, Time = (
        ts.types["sensor_msgs/msg/Image"],
        ts.types["std_msgs/msg/Header"],
        ts.types["builtin_interfaces/msg/Time"],
    )
    String = ts.types["std_msgs/msg/String"]
    F32 = ts.types["std_msgs/msg/Float32MultiArray"]
    Layout = ts.types["std_msgs/msg/MultiArrayLayout"]
    instruction_at = instruction_at or {0: "pick up the red block"}
    actions = []
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        cam = writer.add_connection("/camera/image_raw", Image.__msgtype__, typestore=ts)
        ins = writer.add_connection("/instruction", String.__msgtype__, typestore=ts)
        act = writer.add_connection("/action", F32.__msgtype__, typestore=ts)
        step = 1_000_000_000 // FPS
        for k in range(frames):
            t = T0 + k * step
            if k in instruction_at:
                writer.write(ins, t - 1000, ts.serialize_cdr(String(data=instruction_at[k]), String.__msgtype__))
            bgr = np.ascontiguousarray(_frame(k)[..., ::-1])
            img = Image(
                header=Header(stamp=Time(sec=0, nanosec=0), frame_id="cam"),
                height=H,
                width=W,
                encoding="bgr8",
                is_bigendian=0,
                step=W * 3,
                data=bgr.reshape(-1),
            )
            writer.write(cam, t, ts.serialize_cdr(img, Image.__msgtype__))
            action = np.array([k, -k, 0.5 * k, 0, 0, 0.01 * k, 1 if k % 2 else -1], np.float32)
            actions.append(action)
            msg = F32(layout=Layout(dim=[], data_offset=0), data=action)
            writer.write(act, t + 2_000_000, ts.serialize_cdr(msg, F32.__msgtype__))  # 2 ms after the image
    return actions


def test_rosbags_bag_converts(tmp_path):
    bag = tmp_path / "user_bag"
    actions = write_user_bag(bag, frames=15, instruction_at={0: "pick up the red block", 8: "place it in the tray"})
    cfg = BagConversionConfig(
        camera_topics=["/camera/image_raw"], action_topic="/action", instruction_topic="/instruction"
    )
    summary = convert_bags([bag], tmp_path / "ds", cfg)
    assert summary["fps"] == FPS  # estimated from the camera
    ds = LeRobotDataset(tmp_path / "ds", image_format="uint8_hwc")
    assert len(ds) == 15 and ds.num_episodes == 1
    info = json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_frames"] == 15 and info["total_tasks"] == 2
    assert info["features"]["observation.images.camera"]["info"]["video.codec"] == "av1"
    for k in (0, 7, 8, 14):
        item = ds[k]
        np.testing.assert_allclose(item["action"].numpy(), actions[k])
        assert item["timestamp"].item() == pytest.approx(k / FPS)
        assert item["task"] == ("pick up the red block" if k < 8 else "place it in the tray")
        # bgr8 was converted to RGB: channel 0 carries the index, channel 2 is constant.
        assert abs(int(item["observation.images.camera"][..., 0].mean()) - int(_frame(k)[..., 0].mean())) <= 4
        assert abs(int(item["observation.images.camera"][..., 2].mean()) - 60) <= 4
    stats = ds.stats["action"]
    np.testing.assert_allclose(stats["max"], np.max(actions, axis=0), rtol=1e-6)
    assert set(stats) >= {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    assert np.asarray(ds.stats["observation.images.camera"]["mean"]).shape == (3, 1, 1)


def test_interpolate_alignment_and_fixed_fps(tmp_path):
    bag = tmp_path / "bag"
    actions = write_user_bag(bag, frames=10)
    cfg = BagConversionConfig(
        camera_topics=["/camera/image_raw"],
        action_topic="/action",
        fps=20,
        alignment="interpolate",
        default_task="fallback task",
    )
    convert_bags([bag], tmp_path / "ds", cfg)
    ds = LeRobotDataset(tmp_path / "ds", image_format="uint8_hwc")
    assert len(ds) == 19  # 0.9 s at 20 fps
    # Frame 1 is half-way between actions 0 and 1 (minus the 2 ms offset of the action messages).
    expected = actions[0] + (50 - 2) / 100 * (actions[1] - actions[0])
    np.testing.assert_allclose(ds[1]["action"].numpy(), expected, atol=1e-5)
    assert ds[0]["task"] == "fallback task"


def test_missing_topic_lists_what_exists(tmp_path):
    bag = tmp_path / "bag"
    write_user_bag(bag, frames=3)
    cfg = BagConversionConfig(camera_topics=["/front/image_raw"], action_topic="/action")
    with pytest.raises(ValueError, match=r"/front/image_raw.*it has: /action \[std_msgs/msg/Float32MultiArray\]"):
        convert_bags([bag], tmp_path / "ds", cfg)
    (bag / "metadata.yaml").write_text("rosbag2_bagfile_information: {version: 999}\n")
    with pytest.raises(ValueError, match="cannot read the bag"):
        convert_bags([bag], tmp_path / "ds", cfg)
    with pytest.raises(ValueError, match="not a rosbag2 directory"):
        convert_bags([tmp_path / "nothing"], tmp_path / "ds", cfg)


def test_cli_bag_to_lerobot_info_view(tmp_path, capsys):
    bag = tmp_path / "bag"
    write_user_bag(bag, frames=6)
    out = tmp_path / "ds"
    rc = cli_main(
        [
            "data",
            "bag-to-lerobot",
            str(bag),
            "--out",
            str(out),
            "--camera-topics",
            "/camera/image_raw",
            "--action-topic",
            "/action",
            "--instruction-topic",
            "/instruction",
            "--fps",
            "10",
        ]
    )
    assert rc == 0
    assert cli_main(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "v3.0" in text and "pick up the red block" in text
    png = tmp_path / "ep0.png"
    assert cli_main(["data", "view", str(out), "--episode", "0", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    # Bad input: exit 2 with the topics listed, no traceback.
    rc = cli_main(
        [
            "data",
            "bag-to-lerobot",
            str(bag),
            "--out",
            str(tmp_path / "x"),
            "--camera-topics",
            "/nope",
            "--action-topic",
            "/action",
        ]
    )
    assert rc == 2
    assert "/camera/image_raw" in capsys.readouterr().err


def _recorder_bag(tmp_path: Path, episodes: list[tuple[str, int, bool, bool]]) -> Path:
    """A bag written by the recorder core: (instruction, frames, success, stopped) per episode."""
    from rosbags.typesys import Stores, get_typestore

    from omnistream_vla.recording import BagRecorder

    ts = get_typestore(Stores.ROS2_KILTED)
    Image, F32 = ts.types["sensor_msgs/msg/Image"], ts.types["std_msgs/msg/Float32MultiArray"]
    Header, Time, Layout = (
        ts.types["std_msgs/msg/Header"],
        ts.types["builtin_interfaces/msg/Time"],
        ts.types["std_msgs/msg/MultiArrayLayout"],
    )
    rec = BagRecorder(tmp_path / "bags", bag_name="rec", min_free_bytes=0)
    rec.add_topic("/cam/image_raw", Image.__msgtype__)
    rec.add_topic("/cmd", F32.__msgtype__)
    t = T0
    for e, (instruction, frames, success, stopped) in enumerate(episodes):
        rec.start_episode(instruction, t)
        for k in range(frames):
            t += 100_000_000
            img = Image(header=Header(stamp=Time(sec=0, nanosec=0), frame_id=""), height=H, width=W, encoding="rgb8",
                        is_bigendian=0, step=W * 3, data=_frame(k).reshape(-1))  # fmt: skip
            rec.add("/cam/image_raw", t, bytes(ts.serialize_cdr(img, Image.__msgtype__)))
            cmd = F32(layout=Layout(dim=[], data_offset=0), data=np.array([e, k], np.float32))
            rec.add("/cmd", t, bytes(ts.serialize_cdr(cmd, F32.__msgtype__)))
        if success:
            rec.annotate(t, success=True)
        t += 50_000_000
        if stopped:
            rec.stop_episode(t)
        rec.flush()
        t += 1_000_000_000  # a pause between episodes
    return tmp_path / "bags" / "rec"


def test_recorder_episodes_success_filter_and_crash_cut_episode(tmp_path):
    bag = _recorder_bag(
        tmp_path, [("push left", 5, True, True), ("push right", 4, False, True), ("lift", 3, True, False)]
    )
    cfg = BagConversionConfig(camera_topics=["/cam/image_raw"], action_topic="/cmd", camera_names=["static"])
    summary = convert_bags([bag], tmp_path / "all", cfg)
    assert summary["fps"] == 10 and summary["episodes"] == 3 and summary["frames"] == 12
    ds = LeRobotDataset(tmp_path / "all", image_format="uint8_hwc")
    eps = ds.meta.episodes
    assert eps["length"].tolist() == [5, 4, 3]
    assert eps["success"].tolist() == [True, False, True]
    assert eps["complete"].tolist() == [True, True, False]  # the last one was never stopped (crash)
    assert [ds[i]["task"] for i in (0, 5, 9)] == ["push left", "push right", "lift"]
    np.testing.assert_array_equal(ds[6]["action"].numpy(), [1, 1])
    assert "observation.images.static" in ds[0]

    cfg = BagConversionConfig(camera_topics=["/cam/image_raw"], action_topic="/cmd", only_successful=True)
    summary = convert_bags([bag], tmp_path / "ok", cfg)
    assert summary["episodes"] == 2 and summary["skipped_episodes"] == 1
    assert LeRobotDataset(tmp_path / "ok").meta.episodes["tasks"].map(list).tolist() == [["push left"], ["lift"]]


def test_compressed_images_joint_state_action_pose_state(tmp_path):
    """CompressedImage (png) cameras, a JointState action and a PoseStamped state, all header-stamped."""
    import io

    from PIL import Image as PILImage
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    T = ts.types
    Header, Time = T["std_msgs/msg/Header"], T["builtin_interfaces/msg/Time"]
    bag = tmp_path / "bag"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        cam = writer.add_connection("/wrist/image_raw/compressed", "sensor_msgs/msg/CompressedImage", typestore=ts)
        act = writer.add_connection("/joint_commands", "sensor_msgs/msg/JointState", typestore=ts)
        pose = writer.add_connection("/tcp_pose", "geometry_msgs/msg/PoseStamped", typestore=ts)
        for k in range(6):
            t = T0 + k * 50_000_000
            header = Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id="")
            buffer = io.BytesIO()
            PILImage.fromarray(_frame(k)).save(buffer, format="PNG")
            png = np.frombuffer(buffer.getvalue(), np.uint8)
            msg = T["sensor_msgs/msg/CompressedImage"](header=header, format="png", data=png)
            writer.write(cam, t + 7_000_000, ts.serialize_cdr(msg, msg.__msgtype__))  # logged late: stamps win
            js = T["sensor_msgs/msg/JointState"](header=header, name=["j1", "j2"], position=np.array([k, 2.0 * k]),
                                                 velocity=np.zeros(0), effort=np.zeros(0))  # fmt: skip
            writer.write(act, t, ts.serialize_cdr(js, js.__msgtype__))
            p = T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=0.1 * k, y=0.0, z=0.3),
                                            orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0))  # fmt: skip
            ps = T["geometry_msgs/msg/PoseStamped"](header=header, pose=p)
            writer.write(pose, t, ts.serialize_cdr(ps, ps.__msgtype__))
    cfg = BagConversionConfig(camera_topics=["/wrist/image_raw/compressed"], action_topic="/joint_commands",
                              state_topic="/tcp_pose", default_task="wave")  # fmt: skip
    assert convert_bags([bag], tmp_path / "ds", cfg)["fps"] == 20
    ds = LeRobotDataset(tmp_path / "ds", image_format="uint8_hwc")
    assert len(ds) == 6 and ds.meta.features["action"]["names"] == ["j1", "j2"]
    assert ds.meta.features["observation.state"]["names"] == ["x", "y", "z", "qx", "qy", "qz", "qw"]
    item = ds[4]
    np.testing.assert_allclose(item["action"].numpy(), [4, 8])
    np.testing.assert_allclose(item["observation.state"].numpy(), [0.4, 0, 0.3, 0, 0, 0, 1], atol=1e-6)
    assert abs(float(item["observation.images.wrist"][..., 0].mean()) - 40) <= 4  # camera key from the topic


def test_images_sharing_a_log_time_are_told_apart(tmp_path):
    """Bags logged in bursts give several images one log time; their header stamps order them."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    T = ts.types
    bag = tmp_path / "burst"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        cam = writer.add_connection("/cam", "sensor_msgs/msg/Image", typestore=ts)
        act = writer.add_connection("/act", "std_msgs/msg/Float32MultiArray", typestore=ts)
        for k in range(6):
            stamp = T0 + k * 100_000_000
            header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=stamp // 10**9, nanosec=stamp % 10**9), frame_id="")  # fmt: skip
            img = T["sensor_msgs/msg/Image"](header=header, height=H, width=W, encoding="rgb8", is_bigendian=0,
                                             step=W * 3, data=_frame(k).reshape(-1))  # fmt: skip
            writer.write(cam, T0 + (k // 3) * 300_000_000, ts.serialize_cdr(img, img.__msgtype__))  # 3 per log time
            data = T["std_msgs/msg/Float32MultiArray"](layout=T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0),
                                                        data=np.array([k], np.float32))  # fmt: skip
            writer.write(act, stamp, ts.serialize_cdr(data, data.__msgtype__))
    cfg = BagConversionConfig(camera_topics=["/cam"], action_topic="/act", default_task="t", fps=10)
    convert_bags([bag], tmp_path / "ds", cfg)
    ds = LeRobotDataset(tmp_path / "ds", image_format="uint8_hwc")
    assert len(ds) == 6
    for k in range(6):
        assert abs(int(ds[k]["observation.images.cam"][..., 0].mean()) - int(_frame(k)[..., 0].mean())) <= 4
        assert ds[k]["action"].tolist() == [k]
