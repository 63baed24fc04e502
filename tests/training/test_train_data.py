"""Training data readers, resumable sampling, views/masks and checkpoint round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omnistream_train.augment import multiblock_masks, random_patch_masks, random_resized_crop, rope_coordinate_scale
from omnistream_train.checkpoint import load_checkpoint, save_checkpoint
from omnistream_train.data import (
    CaptionJSONL,
    GeometryFolder,
    ImageFolder,
    TabletopCaptions,
    VideoFolder,
    sample_indices,
    write_geometry_sequence,
)
from omnistream_train.geometry_targets import normalised_geometry_targets
from omnistream_train.synthetic import SyntheticTabletopStandIn


def test_geometry_folder_round_trip_keeps_the_geometry(tmp_path):
    item = SyntheticTabletopStandIn(sequences=1, frames=4, size=32, seed=3).items[0]  # OpenCV intrinsics
    rgb = (item["rgb"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    write_geometry_sequence(tmp_path / "seq0", rgb, item["depth"].numpy(), item["intrinsics"].numpy(),
                            item["cam_to_world"].numpy(), caption="a red box")  # fmt: skip
    folder = GeometryFolder(tmp_path, frames=4, size=32)
    assert len(folder) == 1
    got = folder[0]
    assert got["caption"] == "a red box" and got["rgb"].shape == (4, 3, 32, 32)
    expected = SyntheticTabletopStandIn(sequences=1, frames=4, size=32, seed=3)[0]
    assert torch.allclose(got["intrinsics"], expected["intrinsics"])
    a = normalised_geometry_targets(got["depth"][None], got["intrinsics"][None], got["cam_to_world"][None])
    b = normalised_geometry_targets(
        expected["depth"][None], expected["intrinsics"][None], expected["cam_to_world"][None]
    )
    assert torch.allclose(a["points"], b["points"], atol=1e-5)
    # resizing to half the size: focal lengths halve, and the principal point stays the image centre
    half = GeometryFolder(tmp_path, frames=4, size=16)[0]
    assert torch.allclose(half["intrinsics"][:, :2, :2], got["intrinsics"][:, :2, :2] / 2)
    assert torch.allclose(half["intrinsics"][:, :2, 2], torch.full((4, 2), (16 - 1) / 2))
    assert torch.allclose(got["intrinsics"][:, :2, 2], torch.full((4, 2), (32 - 1) / 2))
    # and a 2x2 block of fine pixels looks along the coarse pixel's ray (mean of the four fine rays)
    from omnistream_perception.model.geometry import pixel_rays

    fine = pixel_rays(got["intrinsics"][0].double(), torch.eye(4, dtype=torch.float64), 32, 32)[..., 3:]
    coarse = pixel_rays(half["intrinsics"][0].double(), torch.eye(4, dtype=torch.float64), 16, 16)[..., 3:]
    pooled = fine.reshape(16, 2, 16, 2, 3).mean(dim=(1, 3))
    assert torch.allclose(pooled, coarse, atol=1e-9)


def test_geometry_folder_reads_tabletop_npz_sequences(tmp_path):
    item = SyntheticTabletopStandIn(sequences=1, frames=5, size=24, seed=4).items[0]
    rgb = (item["rgb"].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    depth = item["depth"].numpy().copy()
    depth[:, 0, 0] = 3.0  # the far plane: "nothing hit"
    np.savez(tmp_path / "sequence_000000.npz", rgb=rgb, depth=depth, intrinsics=item["intrinsics"][0].numpy(),
             cam_to_world=item["cam_to_world"].numpy(), seed=4)  # fmt: skip
    (tmp_path / "index.json").write_text(json.dumps({"sequences": [{"file": "sequence_000000.npz", "frames": 5}]}))
    folder = GeometryFolder(tmp_path, frames=4, size=24)
    assert len(folder) == 1
    got = folder[0]
    assert got["depth"][:, 0, 0].eq(0).all() and got["depth"][:, 1:, 1:].gt(0).all()
    assert got["intrinsics"].shape == (4, 3, 3) and got["cam_to_world"].shape == (4, 4, 4)


def test_geometry_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GeometryFolder(tmp_path / "nope", 4, 32)
    with pytest.raises(ValueError, match="no geometry sequence"):
        GeometryFolder(tmp_path, 4, 32)


def test_image_folder_caption_jsonl_and_video_folder(tmp_path):
    import av
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "img" / "a.png")
    images = ImageFolder(tmp_path / "img", size=16)
    assert images[0]["rgb"].shape == (1, 3, 16, 16)
    assert images[0]["rgb"].mean().item() == pytest.approx(200 / 255, abs=1e-3)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "img/a.png", "caption": "grey"}) + "\n\n")
    captions = CaptionJSONL(tmp_path / "captions.jsonl", size=16)
    assert len(captions) == 1 and captions[0]["caption"] == "grey"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "img/a.png"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        CaptionJSONL(tmp_path / "bad.jsonl", size=16)

    (tmp_path / "vid").mkdir()
    with av.open(str(tmp_path / "vid" / "v.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for t in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 30 * t, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    videos = VideoFolder(tmp_path / "vid", frames=4, size=16)
    clip = videos[0]["rgb"]
    assert clip.shape == (4, 3, 16, 16)
    assert (clip.mean(dim=(1, 2, 3)).diff() > 0).all()  # frames come in order (brightening)


def test_tabletop_captions_template():
    scene = np.array([0.5, 0.1, 0.025, 0.5, -0.1, 0.025, 0.5, 0.0, 0.12])  # red right, green left, blue lifted
    text = TabletopCaptions.caption(scene)
    assert text == "from left to right: the green block, the blue block and the red block; the blue block is in the air"


def test_sample_indices_epochs_ranks_and_resume():
    n, world, batch = 10, 2, 3
    steps = [[sample_indices(n, s, r, world, batch, seed=0, stream=1) for r in range(world)] for s in range(5)]
    flat = [i for step in steps for rank in step for i in rank]
    # each epoch of 10 positions is a permutation: the first 10 draws cover every item once
    assert sorted(flat[:10]) == list(range(10))
    # ranks never share an item within a step's window of the same epoch
    assert not set(steps[0][0]) & set(steps[0][1])
    # a pure function: asking again (as a resumed run does) gives the same batch
    assert sample_indices(n, 3, 1, world, batch, seed=0, stream=1) == steps[3][1]


def test_views_and_masks_are_reproducible_and_well_formed():
    clips = torch.rand(2, 3, 3, 40, 40)
    a = random_resized_crop(clips, 16, (0.3, 1.0), torch.Generator().manual_seed(5))
    b = random_resized_crop(clips, 16, (0.3, 1.0), torch.Generator().manual_seed(5))
    assert a.shape == (2, 3, 3, 16, 16) and torch.equal(a, b)
    masks = random_patch_masks(64, (4, 4), torch.Generator().manual_seed(0), prob=1.0)
    assert masks.shape == (64, 4, 4) and masks.flatten(1).any(1).all() and not masks.flatten(1).all(1).any()
    video = multiblock_masks(3, 5, (6, 6), torch.Generator().manual_seed(0))
    assert video.shape == (3, 5, 6, 6) and (video == video[:, :1]).all()  # the same blocks in every frame
    assert video.float().mean(dim=(1, 2, 3)).le(0.75).all()
    t, s = rope_coordinate_scale(torch.Generator().manual_seed(0))
    assert 0.5 <= t <= 2 and 0.5 <= s <= 2


def test_checkpoint_round_trip_restores_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    save_checkpoint(tmp_path / "step-000003", {"model": model}, opt, {"step": 3})
    expected_next = torch.rand(3)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = opt.state[model.weight]["exp_avg"].clone()

    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    scalars = load_checkpoint(tmp_path / "step-000003", {"model": model2}, opt2)
    assert scalars["step"] == 3
    assert all(torch.equal(reference[k], v) for k, v in model2.state_dict().items())
    assert torch.equal(opt2.state[model2.weight]["exp_avg"], exp_avg)
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(torch.rand(3), expected_next)  # the RNG continues where the run was saved
    assert not list(tmp_path.glob("*.tmp"))
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in (tmp_path / "step-000003").iterdir())
