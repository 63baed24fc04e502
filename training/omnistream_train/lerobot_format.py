"""The LeRobot v3.0 format: file layout, bookkeeping features and statistics (shared by writer and reader).

See :mod:`omnistream_train.lerobot_dataset` for the layout on disk and the reader's and writer's APIs.
"""

from __future__ import annotations

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


def chunk_file(file_counter: int, chunks_size: int) -> tuple[int, int]:
    """(chunk index, file index) of the ``file_counter``-th file of a kind (data, a camera's video)."""
    return file_counter // chunks_size, file_counter % chunks_size


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


def stats_to_json(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    return {key: {name: np.asarray(v).tolist() for name, v in feat.items()} for key, feat in stats.items()}


def stats_from_json(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    return {key: {name: np.asarray(v) for name, v in feat.items()} for key, feat in raw.items()}
