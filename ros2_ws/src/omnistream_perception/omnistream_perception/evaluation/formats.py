"""File formats of the evaluation data: TUM trajectories, MPI-Sintel ``.dpt``/``.cam``, 16-bit depth PNGs,
and ``<sequence>/<frame>.npy`` depth directories. Readers raise ``ValueError``/``FileNotFoundError`` naming the
file and what is wrong with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# MPI-Sintel SDK (sintel_io.py): a float32 tag opens every .dpt/.cam file; a big-endian reading gives garbage.
SINTEL_TAG = 202021.25


# ------------------------------------------------------------------------------------------------------
# TUM trajectories: "timestamp tx ty tz qx qy qz qw" per line, '#' comments (TUM RGB-D benchmark format)
# ------------------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    timestamps: np.ndarray  # (N,) seconds (or frame numbers)
    poses: np.ndarray  # (N, 4, 4) camera-to-world

    def __len__(self) -> int:
        return len(self.timestamps)

    def subset(self, index: np.ndarray) -> Trajectory:
        return Trajectory(self.timestamps[index], self.poses[index])


def poses_from_tum_rows(rows: np.ndarray) -> np.ndarray:
    """(N, 7) ``tx ty tz qx qy qz qw`` -> (N, 4, 4)."""
    import torch

    from ..model.geometry import quaternion_to_matrix

    rows = np.asarray(rows, np.float64)
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    poses[:, :3, 3] = rows[:, :3]
    poses[:, :3, :3] = quaternion_to_matrix(torch.from_numpy(rows[:, 3:7])).numpy()
    return poses


def tum_rows_from_poses(poses: np.ndarray) -> np.ndarray:
    """(N, 4, 4) -> (N, 7) ``tx ty tz qx qy qz qw``."""
    import torch

    from ..model.geometry import matrix_to_quaternion

    poses = np.asarray(poses, np.float64)
    quat = matrix_to_quaternion(torch.from_numpy(np.ascontiguousarray(poses[:, :3, :3]))).numpy()
    return np.concatenate([poses[:, :3, 3], quat], axis=1)


def read_tum_trajectory(path: str | Path) -> Trajectory:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file {path} does not exist")
    stamps, rows = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.replace(",", " ").split()
        if len(fields) != 8:
            raise ValueError(
                f"{path}:{number}: expected 8 values 'timestamp tx ty tz qx qy qz qw' (TUM format), got {len(fields)}"
            )
        try:
            values = [float(v) for v in fields]
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not a number in {line!r}") from exc
        quat = np.asarray(values[4:8])
        if not np.all(np.isfinite(values)) or np.linalg.norm(quat) < 1e-9:
            raise ValueError(f"{path}:{number}: non-finite value or zero quaternion in {line!r}")
        stamps.append(values[0])
        rows.append(values[1:])
    if not rows:
        raise ValueError(f"{path} holds no poses (TUM format: 'timestamp tx ty tz qx qy qz qw' per line)")
    stamps = np.asarray(stamps)
    order = np.argsort(stamps, kind="stable")
    return Trajectory(stamps[order], poses_from_tum_rows(np.asarray(rows))[order])


def write_tum_trajectory(path: str | Path, timestamps, poses: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = tum_rows_from_poses(poses)
    lines = ["# timestamp tx ty tz qx qy qz qw"]
    lines += [f"{float(t):.6f} " + " ".join(f"{v:.9f}" for v in row) for t, row in zip(timestamps, rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def associate_timestamps(first: np.ndarray, second: np.ndarray, max_difference: float = 0.02) -> np.ndarray:
    """(K, 2) index pairs matching two timestamp lists one-to-one, closest pairs first, as the TUM benchmark's
    ``associate.py`` does (offset 0); pairs further apart than ``max_difference`` are never matched."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    order = np.argsort(second)
    sorted_second = second[order]
    candidates = []
    for i, t in enumerate(first):
        lo = np.searchsorted(sorted_second, t - max_difference, side="left")
        hi = np.searchsorted(sorted_second, t + max_difference, side="right")
        for k in range(lo, hi):
            diff = abs(sorted_second[k] - t)
            if diff <= max_difference:
                candidates.append((diff, i, int(order[k])))
    candidates.sort()
    used_a, used_b, pairs = set(), set(), []
    for _, i, j in candidates:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    pairs.sort()
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


# ------------------------------------------------------------------------------------------------------
# MPI-Sintel (sintel_io.py of the Sintel depth/camera SDK, little-endian)
# .dpt: tag float32, width int32, height int32, then H*W float32 depth (scene units, scored as metres)
# .cam: tag float32, M 3x3 float64 (intrinsics), N 3x4 float64 ([R|t] world-to-camera)
# ------------------------------------------------------------------------------------------------------
def _check_tag(path: Path, data: bytes) -> None:
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an MPI-Sintel file")
    tag = np.frombuffer(data[:4], "<f4")[0]
    if tag != np.float32(SINTEL_TAG):
        raise ValueError(f"{path}: wrong MPI-Sintel tag {tag} (expected {SINTEL_TAG}); not a .dpt/.cam file?")


def read_sintel_depth(path: str | Path) -> np.ndarray:
    path = Path(path)
    data = path.read_bytes()
    _check_tag(path, data)
    width, height = (int(v) for v in np.frombuffer(data[4:12], "<i4"))
    if width <= 0 or height <= 0 or len(data) != 12 + 4 * width * height:
        raise ValueError(f"{path}: header says {width}x{height} but the file holds {len(data) - 12} bytes of depth")
    return np.frombuffer(data[12:], "<f4").reshape(height, width).astype(np.float32)


def write_sintel_depth(path: str | Path, depth: np.ndarray) -> None:
    depth = np.asarray(depth, "<f4")
    header = np.array([SINTEL_TAG], "<f4").tobytes() + np.array(depth.shape[::-1], "<i4").tobytes()
    Path(path).write_bytes(header + depth.tobytes())


def read_sintel_camera(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """-> (intrinsics 3x3, camera-to-world 4x4) from a ``.cam`` file (which stores world-to-camera [R|t])."""
    path = Path(path)
    data = path.read_bytes()
    _check_tag(path, data)
    if len(data) != 4 + 8 * 21:
        raise ValueError(f"{path}: a .cam file holds 4 + 21 * 8 bytes, this one {len(data)}")
    values = np.frombuffer(data[4:], "<f8")
    k = values[:9].reshape(3, 3).copy()
    world_to_cam = np.eye(4)
    world_to_cam[:3] = values[9:].reshape(3, 4)
    return k, np.linalg.inv(world_to_cam)


def write_sintel_camera(path: str | Path, intrinsics: np.ndarray, cam_to_world: np.ndarray) -> None:
    world_to_cam = np.linalg.inv(np.asarray(cam_to_world, np.float64))[:3]
    payload = np.concatenate([np.asarray(intrinsics, "<f8").ravel(), world_to_cam.astype("<f8").ravel()])
    Path(path).write_bytes(np.array([SINTEL_TAG], "<f4").tobytes() + payload.tobytes())


# ------------------------------------------------------------------------------------------------------
# 16-bit depth PNGs: TUM RGB-D and Bonn store depth * 5000, KITTI depth * 256, ScanNet millimetres; 0 = none
# ------------------------------------------------------------------------------------------------------
def read_depth_png(path: str | Path, units_per_metre: float) -> np.ndarray:
    from PIL import Image

    path = Path(path)
    with Image.open(path) as im:
        raw = np.asarray(im)
    if raw.dtype.kind not in "iu" or raw.dtype.itemsize < 2:
        raise ValueError(f"{path}: expected a 16-bit depth PNG, got {raw.dtype} (an 8-bit image is not depth)")
    depth = raw.astype(np.float32) / units_per_metre
    depth[raw == 0] = 0.0
    return depth


def write_depth_png(path: str | Path, depth: np.ndarray, units_per_metre: float) -> None:
    from PIL import Image

    raw = np.clip(np.round(np.asarray(depth, np.float64) * units_per_metre), 0, 65535).astype(np.uint16)
    Image.fromarray(raw).save(path)


# ------------------------------------------------------------------------------------------------------
# <sequence>/<frame>.npy depth directories (what `omnistream eval depth` reads and `eval stream` writes)
# ------------------------------------------------------------------------------------------------------
def list_depth_dir(root: str | Path, what: str) -> dict[str, list[Path]]:
    """{sequence: sorted frame files} of ``root/<sequence>/<frame>.npy``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} directory {root} does not exist")
    out = {}
    for seq in sorted(p for p in root.iterdir() if p.is_dir()):
        frames = sorted(seq.glob("*.npy"))
        if frames:
            out[seq.name] = frames
    if not out:
        raise FileNotFoundError(f"no <sequence>/<frame>.npy depth maps below {what} directory {root}")
    return out


def write_depth_dir(root: str | Path, sequence: str, depths: np.ndarray, names: list[str] | None = None) -> Path:
    directory = Path(root) / sequence
    directory.mkdir(parents=True, exist_ok=True)
    for i, depth in enumerate(depths):
        np.save(directory / f"{names[i] if names else f'{i:06d}'}.npy", np.asarray(depth, np.float32))
    return directory
