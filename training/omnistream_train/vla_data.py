"""The streamed data path of ``train vla`` (``data="streamed"``): host memory that does not grow with the dataset.

The in-memory path (``vla.load_episodes``, the default of ``debug`` and ``demo``) holds every frame's images
and features in every process. This one keeps only an index (per frame: its action, state and target; per
episode: where it starts and its instruction) and reads images when they are needed:

* ``index_episodes`` reads the actions, states and targets of a dataset (LeRobot v3, CALVIN split, tabletop
  demonstrations) without its images and returns a ``FrameReader`` that reads them on demand, a camera of an
  episode or of one frame at a time (picklable: loader workers each open their own files);
* ``cache_features_on_disk`` runs the frozen backbone over the episodes once (loader workers read them, the
  ranks share the episodes) and writes the pooled tokens in float16 to ``<cache>/<camera>.npy``, read back
  memory-mapped: pages the kernel may drop, not memory the process holds;
* ``TrainFrames`` is the map dataset of the training batches (cached features, or the raw frames when
  ``random_shift`` augments them), with ``StepBatches`` as its batch sampler: the distributed sampler of this
  repository, one rank's micro-batches in step order, drawn by ``data.sample_indices`` as the in-memory path
  draws them (a pure function of seed, step and slice, so ``--resume`` repeats the data order exactly, which
  ``torch.utils.data.DistributedSampler`` cannot do mid-epoch).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnistream_perception.features_codec import batch_key

from .data import sample_indices
from .distributed import DistributedContext, data_slot, data_slots

FEATURE_DTYPE = np.float16


# ------------------------------------------------------------------------------------------------------
# The index of a dataset and its on-demand reader
# ------------------------------------------------------------------------------------------------------
class FrameReader:
    """Reads the frames of one camera of one episode (or one frame) on demand; episodes numbered as in the index."""

    def episode(self, k: int, cam: str) -> np.ndarray:  # (T, H, W, 3) uint8
        raise NotImplementedError

    def frame(self, k: int, t: int, cam: str) -> np.ndarray:  # (H, W, 3) uint8
        return self.episode(k, cam)[t]


class CalvinFrames(FrameReader):
    """One ``episode_XXXXXXX.npz`` per frame: a frame costs one small file read."""

    def __init__(self, root: Path, starts: list[int], keys: dict[str, str]):
        self.root, self.starts, self.keys = root, starts, keys
        self.lengths: list[int] = []

    def _path(self, frame_id: int) -> Path:
        return self.root / f"episode_{frame_id:07d}.npz"

    def frame(self, k: int, t: int, cam: str) -> np.ndarray:
        with np.load(self._path(self.starts[k] + t)) as f:
            return np.asarray(f[self.keys[cam]])

    def episode(self, k: int, cam: str) -> np.ndarray:
        return np.stack([self.frame(k, t, cam) for t in range(self.lengths[k])])


class TabletopFrames(FrameReader):
    """One ``episode_XXXXXX.npz`` per episode, each camera one array: a frame reads its episode's camera, so the
    last one read is kept (a worker's batch often holds several frames of one episode)."""

    def __init__(self, root: Path, files: list[str]):
        self.root, self.files = root, files
        self._last: tuple[int, str, np.ndarray] | None = None

    def episode(self, k: int, cam: str) -> np.ndarray:
        if self._last is not None and self._last[:2] == (k, cam):
            return self._last[2]
        with np.load(self.root / self.files[k]) as f:
            frames = np.asarray(f[cam])
        self._last = (k, cam, frames)
        return frames


class LeRobotFrames(FrameReader):
    """A LeRobot v3 dataset: each process opens its own reader (video blocks decoded and cached LRU)."""

    def __init__(self, root: Path, keys: dict[str, str]):
        self.root, self.keys = root, keys
        self._ds = None

    def __getstate__(self):
        return {"root": self.root, "keys": self.keys, "_ds": None}

    @property
    def ds(self):
        if self._ds is None:
            from .lerobot_dataset import LeRobotDataset

            self._ds = LeRobotDataset(self.root, image_format="uint8_hwc")
        return self._ds

    def frame(self, k: int, t: int, cam: str) -> np.ndarray:
        start, _ = self.ds.episode_frames(k)
        return np.asarray(self.ds.camera_frame(self.keys[cam], start + t))

    def episode(self, k: int, cam: str) -> np.ndarray:
        start, stop = self.ds.episode_frames(k)
        return np.stack([self.ds.camera_frame(self.keys[cam], row) for row in range(start, stop)])


def index_episodes(root: str | Path, cameras: list[str]):
    """(episodes without images, reader): ``vla.EpisodeData`` with empty ``images`` but the actions, instruction,
    state and target ``vla.load_episodes`` gives, in the same order, and a ``FrameReader`` for the images."""
    from .vla import detect_format

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist")
    kind = detect_format(root)
    if kind == "lerobot":
        return _index_lerobot(root, cameras)
    if kind == "calvin":
        return _index_calvin(root, cameras)
    return _index_tabletop(root, cameras)


def _index_lerobot(root: Path, cameras: list[str]):
    from .lerobot_dataset import LeRobotDataset
    from .vla import EpisodeData

    ds = LeRobotDataset(root, image_format="uint8_hwc")
    keys = {cam: f"observation.images.{cam}" for cam in cameras}
    missing = [k for k in keys.values() if k not in ds.meta.camera_keys]
    if missing:
        raise ValueError(f"{root} has cameras {ds.meta.camera_keys}, not {missing}; set cameras accordingly")
    actions = ds.numeric("action")
    episodes = []
    for k in range(ds.num_episodes):
        start, stop = ds.episode_frames(k)
        episodes.append(EpisodeData({}, np.array(actions[start:stop], dtype=np.float32), ds.task_of(k)))
    return episodes, LeRobotFrames(root, keys)


def _index_calvin(root: Path, cameras: list[str]):
    from omnistream_sim.calvin.cameras import calvin_key

    from .calvin_to_lerobot import CalvinConversionConfig, calvin_windows
    from .vla import EpisodeData

    keys = {cam: calvin_key(cam) for cam in cameras}
    use_language = (root / "lang_annotations" / "auto_lang_ann.npy").is_file()
    windows = calvin_windows(root, CalvinConversionConfig(use_language=use_language, default_task="do the task"))
    reader = CalvinFrames(root, [start for start, _, _ in windows], keys)
    episodes = []
    for start, end, text in windows:
        actions = []
        for i in range(start, end + 1):
            with np.load(reader._path(i)) as f:
                missing = [key for key in keys.values() if key not in f.files]
                if missing:
                    raise ValueError(f"{reader._path(i)} has no camera {missing}")
                actions.append(f["rel_actions"].astype(np.float32))
        episodes.append(EpisodeData({}, np.stack(actions), text))
        reader.lengths.append(end - start + 1)
    return episodes, reader


def _index_tabletop(root: Path, cameras: list[str]):
    from .vla import read_tabletop_episode, tabletop_index

    files = [entry["file"] for entry in tabletop_index(root)]
    episodes = [read_tabletop_episode(root / name, cameras, images=False) for name in files]
    return episodes, TabletopFrames(root, files)


# ------------------------------------------------------------------------------------------------------
# Frozen features on disk (float16, memory-mapped)
# ------------------------------------------------------------------------------------------------------
class _EpisodeImages(torch.utils.data.Dataset):
    """Loader items for the feature pass: every camera of episode ``ks[i]``."""

    def __init__(self, reader: FrameReader, ks: list[int], cameras: list[str]):
        self.reader, self.ks, self.cameras = reader, ks, cameras

    def __len__(self) -> int:
        return len(self.ks)

    def __getitem__(self, i: int) -> tuple[int, dict[str, np.ndarray]]:
        k = self.ks[i]
        return k, {cam: self.reader.episode(k, cam) for cam in self.cameras}


def _barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def cache_features_on_disk(
    policy, episodes, reader: FrameReader, config, directory: Path, ctx: DistributedContext, progress: bool
) -> dict[str, np.ndarray]:
    """Pooled patch tokens of every frame per camera, as ``vla.frozen_features`` computes them (``frame`` or
    ``stream``), stored as ``<directory>/<camera>.npy`` (float16, (frames, tokens, width)) and returned
    memory-mapped read-only. Episode k is encoded by rank ``k % world``; a cache written for the same frames,
    backbone weights and feature settings is reused (``meta.json``)."""
    from tqdm.auto import tqdm

    from .distributed import weights_digest
    from .vla import episode_tokens, feature_session

    directory = Path(directory)
    lengths = [len(e.actions) for e in episodes]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    shape = (int(starts[-1]), policy.config.tokens_per_camera, policy.config.vision_hidden_size)
    meta = {"shape": list(shape), "dtype": np.dtype(FEATURE_DTYPE).name, "cameras": list(config.cameras),
            "episode_lengths": lengths, "features": config.features, "image_size": policy.config.image_size,
            "pool": policy.config.pool, "backbone_sha256": weights_digest(policy.backbone)}  # fmt: skip
    paths = {cam: directory / f"{cam}.npy" for cam in config.cameras}
    meta_path = directory / "meta.json"
    reuse = (
        meta_path.is_file() and json.loads(meta_path.read_text()) == meta and all(p.is_file() for p in paths.values())
    )
    if not reuse:
        if ctx.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            meta_path.unlink(missing_ok=True)
            for path in paths.values():  # sized (sparse) files; every rank writes its episodes' rows into them
                np.lib.format.open_memmap(path, mode="w+", dtype=FEATURE_DTYPE, shape=shape).flush()
        _barrier(ctx)
        offsets = {cam: int(np.load(path, mmap_mode="r").offset) for cam, path in paths.items()}
        row_bytes = int(np.prod(shape[1:])) * np.dtype(FEATURE_DTYPE).itemsize
        mine = [k for k in range(len(episodes)) if k % ctx.world_size == ctx.rank]
        loader = torch.utils.data.DataLoader(
            _EpisodeImages(reader, mine, list(config.cameras)), batch_size=None, num_workers=config.loader_workers
        )
        session = feature_session(policy, config)
        total = sum(lengths[k] for k in mine)
        with contextlib.ExitStack() as stack:
            # plain file writes, not a writable memmap: written pages are not mapped into (and held by) the process
            files = {cam: stack.enter_context(open(path, "r+b")) for cam, path in paths.items()}
            bar = stack.enter_context(
                tqdm(total=total, desc="frozen features -> disk", unit="frame", disable=not progress)
            )
            for k, images in loader:
                for cam, frames in images.items():
                    tokens = episode_tokens(policy, frames, config, session).numpy().astype(FEATURE_DTYPE)
                    files[cam].seek(offsets[cam] + int(starts[k]) * row_bytes)
                    files[cam].write(np.ascontiguousarray(tokens).tobytes())
                bar.update(lengths[k])
        _barrier(ctx)
        if ctx.is_main:
            meta_path.write_text(json.dumps(meta) + "\n")
        _barrier(ctx)
    return {cam: np.load(path, mmap_mode="r") for cam, path in paths.items()}


# ------------------------------------------------------------------------------------------------------
# Training batches
# ------------------------------------------------------------------------------------------------------
@dataclass
class FrameIndex:
    """Per frame: action, state, target; per episode: first frame and instruction (what training needs besides
    images and features)."""

    starts: np.ndarray  # (episodes + 1,) first frame of each episode, then the number of frames
    actions: np.ndarray  # (frames, 7) float32
    tasks: list[str]  # per episode
    states: np.ndarray | None = None  # (frames, S) float32
    targets: np.ndarray | None = None  # (frames, 2) float32, standardised

    @classmethod
    def of(cls, episodes, states: np.ndarray | None, targets: torch.Tensor | None) -> FrameIndex:
        lengths = [len(e.actions) for e in episodes]
        return cls(
            starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            actions=np.concatenate([e.actions for e in episodes]).astype(np.float32),
            tasks=[e.instruction for e in episodes],
            states=states,
            targets=targets.numpy() if targets is not None else None,
        )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])

    def chunk(self, i: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Actions i..i+size-1 of frame i's episode (its last action repeated past the end) and the pad mask,
        as ``vla.action_chunks``."""
        k, t = self.locate(i)
        start, length = int(self.starts[k]), int(self.starts[k + 1] - self.starts[k])
        steps = t + np.arange(size)
        return self.actions[start + np.minimum(steps, length - 1)], steps >= length


class TrainFrames(torch.utils.data.Dataset):
    """Frame ``i`` -> its features per camera (from the disk cache), or its raw frames when given a ``reader``
    instead (the augmentation encodes them in the training process), plus action chunk, pad mask, instruction,
    state and (with ``targets``: training, not the before/after loss) the auxiliary target."""

    def __init__(
        self, index: FrameIndex, cameras: list[str], chunk: int, features=None, reader=None, targets: bool = True
    ):
        self.index, self.cameras, self.chunk_size = index, cameras, chunk
        self.features, self.reader, self.targets = features, reader, targets

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        if self.features is not None:
            for cam in self.cameras:
                item[batch_key(cam)] = torch.from_numpy(np.asarray(self.features[cam][i], dtype=np.float32))
        else:
            k, t = self.index.locate(i)
            for cam in self.cameras:
                item[f"frame.{cam}"] = torch.from_numpy(np.ascontiguousarray(self.reader.frame(k, t, cam)))
        actions, pad = self.index.chunk(i, self.chunk_size)
        item["action"], item["action_is_pad"] = torch.from_numpy(actions), torch.from_numpy(pad)
        item["task"] = self.index.tasks[self.index.locate(i)[0]]
        if self.index.states is not None:
            item["observation.state"] = torch.from_numpy(self.index.states[i])
        if self.targets and self.index.targets is not None:
            item["observation.target"] = torch.from_numpy(self.index.targets[i])
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: [it[k] for it in items] if k == "task" else torch.stack([it[k] for it in items]) for k in items[0]}


class StepBatches(torch.utils.data.Sampler):
    """This rank's micro-batches for optimiser steps ``first..last-1``, in order: micro-batch m of step s is
    ``sample_indices(frames, s, slot, slots, micro, seed, 0)`` with the rank-major slot of (rank, m), exactly
    the rows the in-memory path reads."""

    def __init__(self, frames: int, first: int, last: int, ctx: DistributedContext, grad_accum: int, micro: int,
                 seed: int):  # fmt: skip
        self.frames, self.first, self.last, self.ctx = frames, first, last, ctx
        self.grad_accum, self.micro, self.seed = grad_accum, micro, seed

    def __len__(self) -> int:
        return (self.last - self.first) * self.grad_accum

    def __iter__(self):
        slots = data_slots(self.ctx, self.grad_accum)
        for step in range(self.first, self.last):
            for m in range(self.grad_accum):
                slot = data_slot(self.ctx, self.grad_accum, m)
                yield sample_indices(self.frames, step, slot, slots, self.micro, self.seed, 0)


def loader(dataset: torch.utils.data.Dataset, batch_sampler, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
        prefetch_factor=2 if workers else None, persistent_workers=False,
    )  # fmt: skip


def sequential_batches(frames: int, size: int) -> list[list[int]]:
    """Every frame once, in order, ``size`` at a time (the before/after loss over the dataset)."""
    return [list(range(s, min(frames, s + size))) for s in range(0, frames, size)]
