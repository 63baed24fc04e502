"""Text for the VLM stage (``omnistream train vlm``): questions and answers about frames, one sample per pair.

Sources:

* tabletop demonstrations (``index.json`` + ``episode_XXXXXX.npz`` with ``scene`` and ``state``): questions
  generated from the simulator's ground truth, per frame (the static camera looks along -x, so the image's
  left is world -y; "left / middle / right" rank the blocks by y):

  - ``which_colour``: "Which colour is the block on the left?" -> "red"
  - ``where``: "Where is the red block?" -> "on the left" | "in the middle" | "on the right"
  - ``caption``: "Describe the scene." -> "from left to right: the green block, ... ; the red block is in the air"
  - ``holds``: "What does the arm hold?" -> "the red block" | "nothing"
  - ``moved``: "What has moved?" -> "the red block" | "nothing" (since the episode began; streamed features only)
  - ``task``: "What is the robot doing?" -> the episode's instruction
* LeRobot v3 datasets and CALVIN splits: the ``task`` question with the episode's task string.
* caption JSONL: one ``{"image": "path", "text": "..."}`` or ``{"frames": ["path", ...], "text": "..."}`` per line
  (paths relative to the file; ``caption`` is accepted for ``text``): "Describe the scene." -> the text, about the
  image or the last of the frames (streamed features see the frames before it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS = ("red", "green", "blue")  # order of the 9 scene values (omnistream_sim.tabletop.tasks.COLOURS)
SIDES = ("on the left", "in the middle", "on the right")
CAPTION_QUESTION = "Describe the scene."
TASK_QUESTION = "What is the robot doing?"
HOLDS_QUESTION = "What does the arm hold?"
MOVED_QUESTION = "What has moved?"
NOTHING = "nothing"
# A block counts as held when it is off the table and the gripper is at it; as moved when its centre is this far
# from where it stood when the episode began.
HELD_HEIGHT = 0.015
HELD_DISTANCE = 0.06
MOVED_DISTANCE = 0.02


def which_colour_question(side: int) -> str:
    return f"Which colour is the block {SIDES[side]}?"


def where_question(colour: str) -> str:
    return f"Where is the {colour} block?"


@dataclass(frozen=True)
class VLMSample:
    frame: int  # row of the cached features
    question: str
    answer: str
    kind: str


def _blocks(names: list[str]) -> str:
    return " and ".join(f"the {n} block" for n in names) if names else NOTHING


def tabletop_questions(
    scene: np.ndarray,
    state: np.ndarray | None,
    start_scene: np.ndarray,
    instruction: str,
    kinds: list[str],
    block_size: float = 0.05,
) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for one frame: ``scene`` (9,) block centres, ``state`` the robot state (TCP xyz
    first), ``start_scene`` the episode's first scene."""
    from .data import TabletopCaptions

    centres = np.asarray(scene, dtype=np.float64).reshape(3, 3)
    order = np.argsort(centres[:, 1], kind="stable")  # colours from the image's left to its right
    out: list[tuple[str, str, str]] = []
    if "which_colour" in kinds:
        out += [("which_colour", which_colour_question(side), COLOURS[c]) for side, c in enumerate(order)]
    if "where" in kinds:
        out += [("where", where_question(COLOURS[c]), SIDES[side]) for side, c in enumerate(order)]
    if "caption" in kinds:
        out.append(("caption", CAPTION_QUESTION, TabletopCaptions.caption(scene, block_size)))
    if "holds" in kinds and state is not None:
        tcp = np.asarray(state[:3], dtype=np.float64)
        held = [COLOURS[i] for i in range(3) if centres[i, 2] > block_size / 2 + HELD_HEIGHT
                and np.linalg.norm(centres[i] - tcp) < HELD_DISTANCE]  # fmt: skip
        out.append(("holds", HOLDS_QUESTION, _blocks(held)))
    if "moved" in kinds:
        start = np.asarray(start_scene, dtype=np.float64).reshape(3, 3)
        moved = [COLOURS[i] for i in range(3) if np.linalg.norm(centres[i] - start[i]) > MOVED_DISTANCE]
        out.append(("moved", MOVED_QUESTION, _blocks(moved)))
    if "task" in kinds and instruction:
        out.append(("task", TASK_QUESTION, instruction))
    return out


def dataset_samples(root: str | Path, lengths: list[int], instructions: list[str], kinds: list[str],
                    frame_stride: int = 1, offset: int = 0) -> list[VLMSample]:  # fmt: skip
    """Samples of one dataset whose episodes (``lengths`` frames each, in ``omnistream_train.vla.load_episodes``
    order) start at feature row ``offset``. Tabletop demonstrations get every kind; other formats the task."""
    from .vla import detect_format

    root = Path(root)
    tabletop = detect_format(root) == "tabletop"
    entries, block_size = [], 0.05
    if tabletop:
        index = json.loads((root / "index.json").read_text())
        entries = index["episodes"]
        block_size = float(index.get("config", {}).get("block_size", block_size))
    samples: list[VLMSample] = []
    start = offset
    for e, length in enumerate(lengths):
        scene = state = None
        if tabletop:
            with np.load(root / entries[e]["file"]) as f:
                if "scene" not in f.files:
                    raise ValueError(f"{root / entries[e]['file']} has no 'scene' (regenerate the demonstrations)")
                scene = f["scene"]
                state = f["state"] if "state" in f.files else None
        for t in range(0, length, frame_stride):
            if scene is not None:
                rows = tabletop_questions(
                    scene[t], None if state is None else state[t], scene[0], instructions[e], kinds, block_size
                )
            else:
                rows = [("task", TASK_QUESTION, instructions[e])] if "task" in kinds else []
            samples += [VLMSample(start + t, q, a, k) for k, q, a in rows]
        start += length
    return samples


def read_caption_jsonl(path: str | Path) -> list[tuple[list[Path], str]]:
    """(frame paths, text) per line of a caption JSONL (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from exc
        text = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        frames = row.get("frames", [row["image"]] if "image" in row else None) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip() or not frames or not isinstance(frames, list):
            raise ValueError(f"{path}:{n}: each line needs 'text' and 'image' (or a list 'frames'), got {line[:120]}")
        rows.append(([path.parent / f for f in frames], text.strip()))
    if not rows:
        raise ValueError(f"{path} holds no captions")
    return rows


def caption_episodes(path: str | Path, camera: str, last_frame_only: bool):
    """Caption JSONL rows as ``omnistream_train.vla.EpisodeData`` (uint8 frames; zero actions, which only size the
    feature pass) and their captions. ``last_frame_only``: frame features need only the frame the text is about."""
    from .data import _read_image
    from .vla import EpisodeData

    episodes, texts = [], []
    for frames, text in read_caption_jsonl(path):
        if last_frame_only:
            frames = frames[-1:]
        missing = [str(f) for f in frames if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: image(s) not found: {missing[:3]}")
        images = [_read_image(f) for f in frames]
        if len({im.shape for im in images}) != 1:
            raise ValueError(f"{path}: the frames of one line must have one size, got {[im.shape for im in images]}")
        episodes.append(EpisodeData({camera: np.stack(images)}, np.zeros((len(images), 7), np.float32), text))
        texts.append(text)
    return episodes, texts
