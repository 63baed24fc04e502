"""LeRobot v3.0 writer/reader: layout, stats, many episodes per file, file rolling, action chunks, CALVIN,
bad input, and the VLA policy training on what the reader returns."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from omnistream_cli.main import main as cli_main
from omnistream_train.lerobot_dataset import LeRobotDataset, LeRobotDatasetWriter

H, W = 32, 32


def _image(value: int, h: int = H, w: int = W) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = value, 255 - value, 128
    return img


def _write(root, episodes=(5, 7, 4), **kwargs):
    features = {
        "observation.images.static": {"dtype": "video", "shape": [H, W, 3]},
        "observation.images.wrist": {"dtype": "video", "shape": [16, 24, 3]},
        "observation.state": {"dtype": "float32", "shape": [3], "names": ["a", "b", "c"]},
        "action": {"dtype": "float32", "shape": [7], "names": None},
    }
    writer = LeRobotDatasetWriter(root, fps=15, features=features, robot_type="panda", **kwargs)
    expected = []
    for e, length in enumerate(episodes):
        for i in range(length):
            value = (40 * e + 12 * i) % 250
            action = np.array([e, i, e * i, 0.5, -0.5, 0.1 * i, 1 if i % 2 else -1], np.float32)
            writer.add_frame(
                {
                    "observation.images.static": _image(value),
                    "observation.images.wrist": _image(255 - value, 16, 24),
                    "observation.state": np.array([i, -i, e], np.float32),
                    "action": action,
                    "task": f"task {e % 2}",
                }
            )
            expected.append((e, i, value, action))
        writer.save_episode(extra={"success": e != 1})
    writer.finalize()
    return expected


def test_layout_is_lerobot_v3(tmp_path):
    import av

    root = tmp_path / "ds"
    _write(root)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 15 and info["robot_type"] == "panda"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 16, 2)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["splits"] == {"train": "0:3"}
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert key in info["features"]
    assert info["features"]["observation.images.static"]["info"]["video.codec"] == "av1"

    tasks = pd.read_parquet(root / "meta" / "tasks.parquet")
    assert tasks.index.name == "task" and tasks.loc["task 1", "task_index"] == 1

    episodes = pd.read_parquet(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    assert episodes["length"].tolist() == [5, 7, 4]
    assert episodes["dataset_from_index"].tolist() == [0, 5, 12]
    assert episodes["dataset_to_index"].tolist() == [5, 12, 16]
    # Many episodes per video file, placed one after the other.
    assert episodes["videos/observation.images.static/file_index"].tolist() == [0, 0, 0]
    assert episodes["videos/observation.images.static/from_timestamp"].tolist() == pytest.approx([0, 5 / 15, 12 / 15])
    assert episodes["stats/action/max"][2].tolist() == pytest.approx([2, 3, 6, 0.5, -0.5, 0.3, 1])
    assert episodes["success"].tolist() == [True, False, True]

    data = pd.read_parquet(root / "data" / "chunk-000" / "file-000.parquet")
    assert len(data) == 16
    assert set(data.columns) == {"observation.state", "action", "timestamp", "frame_index", "episode_index", "index",
                                 "task_index"}  # fmt: skip
    assert data["timestamp"].dtype == np.float32 and data["index"].tolist() == list(range(16))

    stats = json.loads((root / "meta" / "stats.json").read_text())
    for key in ("observation.images.static", "observation.state", "action"):
        assert set(stats[key]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    assert np.asarray(stats["observation.images.static"]["mean"]).shape == (3, 1, 1)
    assert stats["action"]["count"] == [16]
    assert stats["observation.state"]["max"] == pytest.approx([6, 0, 2])
    # Images are per channel in [0, 1]: channel 2 is constant 128.
    assert stats["observation.images.static"]["q50"][2][0][0] == pytest.approx(128 / 255, abs=0.03)

    with av.open(str(root / "videos" / "observation.images.static" / "chunk-000" / "file-000.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_tag == "av01"
        assert sum(1 for _ in container.decode(stream)) == 16


@pytest.mark.parametrize("roll", [False, True])
def test_reader_returns_every_frame(tmp_path, roll):
    root = tmp_path / "ds"
    sizes = {"video_files_size_in_mb": 0, "data_files_size_in_mb": 0} if roll else {}
    expected = _write(root, **sizes)
    if roll:  # one file per episode when the size limit is reached after every episode
        assert len(list((root / "videos" / "observation.images.static").glob("chunk-000/*.mp4"))) == 3
        assert len(list((root / "data").glob("chunk-000/*.parquet"))) == 3
    ds = LeRobotDataset(root, image_format="uint8_hwc")
    assert len(ds) == len(expected) == 16
    for idx, (e, i, value, action) in enumerate(expected):
        item = ds[idx]
        assert int(item["episode_index"]) == e and int(item["frame_index"]) == i and int(item["index"]) == idx
        assert item["timestamp"].item() == pytest.approx(i / 15)
        assert item["task"] == f"task {e % 2}"
        np.testing.assert_array_equal(item["action"].numpy(), action)
        np.testing.assert_array_equal(item["observation.state"].numpy(), [i, -i, e])
        static = item["observation.images.static"]
        assert static.shape == (H, W, 3) and static.dtype == np.uint8
        assert abs(float(static[..., 0].mean()) - value) < 5, (idx, float(static[..., 0].mean()), value)
        assert abs(float(item["observation.images.wrist"][..., 0].mean()) - (255 - value)) < 6


def test_float_images_episode_subset_and_action_chunks(tmp_path):
    root = tmp_path / "ds"
    _write(root)
    ds = LeRobotDataset(root, episodes=[1], delta_timestamps={"action": [0, 1 / 15, 2 / 15, 3 / 15]})
    assert len(ds) == 7 and ds.episode_frames(1) == (0, 7)
    item = ds[5]  # frame 5 of 7: the last two chunk entries are past the episode end
    assert (
        item["observation.images.static"].shape == (3, H, W)
        and item["observation.images.static"].dtype == torch.float32
    )
    assert float(item["observation.images.static"].min()) >= 0 and float(item["observation.images.static"].max()) <= 1
    assert item["action"].shape == (4, 7)
    assert item["action"][:, 1].tolist() == [5, 6, 6, 6]  # clamped to the last frame
    assert item["action_is_pad"].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="multiples of 1/fps"):
        LeRobotDataset(root, delta_timestamps={"action": [0, 0.05]})
    with pytest.raises(ValueError, match="episodes \\[9\\] are not in"):
        LeRobotDataset(root, episodes=[9])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["observation.images.static"].shape == (3, 3, H, W) and batch["action"].shape == (3, 4, 7)
    assert batch["task"] == ["task 1"] * 3


def test_writer_rejects_bad_input(tmp_path):
    features = {
        "observation.images.cam": {"dtype": "video", "shape": [H, W, 3]},
        "action": {"dtype": "float32", "shape": [2]},
    }
    with pytest.raises(ValueError, match="must be even"):
        LeRobotDatasetWriter(
            tmp_path / "a", fps=10, features={"observation.images.cam": {"dtype": "video", "shape": [31, 32, 3]}}
        )
    with pytest.raises(ValueError, match="fps must be a positive integer"):
        LeRobotDatasetWriter(tmp_path / "b", fps=0, features=features)
    writer = LeRobotDatasetWriter(tmp_path / "c", fps=10, features=features)
    with pytest.raises(ValueError, match="missing \\['task'\\]"):
        writer.add_frame({"observation.images.cam": _image(0), "action": [0, 0]})
    with pytest.raises(ValueError, match="action contains NaN"):
        writer.add_frame({"observation.images.cam": _image(0), "action": [np.nan, 0], "task": "t"})
    with pytest.raises(ValueError, match="expected uint8 \\(32, 32, 3\\)"):
        writer.add_frame({"observation.images.cam": _image(0, 16, 16), "action": [0, 0], "task": "t"})
    with pytest.raises(ValueError, match="cannot save an empty episode"):
        writer.save_episode()
    with pytest.raises(ValueError, match="no episodes were saved"):
        writer.finalize()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        LeRobotDatasetWriter(tmp_path / "d", fps=10, features=features)


# ----------------------------------------------------------------------------------------------- CALVIN


def _write_calvin(split, windows, texts):
    """A CALVIN-format split folder (real file layout and keys, synthetic content)."""
    split.mkdir(parents=True)
    rng = np.random.default_rng(0)
    last = max(e for _, e in windows)
    for frame_id in range(last + 1):
        np.savez(
            split / f"episode_{frame_id:07d}.npz",
            rgb_static=_image(frame_id * 5 % 250, 20, 20),
            rgb_gripper=_image(200 - frame_id * 5 % 200, 12, 12),
            actions=rng.normal(size=7).astype(np.float64),
            rel_actions=np.array([frame_id / 100, 0, 0, 0, 0, 0, 1 if frame_id % 3 else -1], np.float64),
            robot_obs=np.arange(15, dtype=np.float64) + frame_id,
            scene_obs=np.zeros(24),
            depth_static=np.zeros((20, 20), np.float32),
        )
    (split / "lang_annotations").mkdir()
    ann = {"language": {"ann": texts, "task": ["t"] * len(texts), "emb": np.zeros((len(texts), 1, 8))},
           "info": {"episodes": [], "indx": windows}}  # fmt: skip
    np.save(split / "lang_annotations" / "auto_lang_ann.npy", ann, allow_pickle=True)
    np.save(split / "ep_start_end_ids.npy", np.array([[0, last]]))


def test_calvin_to_lerobot(tmp_path, capsys):
    split = tmp_path / "task_D_D" / "training"
    _write_calvin(split, [(2, 6), (10, 13)], ["open the drawer", "lift the red block"])
    out = tmp_path / "calvin_ds"
    assert cli_main(["data", "calvin-to-lerobot", str(split), "--out", str(out)]) == 0
    ds = LeRobotDataset(out, image_format="uint8_hwc")
    assert ds.meta.fps == 30 and len(ds) == 5 + 4 and ds.num_episodes == 2
    item = ds[6]  # episode 1, frame 1 = CALVIN frame 11
    assert item["task"] == "lift the red block"
    np.testing.assert_allclose(item["action"].numpy(), [0.11, 0, 0, 0, 0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(item["observation.state"].numpy(), np.arange(15) + 11)
    assert item["observation.images.static"].shape == (20, 20, 3)
    assert abs(float(item["observation.images.static"][..., 0].mean()) - 55) < 5
    assert item["observation.images.gripper"].shape == (12, 12, 3)
    assert ds.meta.episodes["calvin_start"].tolist() == [2, 10]

    assert cli_main(["data", "calvin-to-lerobot", str(split), "--out", str(tmp_path / "x"), "--no-language",
                     "--task", "play", "--cameras", "static", "--action", "actions"]) == 0  # fmt: skip
    plain = LeRobotDataset(tmp_path / "x", image_format="uint8_hwc")
    assert len(plain) == 14 and plain[0]["task"] == "play" and "observation.images.gripper" not in plain[0]
    assert cli_main(["data", "calvin-to-lerobot", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_view_writes_png_and_mp4(tmp_path):
    import av

    root = tmp_path / "ds"
    _write(root)
    assert cli_main(["data", "view", str(root), "--episode", "1", "--out", str(tmp_path / "e1.png")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "e1.png") as png:
        assert png.size[0] > 300 and png.size[1] > 300
    assert cli_main(["data", "view", str(root), "--episode", "2", "--out", str(tmp_path / "e2.mp4")]) == 0
    with av.open(str(tmp_path / "e2.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4
    assert cli_main(["data", "view", str(root), "--episode", "7", "--out", str(tmp_path / "e7.png")]) == 2


# ----------------------------------------------------------------------------------------------- VLA training


@pytest.mark.margin
def test_vla_policy_trains_on_reader_batches(tmp_path, fixture_a, seed, margin):
    """What the reader returns is what the VLA policy's forward() takes: loss falls on converted data."""
    from omnistream_perception.model import OmniStreamModel
    from omnistream_vla.normalization import ActionNormalizer
    from omnistream_vla.policy import OmniStreamVLAConfig, OmniStreamVLAPolicy

    root = tmp_path / "ds"
    _write(root, episodes=(6, 6))
    torch.manual_seed(seed)
    config = OmniStreamVLAConfig.preset("debug", backbone=None)
    chunk = config.chunk_size
    ds = LeRobotDataset(root, delta_timestamps={"action": [k / 15 for k in range(chunk)]})
    policy = OmniStreamVLAPolicy(config, backbone=OmniStreamModel.from_pretrained(fixture_a))
    policy.normalizer = ActionNormalizer.from_lerobot_stats(root / "meta" / "stats.json", "min_max", config.arm_dims)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))
    assert batch["action"].shape == (12, chunk, 7) and batch["action_is_pad"].shape == (12, chunk)
    batch["observation.features.static"] = policy.encode_images(batch.pop("observation.images.static"))
    groups = policy.parameter_groups()
    optimizer = torch.optim.Adam([{"params": g["params"], "lr": 3e-3} for g in groups])
    policy.train()
    losses = []
    for _ in range(40):
        loss, _ = policy(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all(), losses[::10]
    margin("loss fall (first / last)", losses[0] / losses[-1], 1.5, baseline=1.0)


def test_reader_reads_image_features_stored_in_parquet(tmp_path):
    """LeRobot's other camera storage (dtype "image": PNG bytes in the data parquet) reads too."""
    import io

    from PIL import Image

    root = tmp_path / "ds"
    _write(root, episodes=(3,))
    data_path = root / "data" / "chunk-000" / "file-000.parquet"
    data = pd.read_parquet(data_path)
    cells = []
    for i in range(len(data)):
        buffer = io.BytesIO()
        Image.fromarray(_image(30 * i, 8, 8)).save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": f"frame_{i}.png"})
    data["observation.images.top"] = cells
    data.to_parquet(data_path, index=False)
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["observation.images.top"] = {"dtype": "image", "shape": [8, 8, 3], "names": None}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    ds = LeRobotDataset(root, image_format="uint8_hwc")
    np.testing.assert_array_equal(ds[2]["observation.images.top"], _image(60, 8, 8))  # PNG is lossless
    assert LeRobotDataset(root)[1]["observation.images.top"].shape == (3, 8, 8)


def test_random_access_across_video_blocks(tmp_path):
    """Long episodes are decoded in blocks; any access order returns the right frame."""
    root = tmp_path / "ds"
    features = {
        "observation.images.cam": {"dtype": "video", "shape": [16, 16, 3]},
        "action": {"dtype": "float32", "shape": [1]},
    }
    writer = LeRobotDatasetWriter(root, fps=10, features=features)
    values = []
    for length in (45, 30):
        for i in range(length):
            value = (5 * len(values)) % 250
            values.append(value)
            writer.add_frame({"observation.images.cam": _image(value, 16, 16), "action": [i], "task": "t"})
        writer.save_episode()
    writer.finalize()
    ds = LeRobotDataset(root, image_format="uint8_hwc", video_block_s=1.0, video_cache_blocks=2)
    order = np.random.default_rng(0).permutation(len(ds))
    for idx in order:
        got = float(ds[int(idx)]["observation.images.cam"][..., 0].mean())
        assert abs(got - values[idx]) < 5, (int(idx), got, values[idx])
    assert len(ds._video_cache) <= 2
