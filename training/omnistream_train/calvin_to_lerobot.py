"""CALVIN episodes (one ``episode_XXXXXXX.npz`` per frame + language annotations) -> LeRobot v3.0.

CALVIN's split folder (e.g. ``task_ABC_D/training``) holds:
  episode_0000123.npz              one frame: rgb_static (200x200x3), rgb_gripper (84x84x3), actions (7: absolute
                                   tcp xyz, euler xyz, gripper), rel_actions (7: scaled relative xyz, euler, gripper),
                                   robot_obs (15), scene_obs (24), depth_* ...
  lang_annotations/auto_lang_ann.npy   pickled dict: info.indx = [(start, end), ...] (inclusive frame ids),
                                   language.ann = [instruction, ...] (one per window), language.task = [...]
  ep_start_end_ids.npy             [(start, end), ...] of the raw recordings (used without language)

Each annotated window becomes one LeRobot episode with its instruction as task. Without annotations
(``use_language=False``) every recording in ``ep_start_end_ids.npy`` is one episode with ``default_task``.
Features: ``observation.images.static`` / ``.gripper`` (video; the camera names of
``omnistream_sim.calvin.cameras``, which the CALVIN evaluation uses too), ``observation.state`` (robot_obs, 15),
``action`` (rel_actions by default, or the absolute ``actions``), with CALVIN's gripper sign (+1 open, -1 close).
``meta/info.json`` records the source under ``"omnistream"`` (``{"source": "calvin", "action_key": ...}``), so
``train vla`` gives the converted relative actions the CALVIN bounds (+-0.65) and units, as for the split itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnistream_sim.calvin.cameras import CAMERAS

from .lerobot_dataset import LeRobotDatasetWriter

CALVIN_FPS = 30  # CALVIN's control rate (frames are recorded at every control step)
SOURCE = "calvin"  # info.json "omnistream" -> "source" of a converted split (read by omnistream_train.vla)
ROBOT_OBS_NAMES = [
    "tcp_x", "tcp_y", "tcp_z", "tcp_roll", "tcp_pitch", "tcp_yaw", "gripper_width",
    *[f"joint_{i}" for i in range(1, 8)], "gripper_action",
]  # fmt: skip
ACTION_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]


@dataclass
class CalvinConversionConfig:
    cameras: tuple[str, ...] = ("static", "gripper")
    action_key: str = "rel_actions"  # or "actions" (absolute)
    use_language: bool = True
    default_task: str | None = None
    fps: int = CALVIN_FPS
    max_episodes: int | None = None

    def __post_init__(self):
        unknown = [c for c in self.cameras if c not in CAMERAS]
        if unknown or not self.cameras:
            raise ValueError(f"cameras must be a non-empty subset of {list(CAMERAS)}, got {list(self.cameras)}")
        if self.action_key not in ("rel_actions", "actions"):
            raise ValueError(f"action_key must be 'rel_actions' or 'actions', got {self.action_key!r}")


def calvin_windows(split_dir: Path, cfg: CalvinConversionConfig) -> list[tuple[int, int, str]]:
    """(start, end inclusive, instruction) of the episodes to write."""
    if cfg.use_language:
        ann_path = split_dir / "lang_annotations" / "auto_lang_ann.npy"
        if not ann_path.is_file():
            raise ValueError(f"{ann_path} is missing; pass use_language=False (--no-language) with a --task")
        ann = np.load(ann_path, allow_pickle=True).item()
        try:
            spans, texts = ann["info"]["indx"], ann["language"]["ann"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{ann_path}: expected info.indx and language.ann, got {exc}") from exc
        if len(spans) != len(texts):
            raise ValueError(f"{ann_path}: {len(spans)} windows but {len(texts)} instructions")
        windows = [(int(s), int(e), str(t)) for (s, e), t in zip(spans, texts)]
    else:
        ids_path = split_dir / "ep_start_end_ids.npy"
        if not ids_path.is_file():
            raise ValueError(f"{ids_path} is missing: is {split_dir} a CALVIN split folder?")
        if not cfg.default_task:
            raise ValueError("without language annotations every episode needs --task")
        windows = [(int(s), int(e), cfg.default_task) for s, e in np.load(ids_path)]
    windows.sort()
    return windows[: cfg.max_episodes] if cfg.max_episodes else windows


def _load_frame(split_dir: Path, frame_id: int) -> Any:
    path = split_dir / f"episode_{frame_id:07d}.npz"
    if not path.is_file():
        raise ValueError(f"{path} is missing (referenced by the annotations)")
    return np.load(path)


def convert_calvin(split_dir: Path, out: Path, cfg: CalvinConversionConfig, overwrite: bool = False) -> dict[str, Any]:
    from tqdm import tqdm

    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise ValueError(f"{split_dir} is not a directory")
    windows = calvin_windows(split_dir, cfg)
    if not windows:
        raise ValueError(f"{split_dir}: no episodes found")
    first = _load_frame(split_dir, windows[0][0])
    features: dict[str, dict[str, Any]] = {
        f"observation.images.{cam}": {"dtype": "video", "shape": list(first[CAMERAS[cam]].shape)} for cam in cfg.cameras
    }
    features["observation.state"] = {"dtype": "float32", "shape": [len(first["robot_obs"])], "names": None}
    if len(first["robot_obs"]) == len(ROBOT_OBS_NAMES):
        features["observation.state"]["names"] = ROBOT_OBS_NAMES
    features["action"] = {"dtype": "float32", "shape": [len(first[cfg.action_key])], "names": ACTION_NAMES}
    writer = LeRobotDatasetWriter(out, fps=cfg.fps, features=features, robot_type="franka_calvin", overwrite=overwrite,
                                  omnistream_info={"source": SOURCE, "action_key": cfg.action_key})  # fmt: skip
    frames = 0
    for start, end, task in tqdm(windows, desc="CALVIN episodes", unit="episode"):
        if end < start:
            raise ValueError(f"window ({start}, {end}) ends before it starts")
        for frame_id in range(start, end + 1):
            data = _load_frame(split_dir, frame_id)
            frame = {f"observation.images.{cam}": np.asarray(data[CAMERAS[cam]], np.uint8) for cam in cfg.cameras}
            frame["observation.state"] = np.asarray(data["robot_obs"], np.float32)
            frame["action"] = np.asarray(data[cfg.action_key], np.float32)
            frame["task"] = task
            writer.add_frame(frame)
        writer.save_episode(extra={"calvin_start": start, "calvin_end": end})
        frames += end - start + 1
    writer.finalize()
    return {"out": str(out), "episodes": len(windows), "frames": frames, "fps": cfg.fps}
