"""Dataset readers on tiny samples written in each dataset's own on-disk layout (no data is downloadable here)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from omnistream_perception.evaluation.datasets import (
    BONN_SEQUENCES,
    load_dataset,
    read_bonn,
    read_kitti,
    read_scannet,
    read_sintel,
    read_tum,
)
from omnistream_perception.evaluation.formats import (
    read_sintel_camera,
    read_sintel_depth,
    write_depth_png,
    write_sintel_camera,
    write_sintel_depth,
)


def _rgb(path, value=0, size=(6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value % 256, np.uint8)).save(path)


def _depth_png(path, metres, units):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_depth_png(path, np.full((4, 6), metres), units)


def _pose(i):
    pose = np.eye(4)
    angle = 0.1 * i
    pose[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    pose[:3, 3] = [0.1 * i, -0.2 * i, 1.0 + 0.05 * i]
    return pose


def test_sintel_files_and_protocol_selection(tmp_path):
    root = tmp_path / "MPI-Sintel"
    k = np.array([[1120.0, 0, 511.5], [0, 1120.0, 217.5], [0, 0, 1]])
    for seq in ("alley_1", "alley_2"):  # alley_2 is one of the 14 pose sequences, alley_1 is not
        for i in range(1, 4):
            _rgb(root / "training" / "final" / seq / f"frame_{i:04d}.png", i)
            (root / "training" / "depth" / seq).mkdir(parents=True, exist_ok=True)
            (root / "training" / "camdata_left" / seq).mkdir(parents=True, exist_ok=True)
            write_sintel_depth(root / "training" / "depth" / seq / f"frame_{i:04d}.dpt", np.full((4, 6), 10.0 * i))
            write_sintel_camera(root / "training" / "camdata_left" / seq / f"frame_{i:04d}.cam", k, _pose(i))
    raw = (root / "training" / "depth" / "alley_2" / "frame_0002.dpt").read_bytes()
    assert np.frombuffer(raw[:4], "<f4")[0] == np.float32(202021.25) and np.frombuffer(raw[4:12], "<i4").tolist() == [
        6,
        4,
    ]
    k_back, c2w = read_sintel_camera(root / "training" / "camdata_left" / "alley_2" / "frame_0002.cam")
    np.testing.assert_allclose(k_back, k)
    np.testing.assert_allclose(c2w, _pose(2), atol=1e-12)

    depth = read_sintel(root, "depth", sequences=["all"])
    assert [s.name for s in depth] == ["alley_1", "alley_2"]  # the scripts' --full_seq
    assert depth[1].gt_depth(2)[0, 0] == pytest.approx(30.0) and depth[1].image(0).shape == (4, 6, 3)
    assert depth[1].cam_to_world is None
    with pytest.raises(FileNotFoundError, match=r"'ambush_4', .* are missing .* --sequences"):
        read_sintel(root, "pose")  # by default the protocol's 14 sequences, all of them
    (pose,) = read_sintel(root, "pose", sequences=["alley_2"])
    assert pose.name == "alley_2" and pose.depth is None
    np.testing.assert_allclose(pose.cam_to_world[2], _pose(3), atol=1e-12)
    (both,) = read_sintel(root / "training", sequences=["alley_2"])
    assert both.depth is not None and both.cam_to_world.shape == (3, 4, 4)
    (root / "training" / "depth" / "alley_1" / "frame_0003.dpt").unlink()
    with pytest.raises(FileNotFoundError, match="3 images but 2 depth files"):
        read_sintel(root, "depth", sequences=["alley_1"])
    (tmp_path / "junk.dpt").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="wrong MPI-Sintel tag"):
        read_sintel_depth(tmp_path / "junk.dpt")


def test_bonn_frames_30_to_139(tmp_path):
    seq = tmp_path / "rgbd_bonn_dataset" / "rgbd_bonn_balloon2"
    for i in range(145):
        _rgb(seq / "rgb" / f"{1548266469.0 + i / 30:.6f}.png", i)
        _depth_png(seq / "depth" / f"{1548266469.0 + i / 30:.6f}.png", 1.0 + i / 100, 5000.0)
    with pytest.raises(FileNotFoundError, match="crowd2"):
        read_bonn(tmp_path)  # the protocol's five sequences
    (sequences,) = read_bonn(tmp_path, sequences=["balloon2"])
    assert sequences.name == "balloon2" and len(sequences) == 110
    assert sequences.image(0)[0, 0, 0] == 30 and sequences.image(109)[0, 0, 0] == 139
    assert sequences.gt_depth(0)[0, 0] == pytest.approx(1.30, abs=1e-4)  # PNG / 5000
    assert "balloon2" in BONN_SEQUENCES
    with pytest.raises(FileNotFoundError, match=r"sequences \['crowd2'\] are missing"):
        read_bonn(tmp_path, sequences=["crowd2"])


def test_kitti_official_layout_first_110_and_gathered(tmp_path):
    drive = "2011_09_26_drive_0002_sync"
    gt_dir = tmp_path / "val" / drive / "proj_depth" / "groundtruth" / "image_02"
    for i in range(5, 117):  # 112 annotated frames (KITTI's first annotated frame is 5)
        _depth_png(gt_dir / f"{i:010d}.png", 10.0 + i / 256, 256.0)
    with pytest.raises(FileNotFoundError, match="raw images not found"):
        read_kitti(tmp_path)
    for i in range(0, 120):
        _rgb(tmp_path / "raw" / "2011_09_26" / drive / "image_02" / "data" / f"{i:010d}.png", i)
    (seq,) = read_kitti(tmp_path)
    assert seq.name == drive + "_02" and len(seq) == 110
    assert seq.rgb[0].name == "0000000005.png" and seq.rgb[-1].name == "0000000114.png"
    assert seq.gt_depth(0)[0, 0] == pytest.approx(10.0 + 5 / 256, abs=1e-6)  # PNG / 256

    gathered = tmp_path / "prepared" / "depth_selection" / "val_selection_cropped"
    for i in range(3):
        _depth_png(gathered / "groundtruth_depth_gathered" / "d_02" / f"{i:010d}.png", 20.0, 256.0)
        _rgb(gathered / "image_gathered" / "d_02" / f"{i:010d}.png", i)
    (prepared,) = load_dataset("kitti", tmp_path / "prepared")
    assert len(prepared) == 3 and prepared.gt_depth(1)[0, 0] == pytest.approx(20.0)


def _write_tum_sequence(folder, frames=10):
    folder.mkdir(parents=True)
    rgb_lines, gt_lines = ["# color images"], ["# ground truth trajectory"]
    for i in range(frames):
        t = 100.0 + i / 30
        _rgb(folder / "rgb" / f"{t:.6f}.png", i)
        rgb_lines.append(f"{t:.6f} rgb/{t:.6f}.png")
    for j in range(int(frames / 30 * 100) + 5):  # ground truth at 100 Hz, slightly offset
        t = 100.0 + j / 100 + 0.003
        gt_lines.append(f"{t:.4f} {0.01 * j} 0 0 0 0 {np.sin(0.001 * j)} {np.cos(0.001 * j)}")
    (folder / "rgb.txt").write_text("\n".join(rgb_lines) + "\n")
    (folder / "groundtruth.txt").write_text("\n".join(gt_lines) + "\n")


def test_tum_association_and_stride(tmp_path):
    _write_tum_sequence(tmp_path / "rgbd_dataset_freiburg3_walking_xyz")
    (seq,) = read_tum(tmp_path)
    assert len(seq) == 4  # 10 associated frames, every 3rd: 0, 3, 6, 9
    assert [p.name for p in seq.rgb] == [f"{100.0 + i / 30:.6f}.png" for i in (0, 3, 6, 9)]
    # each frame got the ground-truth pose closest in time (within 0.02 s) and its timestamp
    assert np.all(np.abs(seq.timestamps - (100.0 + np.array([0, 3, 6, 9]) / 30)) < 0.02)
    np.testing.assert_allclose(seq.cam_to_world[:, 0, 3], (seq.timestamps - 100.003) * 100 * 0.01, atol=1e-6)
    (tmp_path / "rgbd_dataset_freiburg3_walking_xyz" / "rgb_90").mkdir()
    _rgb(tmp_path / "rgbd_dataset_freiburg3_walking_xyz" / "rgb_90" / "a.png")
    _rgb(tmp_path / "rgbd_dataset_freiburg3_walking_xyz" / "rgb_90" / "b.png")
    (tmp_path / "rgbd_dataset_freiburg3_walking_xyz" / "groundtruth_90.txt").write_text(
        "1.0 0 0 0 0 0 0 1\n2.0 1 0 0 0 0 0 1\n"
    )
    (prepared,) = read_tum(tmp_path)
    assert len(prepared) == 2 and prepared.cam_to_world[1, 0, 3] == 1.0


def test_scannet_stride_3_numeric_order(tmp_path):
    scene = tmp_path / "scene0707_00"
    for i in range(12):
        _rgb(scene / "color" / f"{i}.jpg", i * 10)
        (scene / "pose").mkdir(parents=True, exist_ok=True)
        np.savetxt(scene / "pose" / f"{i}.txt", _pose(i))
    (scene / "intrinsic").mkdir()
    np.savetxt(scene / "intrinsic" / "intrinsic_color.txt", np.diag([1169.6, 1167.1, 1.0, 1.0]))
    (seq,) = read_scannet(tmp_path)
    assert [p.name for p in seq.rgb] == ["0.jpg", "3.jpg", "6.jpg", "9.jpg"]  # not 0, 10, 2, ...
    np.testing.assert_allclose(seq.cam_to_world[2], _pose(6), atol=1e-9)
    assert seq.intrinsics[0, 0] == pytest.approx(1169.6)
    assert len(read_scannet(tmp_path, frames=2)[0]) == 2


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("nyu", tmp_path)
    with pytest.raises(ValueError, match="rendered by omnistream_sim"):
        load_dataset("tabletop", None)
    with pytest.raises(ValueError, match="needs --root"):
        load_dataset("sintel", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("bonn", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither val"):
        load_dataset("kitti", tmp_path)
