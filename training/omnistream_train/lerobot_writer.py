"""Writes LeRobot v3.0 datasets episode by episode: parquet data, AV1 videos, statistics, meta/.

See :mod:`omnistream_train.lerobot_dataset` for the layout and the API.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .lerobot_format import (
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_DATA_FILE_MB,
    DEFAULT_FEATURES,
    DEFAULT_VIDEO_FILE_MB,
    EPISODES_PATH,
    NUMERIC_DTYPES,
    VIDEO_PATH,
    chunk_file,
    image_stats,
    numeric_stats,
    stats_to_json,
)

# Pixels sampled per frame for image statistics (keeps stats of long datasets bounded in memory).
_IMAGE_STAT_PIXELS_PER_FRAME = 4096
_IMAGE_STAT_MAX_FRAMES_PER_EPISODE = 64

# SVT-AV1 prints its whole configuration on every encoder start unless told otherwise (1 = errors only).
os.environ.setdefault("SVT_LOG", "1")


def _sample_pixels(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flat = image.reshape(-1, 3)
    if len(flat) <= _IMAGE_STAT_PIXELS_PER_FRAME:
        return flat.copy()
    return flat[rng.choice(len(flat), _IMAGE_STAT_PIXELS_PER_FRAME, replace=False)]


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
        omnistream_info: dict[str, Any] | None = None,
    ):
        """``omnistream_info``: our own facts about the data (e.g. what a converter read), written to
        ``meta/info.json`` under ``"omnistream"`` (LeRobot reads info.json as a dict and ignores the key)."""
        self.root = Path(root)
        if not isinstance(fps, int) or fps <= 0:
            raise ValueError(f"fps must be a positive integer, got {fps!r}")
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{self.root} exists and is not empty; choose a new directory or overwrite")
            shutil.rmtree(self.root)
        self.fps = fps
        self.robot_type = robot_type
        self.omnistream_info = dict(omnistream_info) if omnistream_info else None
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

        chunk, file = chunk_file(track.file_counter, self.chunks_size)
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
        chunk, file = chunk_file(self._data_file_counter, self.chunks_size)
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
            vchunk, vfile = chunk_file(track.file_counter, self.chunks_size)
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
        chunk, file = chunk_file(self._data_file_counter, self.chunks_size)
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
        (self.root / "meta" / "stats.json").write_text(json.dumps(stats_to_json(stats), indent=2))

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
        if self.omnistream_info:
            info["omnistream"] = self.omnistream_info
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
