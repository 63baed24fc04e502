"""Reads LeRobot v3.0 datasets (ours and LeRobot's): metadata, frames with decoded video, action chunks.

See :mod:`omnistream_train.lerobot_dataset` for the layout and the item layout.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .lerobot_format import CODEBASE_VERSION, DEFAULT_FEATURES, NUMERIC_DTYPES, stats_from_json


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
        self.stats = stats_from_json(json.loads(stats_path.read_text())) if stats_path.is_file() else {}
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

    def numeric(self, key: str) -> np.ndarray:
        """Every row of a numeric feature, (frames, ...) float32 (no video is decoded)."""
        if key not in self._columns:
            raise ValueError(f"{key!r} is not a numeric feature of {self.root}; have {self.numeric_keys}")
        return self._columns[key]

    def task_of(self, episode_index: int) -> str:
        """The instruction of an episode's first frame."""
        start, _ = self.episode_frames(episode_index)
        return self.meta.task_names[int(self.frames["task_index"].iat[start])]

    def camera_frame(self, key: str, row: int) -> np.ndarray:
        """Camera ``key`` of dataset row ``row`` as (H, W, 3) uint8, decoding only that camera."""
        episode, frame_index = int(self._episode_of_row[row]), int(self._frame_of_row[row])
        if key in self.meta.video_keys:
            return self._video_frame(key, episode, frame_index)
        return _decode_parquet_image(self.frames[key].iat[row])

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
