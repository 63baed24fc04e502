"""LeRobot v3.0 datasets: a writer and a reader of our own (``lerobot`` itself cannot be installed here).

The layout is LeRobot's (see ``../shared/specs/python-stack.md``), so a dataset written here loads with
``lerobot.datasets.LeRobotDataset`` on a machine that has it, and the reader below reads LeRobot's datasets::

    meta/info.json                                 codebase_version "v3.0", fps, features, totals, path templates
    meta/stats.json                                per feature: min max mean std count q01 q10 q50 q90 q99
                                                   (images: per channel, shape (3, 1, 1), values in [0, 1])
    meta/tasks.parquet                             index ``task`` (str), column ``task_index``
    meta/episodes/chunk-000/file-000.parquet       one row per episode (lengths, file indices, video times, stats)
    data/chunk-XXX/file-XXX.parquet                many episodes per file: numeric features + bookkeeping columns
    videos/<key>/chunk-XXX/file-XXX.mp4            many episodes concatenated per camera, AV1 (libsvtav1)

A frame's video time is its episode's ``videos/<key>/from_timestamp`` plus the frame's ``timestamp``.

Reader API (what training consumes)::

    ds = LeRobotDataset(root, image_format="float_chw",    # or "uint8_hwc"
                        episodes=None,                  # or a list of episode indices
                        delta_timestamps=None,          # {"action": [0, 1/fps, ...]} for action chunks
                        video_block_s=2.0)              # videos decode in cached blocks of this length
    len(ds)                    # number of frames
    item = ds[i]               # dict:
        item["observation.images.<cam>"]   torch.float32 (3, H, W) in [0, 1]   (image_format="float_chw")
                                           or numpy uint8 (H, W, 3)            (image_format="uint8_hwc")
        item["observation.state"]          torch.float32 (D,)   (when the dataset has a state)
        item["action"]                     torch.float32 (A,)   or (K, A) with delta_timestamps
        item["action_is_pad"]              torch.bool (K,)      only with delta_timestamps for "action"
        item["task"]                       str, the instruction of this frame
        item["episode_index"], item["frame_index"], item["index"], item["task_index"]   torch.int64 scalars
        item["timestamp"]                  torch.float32 scalar, seconds since the episode start
    ds.meta                    LeRobotDatasetMetadata: .info .fps .features .camera_keys .tasks .episodes .stats
    ds.stats                   {feature: {stat: numpy array}} (normalisation lives outside the model)
    ds.episode_frames(k)       the frames of episode k as (from, to) dataset indices

Cameras stored as videos (what we write) or as ``image`` features (PNG/JPEG bytes in the data parquet) both read.
``delta_timestamps={"action": [0, 1/fps, ...]}`` returns action chunks (LeRobot's convention): offsets in
seconds, clamped to the episode, with ``<key>_is_pad`` marking the clamped ones. Numeric features only.

Writer API::

    w = LeRobotDatasetWriter(root, fps=10, features={
        "observation.images.front": {"dtype": "video", "shape": [H, W, 3]},
        "observation.state": {"dtype": "float32", "shape": [8], "names": [...]},
        "action": {"dtype": "float32", "shape": [7], "names": [...]},
    })
    w.add_frame({"observation.images.front": rgb_uint8_hwc, "observation.state": ..., "action": ..., "task": "..."})
    w.save_episode(extra={"success": True})     # extra columns go to the episodes parquet
    w.finalize()                                # writes meta/, closes the videos
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_CHUNKS_SIZE = 1000
DEFAULT_DATA_FILE_MB = 100
DEFAULT_VIDEO_FILE_MB = 500
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
STAT_NAMES = ("min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99")
# Bookkeeping columns every LeRobot dataset has, in LeRobot's dtypes.
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
NUMERIC_DTYPES = ("float32", "float64", "int64", "int32", "bool")
# Pixels sampled per frame for image statistics (keeps stats of long datasets bounded in memory).
_IMAGE_STAT_PIXELS_PER_FRAME = 4096
_IMAGE_STAT_MAX_FRAMES_PER_EPISODE = 64

# SVT-AV1 prints its whole configuration on every encoder start unless told otherwise (1 = errors only).
os.environ.setdefault("SVT_LOG", "1")


def _chunk_file(file_counter: int, chunks_size: int) -> tuple[int, int]:
    return file_counter // chunks_size, file_counter % chunks_size


# ----------------------------------------------------------------------------------------------- statistics


def _quantile_stats(values: np.ndarray, axis: int) -> dict[str, np.ndarray]:
    qs = np.quantile(values, QUANTILES, axis=axis)
    return {f"q{int(round(q * 100)):02d}": qs[i] for i, q in enumerate(QUANTILES)}


def numeric_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """LeRobot stats of an (N, D) array: per dimension min/max/mean/std/quantiles, count = [N]."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if len(values) == 0:
        raise ValueError("cannot compute statistics of zero frames")
    stats = {
        "min": values.min(axis=0),
        "max": values.max(axis=0),
        "mean": values.mean(axis=0),
        "std": values.std(axis=0),
        "count": np.array([len(values)], dtype=np.int64),
    }
    stats.update(_quantile_stats(values, axis=0))
    return stats


def image_stats(pixels: np.ndarray, frame_count: int) -> dict[str, np.ndarray]:
    """LeRobot image stats from sampled (P, 3) uint8 pixels: per channel in [0, 1], shape (3, 1, 1)."""
    values = np.asarray(pixels, dtype=np.float64) / 255.0
    per_channel = numeric_stats(values)
    stats = {name: value.reshape(3, 1, 1) for name, value in per_channel.items() if name != "count"}
    stats["count"] = np.array([frame_count], dtype=np.int64)
    return stats


def _sample_pixels(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flat = image.reshape(-1, 3)
    if len(flat) <= _IMAGE_STAT_PIXELS_PER_FRAME:
        return flat.copy()
    return flat[rng.choice(len(flat), _IMAGE_STAT_PIXELS_PER_FRAME, replace=False)]


def _stats_to_json(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    return {key: {name: np.asarray(v).tolist() for name, v in feat.items()} for key, feat in stats.items()}


def _stats_from_json(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    return {key: {name: np.asarray(v) for name, v in feat.items()} for key, feat in raw.items()}


# ----------------------------------------------------------------------------------------------- writer


@dataclass
class _VideoTrack:
    """One camera's current mp4 file: episodes are appended to it until it passes the size limit."""

    key: str
    height: int
    width: int
    file_counter: int = 0
    container: Any = None
    stream: Any = None
    frames_in_file: int = 0
    bytes_in_file: int = 0
    episode_start_frame: int = 0
    episode_frames: int = 0
    pixels: list[np.ndarray] = field(default_factory=list)
    all_pixels: list[np.ndarray] = field(default_factory=list)


class LeRobotDatasetWriter:
    """Writes a LeRobot v3.0 dataset episode by episode (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        fps: int,
        features: dict[str, dict[str, Any]],
        robot_type: str | None = None,
        video_codec: str = "libsvtav1",
        crf: int = 30,
        preset: int = 8,
        chunks_size: int = DEFAULT_CHUNKS_SIZE,
        data_files_size_in_mb: float = DEFAULT_DATA_FILE_MB,
        video_files_size_in_mb: float = DEFAULT_VIDEO_FILE_MB,
        overwrite: bool = False,
    ):
        self.root = Path(root)
        if not isinstance(fps, int) or fps <= 0:
            raise ValueError(f"fps must be a positive integer, got {fps!r}")
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{self.root} exists and is not empty; choose a new directory or overwrite")
            shutil.rmtree(self.root)
        self.fps = fps
        self.robot_type = robot_type
        self.video_codec = video_codec
        self.crf = crf
        self.preset = preset
        self.chunks_size = chunks_size
        self.data_file_bytes = data_files_size_in_mb * 1e6
        self.video_file_bytes = video_files_size_in_mb * 1e6
        self.features = self._validate_features(features)
        self.video_keys = [k for k, f in self.features.items() if f["dtype"] == "video"]
        self.numeric_keys = [k for k, f in self.features.items() if f["dtype"] in NUMERIC_DTYPES]
        self.root.mkdir(parents=True, exist_ok=True)
        self._tracks = {
            k: _VideoTrack(k, self.features[k]["shape"][0], self.features[k]["shape"][1]) for k in self.video_keys
        }
        self._rng = np.random.default_rng(0)
        self._tasks: dict[str, int] = {}
        self._episode_rows: list[dict[str, Any]] = []
        self._data_frames: list[Any] = []  # pandas DataFrames of the current data file
        self._data_bytes = 0
        self._data_file_counter = 0
        self._numeric_all: dict[str, list[np.ndarray]] = {k: [] for k in self.numeric_keys}
        self._total_frames = 0
        self._buffer: list[dict[str, Any]] = []
        self._finalized = False

    # -- features

    def _validate_features(self, features: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for key, spec in features.items():
            if key in DEFAULT_FEATURES or key == "task":
                raise ValueError(f"feature {key!r} is added by the writer; do not declare it")
            dtype = spec.get("dtype")
            shape = [int(s) for s in spec.get("shape", ())]
            if dtype == "video":
                if len(shape) != 3 or shape[2] != 3:
                    raise ValueError(f"video feature {key!r} needs shape [H, W, 3], got {shape}")
                if shape[0] % 2 or shape[1] % 2:
                    raise ValueError(f"video feature {key!r}: height and width must be even for yuv420p, got {shape}")
                out[key] = {
                    "dtype": "video",
                    "shape": shape,
                    "names": ["height", "width", "channels"],
                    "info": {
                        "video.height": shape[0],
                        "video.width": shape[1],
                        "video.codec": "av1" if "av1" in self.video_codec else self.video_codec,
                        "video.pix_fmt": "yuv420p",
                        "video.is_depth_map": False,
                        "video.fps": self.fps,
                        "video.channels": 3,
                        "has_audio": False,
                    },
                }
            elif dtype in NUMERIC_DTYPES:
                if len(shape) != 1 or shape[0] <= 0:
                    raise ValueError(f"numeric feature {key!r} needs shape [D] with D > 0, got {shape}")
                names = spec.get("names")
                if names is not None and len(names) != shape[0]:
                    raise ValueError(f"feature {key!r}: {len(names)} names for shape {shape}")
                out[key] = {"dtype": dtype, "shape": shape, "names": names}
            else:
                raise ValueError(f"feature {key!r}: dtype must be 'video' or one of {NUMERIC_DTYPES}, got {dtype!r}")
        return out

    # -- frames and episodes

    @property
    def num_episodes(self) -> int:
        return len(self._episode_rows)

    def add_frame(self, frame: dict[str, Any]) -> None:
        """Buffer one frame of the current episode: every declared feature plus ``task`` (str)."""
        if self._finalized:
            raise RuntimeError("the dataset is finalized")
        missing = [k for k in [*self.features, "task"] if k not in frame]
        if missing:
            raise ValueError(f"frame is missing {missing}")
        task = frame["task"]
        if not isinstance(task, str):
            raise ValueError(f"task must be a str, got {type(task).__name__}")
        row: dict[str, Any] = {"task": task}
        for key in self.numeric_keys:
            value = np.asarray(frame[key], dtype=self.features[key]["dtype"]).reshape(-1)
            if value.shape[0] != self.features[key]["shape"][0]:
                raise ValueError(f"{key}: expected {self.features[key]['shape'][0]} values, got {value.shape[0]}")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"{key} contains NaN or infinite values")
            row[key] = value
        for key in self.video_keys:
            image = np.asarray(frame[key])
            expected = tuple(self.features[key]["shape"])
            if image.shape != expected or image.dtype != np.uint8:
                raise ValueError(f"{key}: expected uint8 {expected} (H, W, 3) RGB, got {image.dtype} {image.shape}")
            self._encode(self._tracks[key], image)
        self._buffer.append(row)

    def _open_video(self, track: _VideoTrack) -> None:
        import av

        chunk, file = _chunk_file(track.file_counter, self.chunks_size)
        path = self.root / VIDEO_PATH.format(video_key=track.key, chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        track.container = av.open(str(path), mode="w")
        stream = track.container.add_stream(self.video_codec, rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = track.width, track.height, "yuv420p"
        if self.video_codec == "libsvtav1":
            # g = a key frame every 2 s keeps seeking to an episode cheap. Preset 8 measured on 64x64 tabletop
            # frames: mean abs error 2.9 (of which 2.3 is yuv420 itself) vs 3.8 at preset 10, smaller files.
            stream.options = {"crf": str(self.crf), "preset": str(self.preset), "g": str(2 * self.fps)}
        track.stream = stream
        track.frames_in_file = 0
        track.bytes_in_file = 0

    def _encode(self, track: _VideoTrack, image: np.ndarray) -> None:
        import av

        if track.container is None:
            self._open_video(track)
        if track.episode_frames == 0:
            track.episode_start_frame = track.frames_in_file
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        video_frame.pts = track.frames_in_file
        for packet in track.stream.encode(video_frame):
            track.bytes_in_file += packet.size
            track.container.mux(packet)
        if track.episode_frames < _IMAGE_STAT_MAX_FRAMES_PER_EPISODE:
            track.pixels.append(_sample_pixels(image, self._rng))
        track.frames_in_file += 1
        track.episode_frames += 1

    def _close_video(self, track: _VideoTrack) -> None:
        if track.container is None:
            return
        for packet in track.stream.encode():
            track.container.mux(packet)
        track.container.close()
        track.container = None
        track.file_counter += 1

    def clear_episode(self) -> None:
        """Drop the frames buffered for the current episode (only before any image was encoded)."""
        if any(t.episode_frames for t in self._tracks.values()):
            raise RuntimeError("images of this episode are already encoded; cannot clear it")
        self._buffer.clear()

    def save_episode(self, extra: dict[str, Any] | None = None) -> int:
        """Write the buffered frames as one episode; returns its index. ``extra`` adds episode columns."""
        import pandas as pd

        if not self._buffer:
            raise ValueError("cannot save an empty episode (add_frame first)")
        episode_index = len(self._episode_rows)
        length = len(self._buffer)
        for task in dict.fromkeys(r["task"] for r in self._buffer):
            self._tasks.setdefault(task, len(self._tasks))
        columns: dict[str, Any] = {}
        for key in self.numeric_keys:
            stacked = np.stack([r[key] for r in self._buffer])
            columns[key] = list(stacked)
            self._numeric_all[key].append(stacked)
        frame_index = np.arange(length, dtype=np.int64)
        columns["timestamp"] = (frame_index / self.fps).astype(np.float32)
        columns["frame_index"] = frame_index
        columns["episode_index"] = np.full(length, episode_index, dtype=np.int64)
        columns["index"] = np.arange(self._total_frames, self._total_frames + length, dtype=np.int64)
        columns["task_index"] = np.array([self._tasks[r["task"]] for r in self._buffer], dtype=np.int64)
        df = pd.DataFrame(columns)

        if self._data_frames and self._data_bytes >= self.data_file_bytes:
            self._flush_data_file()
        chunk, file = _chunk_file(self._data_file_counter, self.chunks_size)
        self._data_frames.append(df)
        self._data_bytes += sum(
            np.asarray(v).nbytes if not isinstance(v, list) else len(v) * 8 for v in columns.values()
        )

        row: dict[str, Any] = {
            "episode_index": episode_index,
            "tasks": list(dict.fromkeys(r["task"] for r in self._buffer)),
            "length": length,
            "data/chunk_index": chunk,
            "data/file_index": file,
            "dataset_from_index": self._total_frames,
            "dataset_to_index": self._total_frames + length,
        }
        episode_stats: dict[str, dict[str, np.ndarray]] = {}
        for key in self.numeric_keys:
            episode_stats[key] = numeric_stats(self._numeric_all[key][-1])
        for key, name in (("timestamp", "timestamp"), ("frame_index", "frame_index")):
            episode_stats[key] = numeric_stats(np.asarray(columns[name]))
        for key, track in self._tracks.items():
            if track.episode_frames != length:
                raise ValueError(f"{key}: {track.episode_frames} images for {length} frames in this episode")
            vchunk, vfile = _chunk_file(track.file_counter, self.chunks_size)
            row[f"videos/{key}/chunk_index"] = vchunk
            row[f"videos/{key}/file_index"] = vfile
            row[f"videos/{key}/from_timestamp"] = track.episode_start_frame / self.fps
            row[f"videos/{key}/to_timestamp"] = (track.episode_start_frame + length) / self.fps
            pixels = np.concatenate(track.pixels)
            episode_stats[key] = image_stats(pixels, length)
            track.all_pixels.append(pixels[:: max(1, len(pixels) // 20000)])
            track.pixels = []
            track.episode_frames = 0
            if track.bytes_in_file >= self.video_file_bytes:
                self._close_video(track)
        for key, stats in episode_stats.items():
            for name, value in stats.items():
                row[f"stats/{key}/{name}"] = np.asarray(value).reshape(-1).tolist()
        row["meta/episodes/chunk_index"] = 0
        row["meta/episodes/file_index"] = 0
        for key, value in (extra or {}).items():
            if key in row:
                raise ValueError(f"extra episode column {key!r} collides with a LeRobot column")
            row[key] = value
        self._episode_rows.append(row)
        self._total_frames += length
        self._buffer = []
        return episode_index

    def _flush_data_file(self) -> None:
        import pandas as pd

        if not self._data_frames:
            return
        chunk, file = _chunk_file(self._data_file_counter, self.chunks_size)
        path = self.root / DATA_PATH.format(chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.concat(self._data_frames, ignore_index=True).to_parquet(path, index=False)
        self._data_frames = []
        self._data_bytes = 0
        self._data_file_counter += 1

    def finalize(self) -> Path:
        """Close the videos and write data, episodes, tasks, stats and info. Returns the dataset root."""
        import pandas as pd

        if self._finalized:
            return self.root
        if self._buffer:
            raise RuntimeError(f"{len(self._buffer)} frames were added but not saved; call save_episode()")
        if not self._episode_rows:
            raise ValueError("no episodes were saved; nothing to write")
        for track in self._tracks.values():
            self._close_video(track)
        self._flush_data_file()

        episodes = pd.DataFrame(self._episode_rows)
        path = self.root / EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        episodes.to_parquet(path, index=False)

        tasks = pd.DataFrame({"task_index": list(self._tasks.values())}, index=pd.Index(list(self._tasks), name="task"))
        tasks.to_parquet(self.root / "meta" / "tasks.parquet")

        stats: dict[str, dict[str, np.ndarray]] = {}
        for key in self.numeric_keys:
            stats[key] = numeric_stats(np.concatenate(self._numeric_all[key]))
        for key, track in self._tracks.items():
            stats[key] = image_stats(np.concatenate(track.all_pixels), self._total_frames)
        lengths = [r["length"] for r in self._episode_rows]
        stats["timestamp"] = numeric_stats(np.concatenate([np.arange(n) / self.fps for n in lengths]))
        stats["frame_index"] = numeric_stats(np.concatenate([np.arange(n) for n in lengths]))
        stats["episode_index"] = numeric_stats(np.repeat(np.arange(len(lengths)), lengths))
        stats["index"] = numeric_stats(np.arange(self._total_frames))
        (self.root / "meta" / "stats.json").write_text(json.dumps(_stats_to_json(stats), indent=2))

        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": len(self._episode_rows),
            "total_frames": self._total_frames,
            "total_tasks": len(self._tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_file_bytes / 1e6,
            "video_files_size_in_mb": self.video_file_bytes / 1e6,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self._episode_rows)}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.video_keys else None,
            "features": {**self.features, **DEFAULT_FEATURES},
        }
        (self.root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
        self._finalized = True
        return self.root

    def __enter__(self) -> LeRobotDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            for track in self._tracks.values():
                if track.container is not None:
                    track.container.close()
                    track.container = None


# ----------------------------------------------------------------------------------------------- reader


class LeRobotDatasetMetadata:
    """``meta/``: info, stats, tasks and episodes of a LeRobot v3.0 dataset."""

    def __init__(self, root: str | Path):
        import pandas as pd

        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a LeRobot dataset: {info_path} is missing")
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        version = self.info.get("codebase_version")
        if version != CODEBASE_VERSION:
            raise ValueError(f"{self.root}: codebase_version {version!r}; this reader reads {CODEBASE_VERSION!r}")
        stats_path = self.root / "meta" / "stats.json"
        self.stats = _stats_from_json(json.loads(stats_path.read_text())) if stats_path.is_file() else {}
        self.tasks = pd.read_parquet(self.root / "meta" / "tasks.parquet")
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise FileNotFoundError(f"{self.root}: no meta/episodes/chunk-*/file-*.parquet")
        self.episodes = (
            pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
            .sort_values("episode_index")
            .reset_index(drop=True)
        )
        self.task_names = {int(i): str(t) for t, i in zip(self.tasks.index, self.tasks["task_index"])}

    @property
    def fps(self) -> int:
        return int(self.info["fps"])

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        return self.info["features"]

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f["dtype"] in ("video", "image")]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f["dtype"] == "video"]

    @property
    def image_keys(self) -> list[str]:
        """Cameras stored as images inside the data parquet (LeRobot's ``image`` dtype; we write videos)."""
        return [k for k, f in self.features.items() if f["dtype"] == "image"]

    @property
    def total_frames(self) -> int:
        return int(self.info["total_frames"])

    @property
    def total_episodes(self) -> int:
        return int(self.info["total_episodes"])

    def data_path(self, chunk: int, file: int) -> Path:
        return self.root / self.info["data_path"].format(chunk_index=chunk, file_index=file)

    def video_path(self, key: str, chunk: int, file: int) -> Path:
        return self.root / self.info["video_path"].format(video_key=key, chunk_index=chunk, file_index=file)


def decode_video_range(path: Path, from_s: float, num_frames: int, fps: int) -> np.ndarray:
    """Frames [from_s, from_s + num_frames / fps) of an mp4 as (num_frames, H, W, 3) uint8 RGB."""
    import av

    half = 0.5 / fps
    out: list[np.ndarray | None] = [None] * num_frames
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if from_s > 0:
            container.seek(int(max(0.0, from_s - half) / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            slot = int(round((frame.time - from_s) * fps))
            if slot < 0:
                continue
            if slot >= num_frames:
                break
            out[slot] = frame.to_ndarray(format="rgb24")
    missing = [i for i, f in enumerate(out) if f is None]
    if missing:
        raise ValueError(f"{path}: frames {missing[:5]}... of [{from_s:.3f}s + {num_frames}] are not in the video")
    return np.stack(out)  # type: ignore[arg-type]


class LeRobotDataset:
    """A LeRobot v3.0 dataset as a torch-style map dataset (see the module docstring for the item layout)."""

    def __init__(
        self,
        root: str | Path,
        episodes: list[int] | None = None,
        image_format: str = "float_chw",
        delta_timestamps: dict[str, list[float]] | None = None,
        video_cache_blocks: int = 16,
        video_block_s: float = 2.0,
    ):
        import pandas as pd

        if image_format not in ("float_chw", "uint8_hwc"):
            raise ValueError(f"image_format must be 'float_chw' or 'uint8_hwc', got {image_format!r}")
        self.root = Path(root)
        self.meta = LeRobotDatasetMetadata(self.root)
        self.image_format = image_format
        self.fps = self.meta.fps
        eps = self.meta.episodes
        if episodes is not None:
            unknown = sorted(set(episodes) - set(eps["episode_index"].tolist()))
            if unknown:
                raise ValueError(f"episodes {unknown} are not in {self.root} ({len(eps)} episodes)")
            eps = eps[eps["episode_index"].isin(episodes)].reset_index(drop=True)
        self.episodes = eps
        self._episode_by_index = {int(r["episode_index"]): r for _, r in eps.iterrows()}
        files = sorted({(int(r["data/chunk_index"]), int(r["data/file_index"])) for _, r in eps.iterrows()})
        frames = pd.concat([pd.read_parquet(self.meta.data_path(c, f)) for c, f in files], ignore_index=True)
        frames = frames[frames["episode_index"].isin(list(self._episode_by_index))]
        self.frames = frames.sort_values("index").reset_index(drop=True)
        self.numeric_keys = [
            k
            for k, f in self.meta.features.items()
            if f["dtype"] in NUMERIC_DTYPES and k not in DEFAULT_FEATURES and k in self.frames.columns
        ]
        self._columns = {k: np.stack(self.frames[k].to_numpy()).astype(np.float32) for k in self.numeric_keys}
        self._episode_of_row = self.frames["episode_index"].to_numpy()
        self._frame_of_row = self.frames["frame_index"].to_numpy()
        self._row_of_episode_start = {
            int(e): int(np.flatnonzero(self._episode_of_row == e)[0]) for e in self._episode_by_index
        }
        self.delta_timestamps = self._check_deltas(delta_timestamps or {})
        self._video_cache: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
        self._video_cache_size = video_cache_blocks
        self._video_block = max(1, int(round(video_block_s * self.fps)))

    def _check_deltas(self, deltas: dict[str, list[float]]) -> dict[str, np.ndarray]:
        out = {}
        for key, offsets in deltas.items():
            if key not in self.numeric_keys:
                raise ValueError(f"delta_timestamps: {key!r} is not a numeric feature; have {self.numeric_keys}")
            steps = np.asarray(offsets, dtype=np.float64) * self.fps
            if not np.allclose(steps, np.round(steps), atol=1e-4):
                raise ValueError(f"delta_timestamps[{key!r}] must be multiples of 1/fps = {1 / self.fps:.4f}s")
            out[key] = np.round(steps).astype(np.int64)
        return out

    @property
    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        return self.meta.stats

    @property
    def num_episodes(self) -> int:
        return len(self._episode_by_index)

    def __len__(self) -> int:
        return len(self.frames)

    def episode_frames(self, episode_index: int) -> tuple[int, int]:
        """(first, last + 1) row indices of ``episode_index`` in this dataset."""
        start = self._row_of_episode_start[episode_index]
        return start, start + int(self._episode_by_index[episode_index]["length"])

    def _video_frame(self, key: str, episode_index: int, frame_index: int) -> np.ndarray:
        """One decoded frame. Frames are decoded in blocks of ``video_block_s`` seconds (the writer's key-frame
        interval), cached LRU: sequential reads decode each frame once, random reads decode at most a block
        plus the frames since the previous key frame, whatever the episode length."""
        block = frame_index // self._video_block
        cache_key = (key, episode_index, block)
        frames = self._video_cache.get(cache_key)
        if frames is None:
            ep = self._episode_by_index[episode_index]
            chunk, file = int(ep[f"videos/{key}/chunk_index"]), int(ep[f"videos/{key}/file_index"])
            first = block * self._video_block
            count = min(self._video_block, int(ep["length"]) - first)
            from_s = float(ep[f"videos/{key}/from_timestamp"]) + first / self.fps
            frames = decode_video_range(self.meta.video_path(key, chunk, file), from_s, count, self.fps)
            self._video_cache[cache_key] = frames
            while len(self._video_cache) > self._video_cache_size:
                self._video_cache.popitem(last=False)
        else:
            self._video_cache.move_to_end(cache_key)
        return frames[frame_index - block * self._video_block]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        import torch

        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} frames")
        row = self.frames.iloc[idx]
        episode = int(row["episode_index"])
        frame_index = int(row["frame_index"])
        item: dict[str, Any] = {}
        for key in self.meta.video_keys:
            image = self._video_frame(key, episode, frame_index)
            if self.image_format == "uint8_hwc":
                item[key] = image
            else:
                item[key] = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
        for key in self.meta.image_keys:
            image = _decode_parquet_image(row[key])
            item[key] = (
                image if self.image_format == "uint8_hwc" else torch.from_numpy(image).permute(2, 0, 1).float() / 255
            )
        start, stop = self.episode_frames(episode)
        for key in self.numeric_keys:
            if key in self.delta_timestamps:
                rows = idx + self.delta_timestamps[key]
                pad = (rows < start) | (rows >= stop)
                item[key] = torch.from_numpy(self._columns[key][np.clip(rows, start, stop - 1)])
                item[f"{key}_is_pad"] = torch.from_numpy(pad)
            else:
                item[key] = torch.from_numpy(self._columns[key][idx])
        for key in ("episode_index", "frame_index", "index", "task_index"):
            item[key] = torch.tensor(int(row[key]), dtype=torch.int64)
        item["timestamp"] = torch.tensor(float(row["timestamp"]), dtype=torch.float32)
        item["task"] = self.meta.task_names[int(row["task_index"])]
        return item


def _decode_parquet_image(value: Any) -> np.ndarray:
    """An ``image`` feature cell ({"bytes": png/jpeg, "path": ...}) as (H, W, 3) uint8 RGB."""
    import io

    from PIL import Image

    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        raise ValueError("image cell has no bytes (images stored by path are not supported)")
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))  # a writable copy (torch.from_numpy warns on read-only arrays)


def summarize(root: str | Path) -> dict[str, Any]:
    """A short description of a dataset (what ``omnistream data info`` prints)."""
    meta = LeRobotDatasetMetadata(root)
    video_bytes = sum(p.stat().st_size for p in Path(root).glob("videos/**/*.mp4"))
    lengths = meta.episodes["length"].to_numpy()
    return {
        "root": str(root),
        "codebase_version": meta.info["codebase_version"],
        "fps": meta.fps,
        "robot_type": meta.info.get("robot_type"),
        "episodes": meta.total_episodes,
        "frames": meta.total_frames,
        "duration_s": round(meta.total_frames / meta.fps, 3),
        "episode_length": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": float(lengths.mean())},
        "tasks": list(meta.task_names.values()),
        "features": {k: {"dtype": f["dtype"], "shape": f["shape"]} for k, f in meta.features.items()},
        "video_mb": round(video_bytes / 1e6, 3),
        "episode_columns_extra": [
            c
            for c in meta.episodes.columns
            if not (c.startswith(("stats/", "videos/", "data/", "meta/", "dataset_")))
            and c not in ("episode_index", "tasks", "length")
        ],
        "finite": bool(all(math.isfinite(float(np.asarray(s["mean"]).sum())) for s in meta.stats.values())),
    }
