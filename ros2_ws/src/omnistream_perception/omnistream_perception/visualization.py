"""Logging the stack's data to Rerun (rclpy-free): images, depth, world points, the camera pose and path,
instructions and actions, each on a caller-given time. ``omnistream view`` (``rerun_bridge``), ``omnistream sim
eval --rerun`` and ``omnistream data view --rerun`` all log through ``RerunLog``; ``read_rrd`` reads a written
``.rrd`` back with Rerun's own reader (tests, plots).

Entities of a live stack (``omnistream view``), in the world frame of the stream (perception_node's first camera
frame, optical axes: x right, y down, z forward):

    world/camera            Transform3D (the camera pose) + Pinhole (from depth/camera_info when it arrives)
    world/camera/image      the camera image
    world/camera/depth      the depth image (DepthImage, meter = 1 unit of the topic)
    world/points            the point cloud (Points3D, rgb when the cloud has it)
    world/camera_path       the camera centres so far (LineStrips3D)
    instruction             the instruction (TextDocument, and a TextLog line per change)
    vla/action              the VLA's 7-DoF action (Scalars, named series), vla/stop the stop flag

Times: ``set_time_ns`` puts the following logs on the ``ros_time`` timeline (a timestamp: the messages' header
stamps); ``set_step`` on a sequence timeline (``step``, ``episode``, ``frame``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROS_TIMELINE = "ros_time"
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
WORLD = "world"
CAMERA = "world/camera"
IMAGE = "world/camera/image"
DEPTH = "world/camera/depth"
POINTS = "world/points"
CAMERA_PATH = "world/camera_path"
INSTRUCTION = "instruction"
ACTION = "vla/action"
STOP = "vla/stop"
# Images are stored as JPEG (a 640x480 frame: ~40 kB instead of 900 kB raw); depth stays exact (float32).
DEFAULT_JPEG_QUALITY = 85
MAX_PATH_POINTS = 100_000  # a day at 1 Hz; older camera centres are dropped from the drawn path


def _rerun():
    try:
        import rerun as rr
    except ImportError as exc:  # an optional dependency for the stack's nodes, pinned in requirements.txt
        raise ImportError("Rerun is not installed: pip install 'rerun-sdk==0.41.*' (see requirements.txt)") from exc
    return rr


def _viewer_on_path() -> None:
    """rerun-sdk installs the viewer (``rerun``) beside the interpreter; a venv used without activating it (e.g.
    ``.venv/bin/omnistream view``) does not have that directory on PATH, where the SDK looks for it."""
    import os
    import shutil
    import sys

    here = Path(sys.executable).parent
    if shutil.which("rerun") is None and (here / "rerun").is_file():
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"


class RerunLog:
    """One Rerun recording with the stack's logging functions.

    ``save``: write an ``.rrd`` file; ``spawn``: start (or connect to) a Rerun viewer; ``connect``: a viewer's
    gRPC URL; ``memory``: keep the data in memory only (tests). ``close()`` flushes and finishes the file.
    """

    def __init__(
        self,
        application_id: str = "omnistream",
        *,
        save: str | Path | None = None,
        spawn: bool = False,
        connect: str | None = None,
        memory: bool = False,
        jpeg_quality: int | None = DEFAULT_JPEG_QUALITY,
    ) -> None:
        rr = _rerun()
        if sum((save is not None, spawn, connect is not None, memory)) != 1:
            raise ValueError("RerunLog needs exactly one of save=FILE, spawn=True, connect=URL, memory=True")
        if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100 or None (raw images), got {jpeg_quality}")
        self.rr = rr
        self.jpeg_quality = jpeg_quality
        self.rec = rr.RecordingStream(application_id)
        self.path = None if save is None else Path(save)
        self._memory = None
        if self.path is not None:
            if self.path.suffix != ".rrd":
                raise ValueError(f"a Rerun recording file must end in .rrd, got {self.path.name}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.rec.save(str(self.path))
        elif spawn:
            _viewer_on_path()
            self.rec.spawn()
        elif connect is not None:
            self.rec.connect_grpc(connect)
        else:
            self._memory = self.rec.memory_recording()
        self._path_points: list[np.ndarray] = []
        self._series_named: set[str] = set()
        self._last_instruction: dict[str, str] = {}
        self.closed = False
        self.rec.log(WORLD, rr.ViewCoordinates.RDF, static=True)  # camera optical axes (see the module docstring)

    # -- time ---------------------------------------------------------------------------------------------------
    def set_time_ns(self, stamp_ns: int, timeline: str = ROS_TIMELINE) -> None:
        """Following logs happen at ``stamp_ns`` (nanoseconds since the epoch, e.g. a ROS header stamp)."""
        self.rec.set_time(timeline, timestamp=np.datetime64(int(stamp_ns), "ns"))

    def set_step(self, timeline: str, value: int) -> None:
        self.rec.set_time(timeline, sequence=int(value))

    def reset_time(self) -> None:
        self.rec.reset_time()

    # -- data ---------------------------------------------------------------------------------------------------
    def image(self, rgb: np.ndarray, entity: str = IMAGE) -> None:
        """An (H, W, 3) uint8 RGB (or (H, W) mono) image."""
        array = np.asarray(rgb)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or array.dtype != np.uint8:
            raise ValueError(f"an image must be (H, W), (H, W, 3) or (H, W, 4) uint8, got {array.shape} {array.dtype}")
        image = self.rr.Image(array)
        if self.jpeg_quality is not None and (array.ndim == 2 or array.shape[2] == 3):
            image = image.compress(jpeg_quality=self.jpeg_quality)
        self.rec.log(entity, image)

    def depth(self, depth: np.ndarray, entity: str = DEPTH, meter: float = 1.0) -> None:
        """An (H, W) float depth map; ``meter``: the value of one metre in it (1 for metres). NaN = invalid."""
        array = np.asarray(depth, dtype=np.float32)
        if array.ndim != 2:
            raise ValueError(f"a depth map must be (H, W), got shape {array.shape}")
        self.rec.log(entity, self.rr.DepthImage(array, meter=meter))

    def pinhole(self, intrinsics: np.ndarray, width: int, height: int, entity: str = CAMERA) -> None:
        """The camera's 3x3 intrinsics for an image of ``width`` x ``height`` (depth and image live under it)."""
        k = np.asarray(intrinsics, dtype=np.float64)
        if k.shape != (3, 3):
            raise ValueError(f"intrinsics must be 3x3, got {k.shape}")
        self.rec.log(entity, self.rr.Pinhole(image_from_camera=k, resolution=[int(width), int(height)]))

    def points(self, xyz: np.ndarray, rgb: np.ndarray | None = None, entity: str = POINTS) -> None:
        """(N, 3) points in the world frame, optional (N, 3) uint8 colours; non-finite points are left out."""
        xyz = np.asarray(xyz, dtype=np.float32)
        if xyz.ndim != 2 or xyz.shape[1] != 3:
            raise ValueError(f"points must be (N, 3), got shape {xyz.shape}")
        keep = np.isfinite(xyz).all(axis=1)
        colors = None
        if rgb is not None:
            rgb = np.asarray(rgb)
            if rgb.shape != xyz.shape:
                raise ValueError(f"colours must match the points' shape {xyz.shape}, got {rgb.shape}")
            colors = rgb[keep].astype(np.uint8)
        self.rec.log(entity, self.rr.Points3D(xyz[keep], colors=colors))

    def pose(
        self,
        translation: Sequence[float],
        quaternion_xyzw: Sequence[float],
        entity: str = CAMERA,
        path_entity: str | None = CAMERA_PATH,
    ) -> None:
        """The camera's pose in the world frame (camera -> world); its centre is appended to the drawn path."""
        t = np.asarray(translation, dtype=np.float64).reshape(-1)
        q = np.asarray(quaternion_xyzw, dtype=np.float64).reshape(-1)
        if t.shape != (3,) or q.shape != (4,) or not (np.isfinite(t).all() and np.isfinite(q).all()):
            raise ValueError(f"a pose needs a finite translation (3,) and quaternion (4,), got {t} {q}")
        norm = float(np.linalg.norm(q))
        if not 0.5 < norm < 2.0:
            raise ValueError(f"the pose quaternion is not a rotation (norm {norm:.3g})")
        self.rec.log(entity, self.rr.Transform3D(translation=t, quaternion=self.rr.Quaternion(xyzw=q / norm)))
        if path_entity is not None:
            self._path_points.append(t.astype(np.float32))
            del self._path_points[:-MAX_PATH_POINTS]
            self.rec.log(path_entity, self.rr.LineStrips3D([np.stack(self._path_points)]))

    def instruction(self, text: str, entity: str = INSTRUCTION) -> None:
        """The instruction as a document (what is current) and a log line when it changes."""
        self.rec.log(entity, self.rr.TextDocument(str(text)))
        if self._last_instruction.get(entity) != text:
            self.rec.log(entity + "/log", self.rr.TextLog(str(text)))
            self._last_instruction[entity] = text

    def text(self, text: str, entity: str, level: str = "INFO") -> None:
        self.rec.log(entity, self.rr.TextLog(str(text), level=level))

    def scalars(self, values: Sequence[float], entity: str, names: Sequence[str] | None = None) -> None:
        """One value per series (e.g. the 7 action dimensions); ``names`` label the series (logged once)."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if names is not None and entity not in self._series_named:
            if len(names) != len(values):
                raise ValueError(f"{entity}: {len(names)} names for {len(values)} values")
            self.rec.log(entity, self.rr.SeriesLines(names=list(names)), static=True)
            self._series_named.add(entity)
        self.rec.log(entity, self.rr.Scalars(values))

    def action(
        self, action: Sequence[float], stop: bool | None = None, entity: str = ACTION, stop_entity: str = STOP
    ) -> None:
        """A 7-DoF end-effector action (translation, rotation, gripper); ``stop`` is logged on ``stop_entity``."""
        values = np.asarray(action, dtype=np.float64).reshape(-1)
        if values.shape != (7,):
            raise ValueError(f"an action has 7 values (xyz, rpy, gripper), got {values.shape}")
        self.scalars(values, entity, ACTION_NAMES)
        if stop is not None:
            self.scalars([float(stop)], stop_entity)

    # -- end ----------------------------------------------------------------------------------------------------
    def flush(self) -> None:
        self.rec.flush(timeout_sec=10.0)

    def close(self) -> None:
        """Flush and finish the recording (an ``.rrd`` gets its footer); safe to call twice."""
        if self.closed:
            return
        self.closed = True
        try:
            self.rec.flush(timeout_sec=10.0)
        finally:  # a viewer that cannot be reached fails the flush (RuntimeError); the stream is ended anyway
            self.rec.disconnect()

    def __enter__(self) -> RerunLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RolloutLog:
    """Simulator rollouts in one recording: per episode ``rollouts/episode_XXXXXX/`` holds its camera images
    (``.../<camera>``), actions (``.../action``) and instruction on the ``step`` timeline (0 at the episode's first
    observation); ``rollouts/success`` (1 or 0) and a ``rollouts/log`` line per episode are on the ``episode``
    timeline. ``omnistream sim eval --rerun`` writes one."""

    def __init__(self, log: RerunLog, prefix: str = "rollouts") -> None:
        self.log = log
        self.prefix = prefix
        self.episode: int | None = None
        self.episodes = 0

    def entity(self, name: str) -> str:
        return f"{self.prefix}/episode_{self.episode:06d}/{name}"

    def start_episode(self, index: int, task: str = "", instruction: str = "") -> None:
        self.episode = int(index)
        self.log.reset_time()
        self.log.set_step("episode", index)
        self.log.set_step("step", 0)
        self.log.instruction(instruction or task, entity=self.entity("instruction"))

    def step(self, step: int, observation: dict, action: Sequence[float] | None) -> None:
        """The observation after ``step`` actions (``images``: camera -> (H, W, 3) uint8) and the action executed
        from it (None for the episode's last observation)."""
        if self.episode is None:
            raise ValueError("RolloutLog.step before start_episode")
        self.log.set_step("step", step)
        for camera, image in (observation.get("images") or {}).items():
            self.log.image(np.asarray(image), entity=self.entity(camera))
        if action is not None:
            self.log.action(action, entity=self.entity("action"), stop_entity=self.entity("stop"))

    def end_episode(self, success: bool, steps: int, task: str = "") -> None:
        if self.episode is None:
            raise ValueError("RolloutLog.end_episode before start_episode")
        self.log.reset_time()
        self.log.set_step("episode", self.episode)
        self.log.scalars([float(success)], f"{self.prefix}/success")
        what = "success" if success else "failure"
        self.log.text(f"episode {self.episode} {task}: {what} after {steps} steps", f"{self.prefix}/log",
                      level="INFO" if success else "WARN")  # fmt: skip
        self.episodes += 1
        self.episode = None


def log_dataset_episode(log: RerunLog, dataset: Any, episode: int) -> int:
    """One episode of a LeRobot dataset (``omnistream_train.lerobot_dataset.LeRobotDataset`` with
    ``image_format="uint8_hwc"``): every camera, every numeric feature (action, state; series named from the
    features' ``names``) and the task, on the ``frame`` (frame index) and ``time`` (the frame's timestamp)
    timelines. A feature ``observation.images.front`` becomes the entity ``observation/images/front``.
    Returns the number of frames logged."""
    start, stop = dataset.episode_frames(episode)
    features = dataset.meta.features
    cameras = list(dataset.meta.video_keys) + list(dataset.meta.image_keys)
    last_task = None
    for index in range(start, stop):
        item = dataset[index]
        log.set_step("frame", int(item["frame_index"]))
        log.rec.set_time("time", duration=float(item["timestamp"]))
        if item["task"] != last_task:
            log.instruction(item["task"], entity="task")
        last_task = item["task"]
        for key in cameras:
            log.image(np.asarray(item[key]), entity=key.replace(".", "/"))
        for key in dataset.numeric_keys:
            values = np.asarray(item[key], dtype=np.float64).reshape(-1)
            names = features.get(key, {}).get("names")
            names = list(names) if isinstance(names, list) and len(names) == len(values) else None
            log.scalars(values, key.replace(".", "/"), names)
    return stop - start


@dataclass
class ViewTopics:
    """The topics ``omnistream view`` logs (relative names; defaults: perception_node's and vla_node's)."""

    image: str = "image"
    depth: str = "perception_node/depth"
    depth_info: str = "perception_node/depth/camera_info"
    points: str = "perception_node/points"
    pose: str = "perception_node/pose"
    instruction: str = "instruction"
    action: str = "vla_node/action"


# ------------------------------------------------------------------------------------------------ reading back


@dataclass
class RrdContents:
    """What an ``.rrd`` holds, read with Rerun's own chunk reader: rows per entity and component."""

    rows: dict[str, int] = field(default_factory=dict)  # entity -> non-static rows
    static: dict[str, list[str]] = field(default_factory=dict)  # entity -> static components
    timelines: dict[str, set[str]] = field(default_factory=dict)  # entity -> timelines
    chunks: list[Any] = field(default_factory=list)

    def column(
        self, entity: str, component: str, timeline: str | None = None, mono: bool = False
    ) -> tuple[list[Any], list[Any]]:
        """(times on ``timeline``, values) of ``component`` (e.g. ``Scalars:scalars``) of ``entity``, in time
        order; static values have time None. Each value is the row's batch (a list); ``mono``: its only item."""
        entity = entity if entity.startswith("/") else "/" + entity
        pairs = []
        for chunk in self.chunks:
            if chunk.entity_path != entity:
                continue
            data = chunk.to_record_batch().to_pydict()
            if component not in data:
                continue
            times = data.get(timeline) if timeline is not None else None
            for i, value in enumerate(data[component]):
                if value is not None:
                    pairs.append((None if times is None else times[i], value[0] if mono else value))
        pairs.sort(key=lambda p: (p[0] is not None, p[0] if p[0] is not None else 0))
        return [p[0] for p in pairs], [p[1] for p in pairs]


def read_rrd(path: str | Path) -> RrdContents:
    """Every chunk of the first recording in ``path``."""
    _rerun()  # the clear message when Rerun is missing
    from rerun.chunk import RrdReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Rerun recording at {path}")
    contents = RrdContents()
    for chunk in RrdReader(path).stream():
        name = chunk.entity_path
        contents.chunks.append(chunk)
        contents.timelines.setdefault(name, set()).update(chunk.timeline_names)
        if chunk.is_static:
            columns = [c for c in chunk.to_record_batch().schema.names if ":" in c]
            contents.static.setdefault(name, []).extend(columns)
        else:
            contents.rows[name] = contents.rows.get(name, 0) + chunk.num_rows
    return contents
