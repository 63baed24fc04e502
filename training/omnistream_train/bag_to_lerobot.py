"""rosbag2 bags (ours from ``recorder_node``, or anyone's) -> a LeRobot v3.0 dataset.

Streams are put on one clock at ``fps``: every episode gets frames at ``t0 + k / fps`` from its first camera
image to its last; each camera contributes its nearest image, and numeric streams (action, state) their
nearest message or a linear interpolation (``alignment="interpolate"``). A message's time is its header
stamp when it has a non-zero one, else the time the bag logged it (the recorder's receive time, which lags
the publisher by transport and scheduling delays: prefer stamped types such as JointState for state that
must match frames exactly).

Episodes: from the recorder's ``.../episode_events`` topic when the bag has one (instruction, success,
notes; an episode cut by a crash is kept up to its last message on disk, with ``complete=False`` in the
episodes table). A bag without episode events (anyone's bag) is split where the instruction changes
(``split_on_instruction``, when an instruction topic is given) and wherever a camera is silent for longer than
``max_gap_s`` (default: the longer of 1 s and 3 frame periods). Gaps split recorder episodes too: no frame is
ever invented to fill a pause. A frame's task is the latest instruction message at or before it, else its
episode's instruction, else ``default_task``.

Nothing is lost or invented silently: each episode reports ``dropped_images`` (camera images inside the episode
that no frame uses: a camera faster than ``fps``) and ``filled_frames`` (frames that repeat the previous frame's
image: a camera slower than ``fps`` or a short drop-out), summed over cameras, in the summary and as columns of
the episodes table.

Supported message types:
  cameras      sensor_msgs/msg/Image (rgb8, bgr8, rgba8, bgra8, mono8), sensor_msgs/msg/CompressedImage
  action       omnistream_msgs/msg/EndEffectorAction (x y z roll pitch yaw gripper), sensor_msgs/msg/JointState
               (positions), std_msgs/msg/Float32MultiArray / Float64MultiArray (data)
  state        the same as action, plus geometry_msgs/msg/PoseStamped (x y z qx qy qz qw)
  instruction  std_msgs/msg/String
Images are decoded with ``omnistream_perception.ros.image`` (the same code the nodes use).
"""

from __future__ import annotations

import logging
import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .lerobot_dataset import LeRobotDatasetWriter

log = logging.getLogger(__name__)

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
EE_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
VECTOR_TYPES = (
    "omnistream_msgs/msg/EndEffectorAction",
    "sensor_msgs/msg/JointState",
    "std_msgs/msg/Float32MultiArray",
    "std_msgs/msg/Float64MultiArray",
)
STATE_TYPES = (*VECTOR_TYPES, "geometry_msgs/msg/PoseStamped")


@dataclass
class BagConversionConfig:
    camera_topics: list[str]
    action_topic: str
    camera_names: list[str] | None = None  # dataset camera names (e.g. the policy's "static"); default from topics
    state_topic: str | None = None
    instruction_topic: str | None = None
    fps: int | None = None  # None: from the first camera's median message interval
    alignment: str = "nearest"  # "nearest" | "interpolate" (numeric streams only; images are never blended)
    default_task: str | None = None
    episode_events_topic: str | None = None  # None: any ".../episode_events" topic
    only_successful: bool = False
    robot_type: str | None = None
    extra_episode_info: dict[str, Any] = field(default_factory=dict)
    max_gap_s: float | None = None  # a camera silent longer than this ends an episode; None: max(1 s, 3 frames)
    split_on_instruction: bool = True  # bags without episode events: a new instruction starts a new episode

    def __post_init__(self):
        if not self.camera_topics:
            raise ValueError("give at least one camera topic (--camera-topics T1,T2)")
        if self.alignment not in ("nearest", "interpolate"):
            raise ValueError(f"alignment must be 'nearest' or 'interpolate', got {self.alignment!r}")
        if self.camera_names is not None and len(self.camera_names) != len(self.camera_topics):
            raise ValueError(f"{len(self.camera_names)} camera names for {len(self.camera_topics)} camera topics")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.max_gap_s is not None and not (math.isfinite(self.max_gap_s) and self.max_gap_s > 0):
            raise ValueError(f"max_gap_s must be a positive number of seconds, got {self.max_gap_s}")

    def gap_ns(self, fps: int) -> int:
        """The camera silence that splits an episode, in ns (longer than a frame period, or every frame splits)."""
        if self.max_gap_s is None:
            return int(max(1.0, 3.0 / fps) * 1e9)
        if self.max_gap_s * fps <= 1.0:
            raise ValueError(f"max_gap_s {self.max_gap_s} must be longer than one frame period at {fps} fps")
        return int(self.max_gap_s * 1e9)


def camera_key(topic: str) -> str:
    """'/camera/front/image_raw' -> 'observation.images.camera_front' (LeRobot's camera key)."""
    parts = [p for p in topic.strip("/").split("/") if p]
    while len(parts) > 1 and parts[-1] in ("image_raw", "image", "compressed", "image_color", "image_rect_color"):
        parts.pop()
    return "observation.images." + "_".join(parts)


@dataclass
class _Stream:
    topic: str
    msgtype: str
    times: list[int] = field(default_factory=list)  # ns
    values: list[Any] = field(default_factory=list)
    names: list[str] | None = None


def _stamp_ns(msg: Any, fallback: int) -> int:
    header = getattr(msg, "header", None)
    if header is not None:
        ns = int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
        if ns > 0:
            return ns
    return fallback


def _vector(msg: Any, msgtype: str) -> tuple[np.ndarray, list[str] | None]:
    if msgtype == "omnistream_msgs/msg/EndEffectorAction":
        t, r = msg.translation, msg.rotation
        return np.array([t.x, t.y, t.z, r.x, r.y, r.z, msg.gripper], np.float32), EE_NAMES
    if msgtype == "sensor_msgs/msg/JointState":
        return np.asarray(msg.position, np.float32), list(msg.name) or None
    if msgtype in ("std_msgs/msg/Float32MultiArray", "std_msgs/msg/Float64MultiArray"):
        return np.asarray(msg.data, np.float32), None
    if msgtype == "geometry_msgs/msg/PoseStamped":
        p, q = msg.pose.position, msg.pose.orientation
        return np.array([p.x, p.y, p.z, q.x, q.y, q.z, q.w], np.float32), ["x", "y", "z", "qx", "qy", "qz", "qw"]
    raise ValueError(f"unsupported numeric message type {msgtype}")


def _cdr_header_stamp(raw: bytes | memoryview, fallback: int) -> int:
    """The header stamp of a serialized message whose first field is std_msgs/Header (Image, CompressedImage).

    CDR: 4 bytes of encapsulation (byte 1: 0 big-endian, 1 little-endian), then int32 sec, uint32 nanosec.
    """
    if len(raw) < 12:
        return fallback
    order = "<" if raw[1] == 1 else ">"
    sec, nanosec = struct.unpack_from(f"{order}iI", raw, 4)
    ns = sec * 1_000_000_000 + nanosec
    return ns if ns > 0 else fallback


@contextmanager
def _open_bag(bag: Path):
    """A rosbags AnyReader; unreadable bags (corrupt metadata or storage) become a ValueError naming the bag."""
    from rosbags.highlevel import AnyReader

    reader = AnyReader([bag])
    try:
        reader.open()
    except Exception as exc:  # rosbags raises its own error types
        raise ValueError(f"{bag}: cannot read the bag: {exc}") from exc
    try:
        yield reader
    finally:
        reader.close()


def _load_images(bag: Path, stream: _Stream, indices: np.ndarray) -> list[np.ndarray]:
    """Decode the messages ``indices`` of the camera ``stream`` (a second, windowed pass over the bag)."""
    from rosbags.highlevel import AnyReader

    wanted = {stream.values[int(i)]: int(i) for i in np.unique(indices)}  # (log time, ordinal) -> index
    log_times = [key[0] for key in wanted]
    decoded: dict[int, np.ndarray] = {}
    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == stream.topic]
        previous, ordinal = None, 0
        for conn, logtime, raw in reader.messages(connections=conns, start=min(log_times), stop=max(log_times) + 1):
            ordinal = ordinal + 1 if logtime == previous else 0
            previous = logtime
            index = wanted.get((logtime, ordinal))
            if index is not None:
                decoded[index] = decode_image(reader.deserialize(raw, conn.msgtype), conn.msgtype)
    missing = sorted(set(wanted.values()) - set(decoded))
    if missing:
        raise ValueError(f"{bag}: could not read back {len(missing)} image(s) of {stream.topic}")
    return [decoded[int(i)] for i in indices]


def decode_image(msg: Any, msgtype: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a rosbags-deserialised Image/CompressedImage (duck-typed like rclpy's)."""
    from omnistream_perception import image_codec

    if msgtype == "sensor_msgs/msg/Image":
        return image_codec.image_to_rgb(msg)
    return image_codec.compressed_to_rgb(msg)


def _nearest(times: np.ndarray, t: np.ndarray) -> np.ndarray:
    idx = np.clip(np.searchsorted(times, t), 1, len(times) - 1)
    left, right = times[idx - 1], times[idx]
    return np.where(np.abs(t - left) <= np.abs(right - t), idx - 1, idx) if len(times) > 1 else np.zeros_like(idx)


def _align_vectors(stream: _Stream, grid: np.ndarray, alignment: str) -> np.ndarray:
    times = np.asarray(stream.times, dtype=np.int64)
    values = np.stack(stream.values)
    if len(times) == 1:
        return np.repeat(values, len(grid), axis=0)
    if alignment == "nearest":
        return values[_nearest(times, grid)]
    rel = (times - times[0]).astype(np.float64)
    g = (grid - times[0]).astype(np.float64)
    return np.stack([np.interp(g, rel, values[:, d]) for d in range(values.shape[1])], axis=1).astype(np.float32)


def _read_bag(bag: Path, cfg: BagConversionConfig) -> tuple[dict[str, _Stream], list[dict[str, Any]]]:

    from omnistream_vla.recording import EPISODE_EVENTS_TYPE

    if not (bag / "metadata.yaml").is_file() and not bag.is_file():
        raise ValueError(f"{bag} is not a rosbag2 directory (no metadata.yaml)")
    with _open_bag(bag) as reader:
        available = {c.topic: c.msgtype for c in reader.connections}
        wanted = [*cfg.camera_topics, cfg.action_topic]
        wanted += [t for t in (cfg.state_topic, cfg.instruction_topic) if t]
        missing = [t for t in wanted if t not in available]
        if missing:
            listing = ", ".join(f"{t} [{m}]" for t, m in sorted(available.items()))
            raise ValueError(f"{bag}: topic(s) {missing} not in the bag; it has: {listing}")
        checks = [(t, IMAGE_TYPES, "camera") for t in cfg.camera_topics] + [(cfg.action_topic, VECTOR_TYPES, "action")]
        if cfg.state_topic:
            checks.append((cfg.state_topic, STATE_TYPES, "state"))
        if cfg.instruction_topic:
            checks.append((cfg.instruction_topic, ("std_msgs/msg/String",), "instruction"))
        for topic, allowed, role in checks:
            if available[topic] not in allowed:
                raise ValueError(f"{role} topic {topic} has type {available[topic]}; supported: {', '.join(allowed)}")
        events_topic = cfg.episode_events_topic
        if events_topic is None:
            events_topic = next(
                (t for t, m in available.items() if t.endswith("episode_events") and m == EPISODE_EVENTS_TYPE), None
            )
        elif events_topic not in available:
            raise ValueError(f"{bag}: episode events topic {events_topic} is not in the bag")

        streams = {t: _Stream(t, available[t]) for t in wanted}
        conns = [c for c in reader.connections if c.topic in streams]
        for conn, logtime, raw in reader.messages(connections=conns):
            stream = streams[conn.topic]
            if conn.msgtype in IMAGE_TYPES:
                # Images are not kept: only their stamp (read from the CDR header, no copy of the pixels) and
                # the log time that finds them again when an episode needs them (memory stays per episode).
                stream.times.append(_cdr_header_stamp(raw, logtime))
                last = stream.values[-1] if stream.values else (None, -1)
                stream.values.append((logtime, last[1] + 1 if last[0] == logtime else 0))  # (log time, ordinal)
                continue
            msg = reader.deserialize(raw, conn.msgtype)
            stream.times.append(_stamp_ns(msg, logtime))
            if conn.msgtype == "std_msgs/msg/String":
                stream.values.append(msg.data)
            else:
                vec, names = _vector(msg, conn.msgtype)
                if stream.values and vec.shape != stream.values[0].shape:
                    raise ValueError(
                        f"{conn.topic}: vector length changes from {stream.values[0].shape[0]} to {vec.shape[0]}"
                    )
                stream.values.append(vec)
                stream.names = stream.names or names
    for stream in streams.values():  # bags are ordered by log time; header stamps may differ slightly
        order = np.argsort(np.asarray(stream.times, dtype=np.int64), kind="stable")
        stream.times = [stream.times[i] for i in order]
        stream.values = [stream.values[i] for i in order]

    episodes: list[dict[str, Any]] = []
    if events_topic is not None:
        from omnistream_vla.recording import read_episode_events

        episodes = read_episode_events(bag, events_topic)
        for episode in episodes:
            # An episode cut by a crash ends with the last message that reached disk.
            episode["complete"] = episode.get("stop_ns") is not None
            if not episode["complete"]:
                episode["stop_ns"] = 2**63 - 1
    if not episodes:
        for topic in cfg.camera_topics:
            if not streams[topic].times:
                raise ValueError(f"{bag}: camera topic {topic} has no messages")
        times = [t for topic in cfg.camera_topics for t in (streams[topic].times[0], streams[topic].times[-1])]
        episodes = [{"start_ns": min(times), "stop_ns": max(times), "instruction": None, "complete": True}]
        if cfg.split_on_instruction and cfg.instruction_topic:
            episodes[0]["split_on_instruction"] = True
    return streams, episodes


def _instruction_changes(stream: _Stream | None) -> list[int]:
    """Times at which the instruction text changes (the first instruction included)."""
    if stream is None:
        return []
    changes, previous = [], None
    for t, text in zip(stream.times, stream.values):
        if text != previous:
            changes.append(int(t))
        previous = text
    return changes


def _split(lo: int, hi: int, cam_times: list[np.ndarray], gap_ns: int, cuts_at: list[int]) -> list[tuple[int, int]]:
    """[lo, hi] without the camera gaps longer than ``gap_ns`` and cut at ``cuts_at``: (start, stop) per part."""
    cuts: list[tuple[int, int]] = []  # (the previous part ends at, the next part starts at)
    for times in cam_times:
        inside = times[(times >= lo) & (times <= hi)]
        for i in np.nonzero(np.diff(inside) > gap_ns)[0]:
            cuts.append((int(inside[i]), int(inside[i + 1])))
    cuts += [(c - 1, c) for c in cuts_at if lo < c <= hi]
    parts, start = [], lo
    for end, next_start in sorted(cuts):
        if end >= start:
            parts.append((start, end))
        start = max(start, next_start)
    parts.append((start, hi))
    return parts


def _estimate_fps(stream: _Stream) -> int:
    if len(stream.times) < 2:
        raise ValueError(f"cannot estimate fps from {len(stream.times)} message(s) on {stream.topic}; pass --fps")
    interval = float(np.median(np.diff(np.asarray(stream.times, dtype=np.int64)))) / 1e9
    if interval <= 0:
        raise ValueError(f"{stream.topic}: messages share one timestamp; pass --fps")
    return max(1, int(round(1.0 / interval)))


def convert_bags(bags: list[Path], out: Path, cfg: BagConversionConfig, overwrite: bool = False) -> dict[str, Any]:
    """Convert ``bags`` into one LeRobot v3.0 dataset at ``out``; returns a summary with one entry per episode
    written (``episode_details``: frames, tasks, ``dropped_images``, ``filled_frames``, where it came from)."""
    from tqdm import tqdm

    if not bags:
        raise ValueError("give at least one bag")
    writer: LeRobotDatasetWriter | None = None
    fps = cfg.fps
    summary: dict[str, Any] = {
        "bags": [str(b) for b in bags],
        "episodes": 0,
        "frames": 0,
        "skipped_episodes": 0,
        "dropped_images": 0,
        "filled_frames": 0,
        "episode_details": [],
    }
    for bag in bags:
        streams, episodes = _read_bag(Path(bag), cfg)
        cams = [streams[t] for t in cfg.camera_topics]
        if fps is None:
            fps = _estimate_fps(cams[0])
            log.info("fps estimated from %s: %d", cams[0].topic, fps)
        step = 1_000_000_000 / fps
        gap_ns = cfg.gap_ns(fps)
        cam_times = [np.asarray(c.times, dtype=np.int64) for c in cams]
        instruction_stream = streams.get(cfg.instruction_topic) if cfg.instruction_topic else None
        changes = _instruction_changes(instruction_stream)
        for ep in tqdm(episodes, desc=f"{Path(bag).name}", unit="episode", leave=False):
            if cfg.only_successful and not ep.get("success", False):
                summary["skipped_episodes"] += 1
                continue
            cuts_at = changes if ep.get("split_on_instruction") else []
            parts = _split(int(ep["start_ns"]), int(ep["stop_ns"]), cam_times, gap_ns, cuts_at)
            if len(parts) > 1:
                log.info(
                    "%s: episode %s split into %d at camera gaps/instruction changes",
                    bag,
                    ep.get("episode_index"),
                    len(parts),
                )
            for lo, hi in parts:
                inside = [t[(t >= lo) & (t <= hi)] for t in cam_times]
                if all(len(t) == 0 for t in inside) and len(parts) > 1:
                    continue  # a cut right at the start or the end: nothing recorded there
                if any(len(t) == 0 for t in inside):
                    log.warning("%s: episode %s has no images on some camera; skipped", bag, ep.get("episode_index"))
                    summary["skipped_episodes"] += 1
                    continue
                t0, t1 = max(int(t[0]) for t in inside), min(int(t[-1]) for t in inside)
                # Integer nanoseconds: epoch times do not survive float64 arithmetic exactly.
                count = int(np.floor((t1 - t0) / step + 1e-6)) + 1
                grid = t0 + np.round(np.arange(count) * step).astype(np.int64)
                action_stream = streams[cfg.action_topic]
                if not action_stream.values:
                    raise ValueError(f"{bag}: action topic {cfg.action_topic} has no messages")
                actions = _align_vectors(action_stream, grid, cfg.alignment)
                states = _align_vectors(streams[cfg.state_topic], grid, cfg.alignment) if cfg.state_topic else None
                tasks = _tasks_for(grid, instruction_stream, ep, cfg)
                images, dropped, filled = {}, 0, 0
                for c, (cam, times) in enumerate(zip(cams, cam_times)):
                    idx = _nearest(times, grid)
                    filled += int(np.count_nonzero(idx[1:] == idx[:-1]))
                    in_part = np.nonzero((times >= lo) & (times <= hi))[0]
                    dropped += int(np.count_nonzero(~np.isin(in_part, idx)))
                    key = f"observation.images.{cfg.camera_names[c]}" if cfg.camera_names else camera_key(cam.topic)
                    images[key] = _load_images(Path(bag), cam, idx)
                if writer is None:
                    features: dict[str, dict[str, Any]] = {
                        key: {"dtype": "video", "shape": list(frames[0].shape)} for key, frames in images.items()
                    }
                    if states is not None:
                        features["observation.state"] = {
                            "dtype": "float32",
                            "shape": [states.shape[1]],
                            "names": streams[cfg.state_topic].names,
                        }
                    features["action"] = {"dtype": "float32", "shape": [actions.shape[1]], "names": action_stream.names}
                    writer = LeRobotDatasetWriter(
                        out, fps=fps, features=features, robot_type=cfg.robot_type, overwrite=overwrite
                    )
                for k in range(len(grid)):
                    frame = {key: frames[k] for key, frames in images.items()}
                    frame["action"] = actions[k]
                    if states is not None:
                        frame["observation.state"] = states[k]
                    frame["task"] = tasks[k]
                    writer.add_frame(frame)
                index = writer.save_episode(
                    extra={
                        "success": bool(ep.get("success", False)),
                        "complete": bool(ep.get("complete", True)),
                        "notes": "\n".join(ep.get("notes") or []),
                        "source_bag": Path(bag).name,
                        "source_start_ns": int(grid[0]),
                        "dropped_images": dropped,
                        "filled_frames": filled,
                        **cfg.extra_episode_info,
                    }
                )
                summary["episodes"] += 1
                summary["frames"] += len(grid)
                summary["dropped_images"] += dropped
                summary["filled_frames"] += filled
                summary["episode_details"].append(
                    {
                        "episode_index": index,
                        "source_bag": str(bag),
                        "source_episode": ep.get("episode_index"),
                        "start_ns": int(grid[0]),
                        "frames": len(grid),
                        "tasks": list(dict.fromkeys(tasks)),
                        "dropped_images": dropped,
                        "filled_frames": filled,
                    }
                )
    if writer is None:
        raise ValueError("no episode with images was found in the bag(s); nothing written")
    writer.finalize()
    summary.update({"out": str(out), "fps": fps})
    return summary


def _tasks_for(
    grid: np.ndarray, instructions: _Stream | None, episode: dict[str, Any], cfg: BagConversionConfig
) -> list[str]:
    fallback = episode.get("instruction") or cfg.default_task
    out: list[str] = []
    times = np.asarray(instructions.times, dtype=np.int64) if instructions and instructions.times else None
    for t in grid:
        task = None
        if times is not None:
            i = int(np.searchsorted(times, t, side="right")) - 1
            if i >= 0:
                task = instructions.values[i]
        task = task or fallback
        if not task:
            raise ValueError(
                "a frame has no instruction: the bag has no instruction before it and no episode instruction; "
                "pass --instruction-topic or --task"
            )
        out.append(task)
    return out
