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


def write_user_bag(
    path: Path,
    frames: int = 15,
    instruction_at: dict[int, str] | None = None,
    pause_after: dict[int, float] | None = None,
) -> list[np.ndarray]:
    """A bag like users have: Image (bgr8, no header stamps), String instructions, Float32MultiArray actions, no
    episode events. ``pause_after[k]``: seconds nothing is recorded after frame k (between demonstrations)."""
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
        pause_ns = 0
        for k in range(frames):
            t = T0 + k * step + pause_ns
            pause_ns += int((pause_after or {}).get(k, 0.0) * 1e9)
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
    # One demonstration whose instruction changes half-way (a two-step task): kept as one episode on request.
    cfg = BagConversionConfig(
        camera_topics=["/camera/image_raw"],
        action_topic="/action",
        instruction_topic="/instruction",
        split_on_instruction=False,
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


# ----------------------------------------------------------------------------------------------- splitting


def _assert_frames_are_recorded_ones(ds, actions, recorded: list[int]):
    """Every dataset frame is a recorded frame (its action and image), in order: nothing invented or repeated."""
    assert len(ds) == len(recorded)
    for i, k in enumerate(recorded):
        item = ds[i]
        np.testing.assert_allclose(item["action"].numpy(), actions[k])
        image = item["observation.images.camera"]
        for c in (0, 1):
            assert abs(int(image[..., c].mean()) - int(_frame(k)[..., c].mean())) <= 4, (i, k, c)


def test_user_bag_two_demonstrations_with_a_pause(tmp_path, capsys):
    """Two 30-frame demonstrations at 10 Hz, 5 s apart, no episode events: 2 episodes, 60 recorded frames."""
    bag = tmp_path / "two_demos"
    tasks = ["pick up the red block", "open the drawer"]
    actions = write_user_bag(bag, frames=60, instruction_at={0: tasks[0], 30: tasks[1]}, pause_after={29: 5.0})
    summary_path = tmp_path / "summary.json"
    rc = cli_main(
        ["data", "bag-to-lerobot", str(bag), "--out", str(tmp_path / "ds"), "--camera-topics", "/camera/image_raw",
         "--action-topic", "/action", "--instruction-topic", "/instruction", "--summary", str(summary_path)]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "episode 0: 30 frames, 0 images dropped, 0 frames filled" in printed
    assert "episode 1: 30 frames, 0 images dropped, 0 frames filled" in printed
    summary = json.loads(summary_path.read_text())
    assert summary["fps"] == FPS and summary["episodes"] == 2 and summary["frames"] == 60
    assert [e["tasks"] for e in summary["episode_details"]] == [[tasks[0]], [tasks[1]]]
    assert summary["filled_frames"] == 0 and summary["dropped_images"] == 0
    ds = LeRobotDataset(tmp_path / "ds", image_format="uint8_hwc")
    episodes = ds.meta.episodes
    assert episodes["length"].tolist() == [30, 30]
    assert [list(t) for t in episodes["tasks"]] == [[tasks[0]], [tasks[1]]]
    assert episodes["filled_frames"].tolist() == [0, 0] and episodes["dropped_images"].tolist() == [0, 0]
    _assert_frames_are_recorded_ones(ds, actions, list(range(60)))
    assert ds[30]["timestamp"].item() == 0.0 and int(ds[30]["episode_index"]) == 1

    # Splitting on the pause alone, with the instruction changes kept in one episode: the same two episodes.
    cfg = BagConversionConfig(camera_topics=["/camera/image_raw"], action_topic="/action",
                              instruction_topic="/instruction", split_on_instruction=False)  # fmt: skip
    assert convert_bags([bag], tmp_path / "gap_only", cfg)["episodes"] == 2


def test_user_bag_instruction_change_without_a_pause_splits(tmp_path):
    bag = tmp_path / "no_pause"
    # The first instruction is published again mid-way (a periodic publisher): that is not a new episode.
    at = {0: "push the button", 5: "push the button", 10: "slide the door"}
    actions = write_user_bag(bag, frames=20, instruction_at=at)
    cfg = BagConversionConfig(
        camera_topics=["/camera/image_raw"], action_topic="/action", instruction_topic="/instruction"
    )
    summary = convert_bags([bag], tmp_path / "ds", cfg)
    assert summary["episodes"] == 2 and summary["frames"] == 20 and summary["filled_frames"] == 0
    ds = LeRobotDataset(tmp_path / "ds", image_format="uint8_hwc")
    assert ds.meta.episodes["length"].tolist() == [10, 10]
    assert [list(t) for t in ds.meta.episodes["tasks"]] == [["push the button"], ["slide the door"]]
    _assert_frames_are_recorded_ones(ds, actions, list(range(20)))


def test_gap_threshold_is_configurable_and_filling_is_counted(tmp_path, capsys):
    """A gap threshold longer than the pause keeps one episode: the 50 frames filled in the pause are counted,
    never silent; a threshold shorter than a frame period is refused."""
    bag = tmp_path / "two_demos"
    write_user_bag(bag, frames=60, instruction_at={0: "wave"}, pause_after={29: 5.0})
    cfg = BagConversionConfig(camera_topics=["/camera/image_raw"], action_topic="/action",
                              instruction_topic="/instruction", max_gap_s=10.0)  # fmt: skip
    summary = convert_bags([bag], tmp_path / "ds", cfg)
    assert summary["episodes"] == 1 and summary["frames"] == 110
    assert summary["filled_frames"] == 50 and summary["episode_details"][0]["filled_frames"] == 50
    cfg = BagConversionConfig(camera_topics=["/camera/image_raw"], action_topic="/action", default_task="t", fps=20)
    summary = convert_bags([bag], tmp_path / "fast", cfg)  # 20 fps from a 10 Hz camera: every other frame filled
    assert [e["frames"] for e in summary["episode_details"]] == [59, 59]
    assert [e["filled_frames"] for e in summary["episode_details"]] == [29, 29]
    with pytest.raises(ValueError, match="max_gap_s"):
        BagConversionConfig(camera_topics=["/c"], action_topic="/a", max_gap_s=float("nan"))
    rc = cli_main(
        ["data", "bag-to-lerobot", str(bag), "--out", str(tmp_path / "x"), "--camera-topics", "/camera/image_raw",
         "--action-topic", "/action", "--task", "t", "--max-gap", "0.05"]
    )  # fmt: skip
    assert rc == 2 and "longer than one frame period" in capsys.readouterr().err


def test_recorder_episode_with_a_camera_drop_out_is_split_not_filled(tmp_path):
    """A recorder episode (with events) whose camera stopped for 3 s: two parts with the episode's instruction and
    success, no frame invented in the drop-out."""
    from rosbags.typesys import Stores, get_typestore

    from omnistream_vla.recording import BagRecorder

    ts = get_typestore(Stores.ROS2_KILTED)
    T = ts.types
    rec = BagRecorder(tmp_path / "bags", bag_name="drop", min_free_bytes=0)
    rec.add_topic("/cam", "sensor_msgs/msg/Image")
    rec.add_topic("/cmd", "std_msgs/msg/Float32MultiArray")
    rec.start_episode("wipe the table", T0)
    for k in range(20):
        t = T0 + (k + 1) * 100_000_000 + (3_000_000_000 if k >= 10 else 0)
        header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id="")
        img = T["sensor_msgs/msg/Image"](header=header, height=H, width=W, encoding="rgb8", is_bigendian=0,
                                         step=W * 3, data=_frame(k).reshape(-1))  # fmt: skip
        rec.add("/cam", t, bytes(ts.serialize_cdr(img, img.__msgtype__)))
        cmd = T["std_msgs/msg/Float32MultiArray"](layout=T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0),
                                                   data=np.array([k], np.float32))  # fmt: skip
        rec.add("/cmd", t, bytes(ts.serialize_cdr(cmd, cmd.__msgtype__)))
    rec.annotate(T0 + 5_000_000_000, success=True)
    rec.stop_episode(T0 + 5_100_000_000)
    rec.flush()
    cfg = BagConversionConfig(camera_topics=["/cam"], action_topic="/cmd", fps=10)
    summary = convert_bags([tmp_path / "bags" / "drop"], tmp_path / "ds", cfg)
    assert summary["episodes"] == 2 and summary["frames"] == 20 and summary["filled_frames"] == 0
    assert [e["source_episode"] for e in summary["episode_details"]] == [0, 0]
    ds = LeRobotDataset(tmp_path / "ds", image_format="uint8_hwc")
    assert ds.meta.episodes["length"].tolist() == [10, 10] and ds.meta.episodes["success"].tolist() == [True, True]
    assert [ds[i]["action"].tolist() for i in range(20)] == [[k] for k in range(20)]
    assert {ds[i]["task"] for i in range(20)} == {"wipe the table"}
