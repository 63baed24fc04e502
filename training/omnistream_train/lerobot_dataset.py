"""LeRobot v3.0 datasets: a writer and a reader of our own (``lerobot`` itself cannot be installed here).

The format's constants and statistics are in ``lerobot_format``, the writer in ``lerobot_writer``, the reader
and ``summarize`` in ``lerobot_reader``; this module is the public name for all three.

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

from .lerobot_format import (
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_FEATURES,
    EPISODES_PATH,
    NUMERIC_DTYPES,
    STAT_NAMES,
    VIDEO_PATH,
    image_stats,
    numeric_stats,
)
from .lerobot_reader import LeRobotDataset, LeRobotDatasetMetadata, decode_video_range, summarize
from .lerobot_writer import LeRobotDatasetWriter

__all__ = [
    "CODEBASE_VERSION",
    "DATA_PATH",
    "DEFAULT_FEATURES",
    "EPISODES_PATH",
    "NUMERIC_DTYPES",
    "STAT_NAMES",
    "VIDEO_PATH",
    "LeRobotDataset",
    "LeRobotDatasetMetadata",
    "LeRobotDatasetWriter",
    "decode_video_range",
    "image_stats",
    "numeric_stats",
    "summarize",
]
