"""The evaluation datasets as users have them on disk, with the CUT3R protocol's frame selection.

CUT3R (Wang et al., CVPR 2025) evaluates streaming reconstruction on the sequences MonST3R (Zhang et al., ICLR
2025) prepared; both publish the preparation scripts (``datasets_preprocess/prepare_*.py``) and the scoring
scripts (``eval/video_depth/eval_depth.py``, ``eval/relpose``). Each reader accepts the dataset's own release
layout (and applies the selection those scripts apply) or the already prepared folders those scripts write.

* ``sintel`` (depth and pose): MPI-Sintel training set, ``final`` pass, the protocol's 14 sequences
  (``SINTEL_SEQUENCES``; every sequence with ``sequences=["all"]``, the scripts' ``--full_seq``), every frame;
  depth ``training/depth/<seq>/*.dpt``, cameras ``training/camdata_left/<seq>/*.cam``. Depth cap 70 m, and
  aligned predictions are clipped at 70 m.
* ``bonn`` (depth): the 5 sequences of ``BONN_SEQUENCES``, frames [30, 140) of the sorted ``rgb/`` and
  ``depth/`` PNGs (110 frames; ``rgb_110``/``depth_110`` when prepared). Depth cap 70 m.
* ``kitti`` (depth): every drive of the depth benchmark's validation split, its first 110 sorted ground-truth
  maps (``val/<drive>/proj_depth/groundtruth/image_02``) with the raw ``image_02`` frames (or the prepared
  ``groundtruth_depth_gathered/`` and ``image_gathered/``). No depth cap (the scoring script passes none).
* ``tum`` (pose): the TUM RGB-D dynamic sequences (``TUM_DYNAMIC_SEQUENCES``; every sequence folder under the
  root is read): rgb.txt associated with groundtruth.txt (within 0.02 s), every 3rd pair, the first 90
  (``rgb_90`` + ``groundtruth_90.txt`` when prepared).
* ``scannet`` (pose): ScanNet v2 scenes as the SensReader exports them (``color/``, ``pose/``): frames 0, 3,
  ..., 267 (``color_90`` + ``pose_90.txt`` when prepared); frames whose pose is not finite are not scored.

Depth is scored with per-sequence median scaling (``per-sequence-scale``) for the tables the paper compares
with (CUT3R's Table 2 "per-sequence scale" rows); poses with Sim(3) Umeyama alignment, RPE over consecutive
frames. Depth units: Sintel ``.dpt`` as stored, Bonn and TUM PNG / 5000, KITTI PNG / 256, ScanNet PNG / 1000.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .formats import (
    associate_timestamps,
    poses_from_tum_rows,
    read_depth_png,
    read_sintel_camera,
    read_sintel_depth,
)

SINTEL_SEQUENCES = (
    "alley_2", "ambush_4", "ambush_5", "ambush_6", "cave_2", "cave_4", "market_2",
    "market_5", "market_6", "shaman_3", "sleeping_1", "sleeping_2", "temple_2", "temple_3",
)  # fmt: skip
BONN_SEQUENCES = ("balloon2", "crowd2", "crowd3", "person_tracking2", "synchronous")
TUM_DYNAMIC_SEQUENCES = tuple(
    f"rgbd_dataset_freiburg3_{who}_{motion}"
    for who in ("sitting", "walking")
    for motion in ("static", "xyz", "halfsphere", "rpy")
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Protocol:
    name: str
    tasks: tuple[str, ...]
    max_depth: float | None = None  # ground truth at or beyond is not scored
    clip_max: float | None = None  # aligned predictions are clipped to this
    depth_align: str = "per-sequence-scale"
    pose_align: str = "sim3"
    selection: str = ""
    source: str = ""


_CUT3R = "CUT3R eval/video_depth/eval_depth.py and eval/relpose; MonST3R datasets_preprocess/prepare_*.py"
PROTOCOLS: dict[str, Protocol] = {
    "sintel": Protocol("sintel", ("depth", "pose"), 70.0, 70.0,
                       selection="the 14 protocol sequences of the training set (final pass), every frame",
                       source=_CUT3R),
    "bonn": Protocol("bonn", ("depth",), 70.0, None,
                     selection="5 sequences, frames 30-139", source=_CUT3R),
    "kitti": Protocol("kitti", ("depth",), None, None,
                      selection="validation drives, first 110 annotated frames each", source=_CUT3R),
    "tum": Protocol("tum", ("pose",), selection="dynamic sequences, every 3rd associated frame, first 90",
                    source=_CUT3R),
    "scannet": Protocol("scannet", ("pose",), selection="frames 0-267 at stride 3 (90)", source=_CUT3R),
    "tabletop": Protocol("tabletop", ("depth", "pose"),
                         selection="held-out simulated tabletop sequences (seeds from 50000, as `make demo`)",
                         source="omnistream_sim.tabletop.data.generate_geometry_sequences"),
}  # fmt: skip


@dataclass
class EvalSequence:
    """One sequence: images (paths or an (F, H, W, 3) uint8 array) and whatever ground truth the dataset has."""

    name: str
    rgb: list[Path] | np.ndarray
    timestamps: np.ndarray
    depth: list[Path] | np.ndarray | None = None
    depth_reader: Callable[[Path], np.ndarray] | None = None
    cam_to_world: np.ndarray | None = None  # (F, 4, 4)
    intrinsics: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rgb)

    def image(self, i: int) -> np.ndarray:
        if isinstance(self.rgb, np.ndarray):
            return self.rgb[i]
        from PIL import Image

        with Image.open(self.rgb[i]) as im:
            return np.asarray(im.convert("RGB"))

    def gt_depth(self, i: int) -> np.ndarray:
        if self.depth is None:
            raise ValueError(f"sequence {self.name} has no ground-truth depth")
        if isinstance(self.depth, np.ndarray):
            return self.depth[i]
        assert self.depth_reader is not None
        return self.depth_reader(self.depth[i])


# ------------------------------------------------------------------------------------------------------
def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if directory.is_dir() else []


def _numeric_sort(paths: list[Path]) -> list[Path]:
    def key(p: Path):
        digits = re.findall(r"\d+", p.stem)
        return (int(digits[-1]) if digits else -1, p.name)

    return sorted(paths, key=key)


def _first_dir(root: Path, candidates: list[str], what: str) -> Path:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    tried = ", ".join(str(root / c) for c in candidates)
    raise FileNotFoundError(f"{what}: none of {tried} exists; point --root at the dataset's top folder")


def _pick(found: dict[str, object], wanted: tuple[str, ...] | list[str] | None, what: str) -> list[str]:
    if not found:
        raise FileNotFoundError(f"{what}: no sequences found")
    if wanted is None or list(wanted) == ["all"]:
        return sorted(found)
    missing = [w for w in wanted if w not in found]
    if missing:
        raise FileNotFoundError(
            f"{what}: sequences {missing} are missing (found {sorted(found)}); the protocol's figures need all of "
            f"them: complete the download, or pass --sequences NAME,... (or all) to score what is there"
        )
    return list(wanted)


def read_sintel(root: str | Path, task: str = "both", sequences: list[str] | None = None) -> list[EvalSequence]:
    """MPI-Sintel training data: ``training/final/<seq>/frame_XXXX.png``, ``training/depth/<seq>/*.dpt``,
    ``training/camdata_left/<seq>/*.cam`` (the depth and camera files are a separate download). ``sequences``:
    names, ``["all"]`` for every sequence, or None for the protocol's 14 (depth and pose alike)."""
    if task not in ("depth", "pose", "both"):
        raise ValueError(f"task must be depth, pose or both, got {task!r}")
    root = Path(root)
    training = root / "training" if (root / "training").is_dir() else root
    final = _first_dir(training, ["final"], "Sintel")
    found = {p.name: p for p in final.iterdir() if p.is_dir()}
    if sequences is None:
        sequences = list(SINTEL_SEQUENCES)
    out = []
    for name in _pick(found, sequences, f"Sintel ({final})"):
        rgb = _images(final / name)
        seq = EvalSequence(name, rgb, timestamps=np.arange(len(rgb), dtype=np.float64))
        if task in ("depth", "both"):
            depth = sorted((training / "depth" / name).glob("*.dpt"))
            if len(depth) != len(rgb):
                raise FileNotFoundError(
                    f"Sintel {name}: {len(rgb)} images but {len(depth)} depth files in {training / 'depth' / name}"
                )
            seq.depth, seq.depth_reader = depth, read_sintel_depth
        if task in ("pose", "both"):
            cams = sorted((training / "camdata_left" / name).glob("*.cam"))
            if len(cams) != len(rgb):
                raise FileNotFoundError(
                    f"Sintel {name}: {len(rgb)} images but {len(cams)} .cam files in {training / 'camdata_left' / name}"
                )
            read = [read_sintel_camera(c) for c in cams]
            seq.intrinsics = read[0][0]
            seq.cam_to_world = np.stack([c2w for _, c2w in read])
        out.append(seq)
    return out


def read_bonn(root: str | Path, sequences: list[str] | None = None) -> list[EvalSequence]:
    """Bonn RGB-D Dynamic: ``[rgbd_bonn_dataset/]rgbd_bonn_<seq>/{rgb,depth}/*.png`` (depth PNG / 5000)."""
    root = Path(root)
    base = root / "rgbd_bonn_dataset" if (root / "rgbd_bonn_dataset").is_dir() else root
    found = {p.name.removeprefix("rgbd_bonn_"): p for p in base.glob("rgbd_bonn_*") if p.is_dir()}
    if sequences is None:
        sequences = list(BONN_SEQUENCES)
    out = []
    for name in _pick(found, sequences, f"Bonn ({base})"):
        folder = found[name]
        if (folder / "rgb_110").is_dir():  # prepared by the protocol's script: already frames 30-139
            rgb, depth = _images(folder / "rgb_110"), sorted((folder / "depth_110").glob("*.png"))
        else:
            rgb, depth = _images(folder / "rgb")[30:140], sorted((folder / "depth").glob("*.png"))[30:140]
        if not rgb or len(rgb) != len(depth):
            raise FileNotFoundError(f"Bonn {name}: {len(rgb)} images and {len(depth)} depth maps selected in {folder}")
        out.append(
            EvalSequence(
                name,
                rgb,
                np.arange(len(rgb), dtype=np.float64),
                depth=depth,
                depth_reader=lambda p: read_depth_png(p, 5000.0),
            )  # fmt: skip
        )
    return out


def read_kitti(root: str | Path, sequences: list[str] | None = None, frames: int = 110) -> list[EvalSequence]:
    """KITTI depth: the official ``val/<drive>/proj_depth/groundtruth/image_02/*.png`` with raw images at
    ``raw/<date>/<drive>/image_02/data/`` (or ``<date>/<drive>/...`` under the root), or the prepared
    ``[depth_selection/val_selection_cropped/]{groundtruth_depth,image}_gathered/<drive>_02/``."""
    root = Path(root)
    gathered = None
    for cand in (root, root / "depth_selection" / "val_selection_cropped", root / "val_selection_cropped"):
        if (cand / "groundtruth_depth_gathered").is_dir():
            gathered = cand
            break
    found: dict[str, tuple[list[Path], list[Path]]] = {}
    if gathered is not None:
        for d in sorted((gathered / "groundtruth_depth_gathered").iterdir()):
            if d.is_dir():
                found[d.name] = (_images(gathered / "image_gathered" / d.name), sorted(d.glob("*.png")))
    elif (root / "val").is_dir():
        for d in sorted((root / "val").iterdir()):
            gt_dir = d / "proj_depth" / "groundtruth" / "image_02"
            if not gt_dir.is_dir():
                continue
            depth = sorted(gt_dir.glob("*.png"))[:frames]
            date = d.name[:10]
            raw = next((r for r in (root / "raw" / date / d.name, root / date / d.name) if r.is_dir()), None)
            if raw is None:
                raise FileNotFoundError(
                    f"KITTI {d.name}: raw images not found at {root / 'raw' / date / d.name} "
                    f"(download the raw drive and place it there)"
                )
            found[d.name + "_02"] = ([raw / "image_02" / "data" / p.name for p in depth], depth)
    else:
        raise FileNotFoundError(
            f"KITTI: {root} has neither val/<drive>/proj_depth/ (the depth benchmark's annotated data) nor "
            f"groundtruth_depth_gathered/ (the prepared selection)"
        )
    out = []
    for name in _pick(found, sequences, f"KITTI ({root})"):
        rgb, depth = found[name]
        rgb, depth = rgb[:frames], depth[:frames]
        missing = [p for p in rgb if not p.is_file()]
        if missing or len(rgb) != len(depth) or not depth:
            raise FileNotFoundError(
                f"KITTI {name}: {len(depth)} depth maps but {len(rgb) - len(missing)} matching images"
                + (f" (first missing: {missing[0]})" if missing else "")
            )
        out.append(EvalSequence(name, rgb, np.arange(len(rgb), dtype=np.float64), depth=depth,
                                depth_reader=lambda p: read_depth_png(p, 256.0)))  # fmt: skip
    return out


def _read_stamped_list(path: Path) -> tuple[np.ndarray, list[list[str]]]:
    stamps, rows = [], []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.replace(",", " ").split()
        stamps.append(float(fields[0]))
        rows.append(fields[1:])
    return np.asarray(stamps), rows


def read_tum(root: str | Path, sequences: list[str] | None = None, stride: int = 3, frames: int = 90):
    """TUM RGB-D: ``<seq>/rgb.txt``, ``<seq>/groundtruth.txt`` (``timestamp tx ty tz qx qy qz qw``), ``rgb/``;
    or the prepared ``<seq>/rgb_90/`` + ``<seq>/groundtruth_90.txt``."""
    root = Path(root)
    found = {p.name: p for p in root.iterdir() if p.is_dir() and ((p / "rgb.txt").is_file() or (p / "rgb_90").is_dir())}
    out = []
    for name in _pick(found, sequences, f"TUM RGB-D ({root})"):
        folder = found[name]
        if (folder / "rgb_90").is_dir():
            rgb = _images(folder / "rgb_90")
            stamps, rows = _read_stamped_list(folder / "groundtruth_90.txt")
            poses = poses_from_tum_rows(np.asarray(rows, dtype=np.float64))
        else:
            rgb_stamps, rgb_rows = _read_stamped_list(folder / "rgb.txt")
            gt_stamps, gt_rows = _read_stamped_list(folder / "groundtruth.txt")
            pairs = associate_timestamps(rgb_stamps, gt_stamps, 0.02)[::stride][:frames]
            rgb = [folder / rgb_rows[i][0] for i in pairs[:, 0]]
            stamps = gt_stamps[pairs[:, 1]]
            poses = poses_from_tum_rows(np.asarray([gt_rows[j] for j in pairs[:, 1]], dtype=np.float64))
        if not rgb or len(rgb) != len(poses):
            raise FileNotFoundError(f"TUM {name}: {len(rgb)} images but {len(poses)} poses selected in {folder}")
        k = np.array([[525.0, 0, 319.5], [0, 525.0, 239.5], [0, 0, 1]])  # the benchmark's default intrinsics
        out.append(EvalSequence(name, rgb, stamps, cam_to_world=poses, intrinsics=k))
    return out


def read_scannet(root: str | Path, sequences: list[str] | None = None, stride: int = 3, frames: int = 90):
    """ScanNet v2 (SensReader export): ``<scene>/color/<i>.jpg``, ``<scene>/pose/<i>.txt`` (4x4 camera-to-world),
    ``<scene>/intrinsic/intrinsic_color.txt``; or the prepared ``color_90/`` + ``pose_90.txt``."""
    root = Path(root)
    found = {p.name: p for p in root.iterdir() if p.is_dir() and ((p / "color").is_dir() or (p / "color_90").is_dir())}
    out = []
    for name in _pick(found, sequences, f"ScanNet ({root})"):
        folder = found[name]
        if (folder / "color_90").is_dir():
            rgb = _images(folder / "color_90")
            poses = np.loadtxt(folder / "pose_90.txt", ndmin=2).reshape(-1, 4, 4)
        else:
            rgb = _numeric_sort(_images(folder / "color"))[: frames * stride : stride]
            pose_files = _numeric_sort(sorted((folder / "pose").glob("*.txt")))[: frames * stride : stride]
            poses = np.stack([np.loadtxt(p).reshape(4, 4) for p in pose_files]) if pose_files else np.zeros((0, 4, 4))
        if not rgb or len(rgb) != len(poses):
            raise FileNotFoundError(f"ScanNet {name}: {len(rgb)} images but {len(poses)} poses selected in {folder}")
        k_file = folder / "intrinsic" / "intrinsic_color.txt"
        k = np.loadtxt(k_file)[:3, :3] if k_file.is_file() else None
        out.append(EvalSequence(name, rgb, np.arange(len(rgb), dtype=np.float64), cam_to_world=poses, intrinsics=k))
    return out


# The demo's training sequences use seeds [seed, seed + n): held-out ones start far above.
TABLETOP_HELDOUT_SEED = 50_000


def tabletop_eval_sequence(seq, index: int) -> EvalSequence:
    """A :class:`omnistream_sim.tabletop.data.GeometrySequence` as an evaluation sequence."""
    return EvalSequence(
        f"sequence_{index:06d}", np.asarray(seq.rgb), np.arange(len(seq.rgb), dtype=np.float64),
        depth=np.asarray(seq.depth), cam_to_world=np.asarray(seq.cam_to_world),
        intrinsics=getattr(seq, "intrinsics", None),
        meta={"seed": getattr(seq, "seed", None)},
    )  # fmt: skip


def load_dataset(name: str, root: str | Path | None, task: str = "both", **options) -> list[EvalSequence]:
    """The protocol's sequences of dataset ``name`` under ``root`` (``tabletop``: generated, no root)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(PROTOCOLS)}")
    if name == "tabletop":
        raise ValueError(
            "tabletop sequences are rendered by omnistream_sim: generate them (generate_geometry_sequences with "
            "seed + TABLETOP_HELDOUT_SEED) and pass them through tabletop_eval_sequence"
        )
    if root is None:
        raise ValueError(f"dataset {name} needs --root (the folder holding it)")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    if name == "sintel":
        return read_sintel(root, task, **options)
    return {"bonn": read_bonn, "kitti": read_kitti, "tum": read_tum, "scannet": read_scannet}[name](root, **options)
