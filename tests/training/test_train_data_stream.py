"""`train vla --set data="streamed"` (training/omnistream_train/vla_data.py): an index in memory, frames read on demand by loader
workers, features cached on disk in float16 and memory-mapped; the same rows, in the same order, as the in-memory
path, and host memory that does not grow with the dataset (the slow check measures it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from calvin_split import write_calvin_split
from conftest import run_torchrun

from omnistream_cli.main import main
from omnistream_train.data import sample_indices
from omnistream_train.distributed import DistributedContext
from omnistream_train.vla import load_episodes
from omnistream_train.vla_data import FrameIndex, StepBatches, index_episodes

SMALL = '{"image_size": 64}'


def _train(dataset, out, *extra) -> int:
    return main(["train", "vla", "--preset", "debug", "--dataset", str(dataset), "--out", str(out), "--threads", "1",
                 "--no-progress", "--set", f"policy_overrides={SMALL}", *extra])  # fmt: skip


def _tabletop_like(root, episodes: int = 3):
    """The tabletop demonstrations' layout (index.json + one npz per episode) with random content."""
    root.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for k in range(episodes):
        name = f"episode_{k:06d}.npz"
        n = 4 + k
        np.savez(root / name, static=rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
                 actions=rng.uniform(-1, 1, (n, 7)), instruction=f"lift block {k}")  # fmt: skip
        entries.append({"file": name})
    (root / "index.json").write_text(json.dumps({"episodes": entries}))
    return root


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return write_calvin_split(root / "split", [(0, 6), (7, 11), (12, 20)], ["open the drawer", "push", "lift"])


def test_the_index_and_reader_give_what_the_in_memory_path_loads(split, tmp_path):
    lerobot = tmp_path / "lerobot"
    assert main(["data", "calvin-to-lerobot", str(split), "--out", str(lerobot)]) == 0
    for root, cameras in ((split, ["static", "gripper"]), (lerobot, ["static", "gripper"]),
                          (_tabletop_like(tmp_path / "tabletop"), ["static"])):  # fmt: skip
        loaded = load_episodes(root, cameras)
        indexed, reader = index_episodes(root, cameras)
        assert [e.instruction for e in indexed] == [e.instruction for e in loaded]
        for k, (a, b) in enumerate(zip(indexed, loaded)):
            assert not a.images and np.array_equal(a.actions, b.actions)
            for cam in cameras:
                np.testing.assert_array_equal(reader.episode(k, cam), b.images[cam])
                np.testing.assert_array_equal(reader.frame(k, len(b.actions) - 1, cam), b.images[cam][-1])
        index = FrameIndex.of(indexed, None, None)
        from omnistream_train.vla import action_chunks

        chunks, pads = action_chunks(loaded[1].actions, 4)
        first = len(loaded[0].actions)
        for t in range(len(loaded[1].actions)):
            got, pad = index.chunk(first + t, 4)
            assert np.array_equal(got, chunks[t]) and np.array_equal(pad, pads[t])


def test_step_batches_are_the_in_memory_rows_split_over_ranks_and_accumulation():
    frames, steps, seed = 37, 5, 3
    single = list(StepBatches(frames, 0, steps, DistributedContext(), 1, 8, seed))
    assert single == [sample_indices(frames, s, 0, 1, 8, seed, 0) for s in range(steps)]
    ranks = [list(StepBatches(frames, 0, steps, DistributedContext(rank=r, world_size=2), 2, 2, seed)) for r in (0, 1)]
    for s in range(steps):  # 2 ranks x accumulation 2 x 2 rows read exactly the global batch of 8
        assert ranks[0][2 * s] + ranks[0][2 * s + 1] + ranks[1][2 * s] + ranks[1][2 * s + 1] == single[s]
    assert list(StepBatches(frames, 2, steps, DistributedContext(), 1, 8, seed)) == single[2:]  # resume


def test_streamed_training_follows_the_in_memory_run(split, tmp_path):
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    common = ("--max-steps", "4", "--batch-size", "4", "--set", 'cameras=["static","gripper"]')
    assert _train(split, memory, *common) == 0
    assert _train(split, streamed, *common, "--set", 'data="streamed"', "--set", "loader_workers=1") == 0
    cache = np.load(streamed / "feature_cache" / "static.npy", mmap_mode="r")
    assert isinstance(cache, np.memmap) and cache.dtype == np.float16 and cache.shape[0] == 21
    a = json.loads((memory / "summary.json").read_text())
    b = json.loads((streamed / "summary.json").read_text())
    assert b["data"] == "streamed" and a["frames"] == b["frames"] == 21
    # the same rows in the same order; only the features' float16 rounding differs
    assert b["dataset_loss_before"] == pytest.approx(a["dataset_loss_before"], rel=1e-3)
    rows_a = [json.loads(line) for line in (memory / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (streamed / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows_b] == pytest.approx([r["loss"] for r in rows_a], rel=1e-3)
    # a second run reuses the cache (same frames, backbone and settings)
    stamp = (streamed / "feature_cache" / "static.npy").stat().st_mtime_ns
    assert _train(split, tmp_path / "again", *common, "--set", 'data="streamed"', "--set", "loader_workers=0",
                  "--set", f'feature_cache="{streamed / "feature_cache"}"') == 0  # fmt: skip
    assert (streamed / "feature_cache" / "static.npy").stat().st_mtime_ns == stamp


def test_streamed_training_with_random_shift_reads_frames_in_the_workers(split, tmp_path):
    out = tmp_path / "shift"
    assert _train(split, out, "--max-steps", "3", "--batch-size", "4", "--set", 'data="streamed"',
                  "--set", "loader_workers=1", "--set", "random_shift=10") == 0  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow
def test_streamed_under_torchrun_shares_the_feature_pass_and_the_ranks_agree(split, tmp_path):
    common = ["--preset", "debug", "--dataset", str(split), "--threads", "1", "--no-progress", "--max-steps", "3",
              "--batch-size", "4", "--set", f"policy_overrides={SMALL}", "--set", 'data="streamed"',
              "--set", "loader_workers=1"]  # fmt: skip
    run_torchrun("train", "vla", *common, "--out", str(tmp_path / "two"))
    assert main(["train", "vla", *common, "--out", str(tmp_path / "one")]) == 0
    digests = json.loads((tmp_path / "two" / "rank_weights_sha256.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    # each rank encoded every other episode into the one cache: the same bytes as one process writes
    two = np.load(tmp_path / "two" / "feature_cache" / "static.npy")
    np.testing.assert_array_equal(two, np.load(tmp_path / "one" / "feature_cache" / "static.npy"))


# ---------------------------------------------------------------------------------------------- host memory
def _peak_memory_of_tree(cmd: list[str], env: dict) -> dict[str, int]:
    """Runs ``cmd``; the peaks over time of the summed RSS and PSS of it and its descendants (bytes). Loader
    workers are forked: their RSS counts the pages they share with the training process again, PSS does not."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "pss": 0}
    done = threading.Event()

    def poll():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                infos = [p.memory_full_info() for p in [root, *root.children(recursive=True)]]
                for key in peak:
                    peak[key] = max(peak[key], sum(getattr(info, key) for info in infos))
            except psutil.Error:
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    output, _ = proc.communicate(timeout=1200)
    done.set()
    thread.join()
    assert proc.returncode == 0, output[-3000:]
    return peak


@pytest.mark.slow
def test_streamed_host_memory_does_not_grow_with_the_dataset(tmp_path):
    """20 and 200 CALVIN-sized episodes (200 px static, 84 px gripper camera, 16 frames each): the streamed
    path's peak resident memory (training process + loader workers) differs by < 10 %; the in-memory path's
    grows with the images it holds (the check that the measurement sees growth)."""
    pytest.importorskip("psutil")
    frames_per_episode = 16
    splits = {}
    for episodes in (20, 200):
        windows = [(k * frames_per_episode, (k + 1) * frames_per_episode - 1) for k in range(episodes)]
        splits[episodes] = write_calvin_split(tmp_path / f"split{episodes}", windows, ["open the drawer"] * episodes,
                                              static=200, gripper=84)  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    peaks: dict[tuple[str, int], dict[str, int]] = {}
    for data in ("streamed", "memory"):
        for episodes, split in splits.items():
            cmd = [sys.executable, "-m", "omnistream_cli.main", "train", "vla", "--preset", "debug", "--dataset",
                   str(split), "--out", str(tmp_path / f"{data}{episodes}"), "--threads", "1", "--no-progress",
                   "--max-steps", "3", "--batch-size", "8", "--set", 'cameras=["static","gripper"]',
                   "--set", f"policy_overrides={SMALL}", "--set", f'data="{data}"', "--set", "loader_workers=2"]  # fmt: skip
            peaks[data, episodes] = _peak_memory_of_tree(cmd, env)
    print({f"{d} {e} episodes": {k: f"{v / 2**20:.0f} MiB" for k, v in p.items()} for (d, e), p in peaks.items()})
    growth = peaks["streamed", 200]["rss"] / peaks["streamed", 20]["rss"] - 1
    assert abs(growth) < 0.10, f"streamed peak RSS grew {growth:.1%} from 20 to 200 episodes"
    images = (200 - 20) * frames_per_episode * (200 * 200 + 84 * 84) * 3
    assert peaks["memory", 200]["rss"] - peaks["memory", 20]["rss"] > 0.5 * images  # the in-memory path holds them
