"""A CALVIN-format split for tests: the real file layout and keys (one ``episode_XXXXXXX.npz`` per frame, language
annotations), synthetic content."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_calvin_split(
    split: Path, windows: list[tuple[int, int]], texts: list[str], seed: int = 0, static: int = 20, gripper: int = 12
) -> Path:
    """Frames 0..max(end) with random ``static`` x ``static`` and ``gripper`` x ``gripper`` images; relative
    actions uniform in [-1, 1] (some beyond the recipe's +-0.65 bounds), the gripper +-1."""
    split.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    last = max(e for _, e in windows)
    for frame_id in range(last + 1):
        arm = rng.uniform(-1, 1, 6)
        np.savez(
            split / f"episode_{frame_id:07d}.npz",
            rgb_static=rng.integers(0, 255, (static, static, 3), dtype=np.uint8),
            rgb_gripper=rng.integers(0, 255, (gripper, gripper, 3), dtype=np.uint8),
            actions=rng.normal(size=7),
            rel_actions=np.concatenate([arm, [1.0 if frame_id % 3 else -1.0]]),
            robot_obs=np.arange(15, dtype=np.float64) + frame_id,
            scene_obs=np.zeros(24),
        )
    (split / "lang_annotations").mkdir()
    ann = {"language": {"ann": texts, "task": ["t"] * len(texts)}, "info": {"indx": windows}}
    np.save(split / "lang_annotations" / "auto_lang_ann.npy", ann, allow_pickle=True)
    np.save(split / "ep_start_end_ids.npy", np.array([[0, last]]))
    return split
