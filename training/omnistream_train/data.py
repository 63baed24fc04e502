"""Training data: readers for the four kinds of input the objectives consume, and a resumable sampler.

Every reader returns float RGB in [0, 1] as (T, 3, H, W) (T = 1 for images); normalisation with the
ImageNet statistics happens in the training step, outside the model.

Geometry sequences on disk (the layout ``omnistream data`` / the tabletop generator writes)::

    ROOT/<sequence>/rgb/000000.png ...       RGB frames (any size; all frames of a sequence alike)
    ROOT/<sequence>/depth/000000.npy ...     float32 (H, W) z-depth in metres; 0 or non-finite = unknown
    ROOT/<sequence>/cameras.json             {"intrinsics": [3x3 per frame], "cam_to_world": [4x4 per frame]}
    ROOT/<sequence>/caption.txt              optional one-line description of the scene

Intrinsics use OpenCV's convention (pixel (u, v) has its centre at integer (u, v)), as everywhere in the
stack (``omnistream_perception.model.geometry``, ROS CameraInfo, the tabletop); cameras are camera-to-world in
OpenCV axes (x right, y down, z forward), metres.

The tabletop generator's own output (``omnistream_sim.tabletop.data``: ``index.json`` listing
``sequence_XXXXXX.npz``) is read as well, directly.

Caption JSONL: one ``{"image": "path relative to the file", "caption": "..."}`` per line. A directory of
tabletop demonstrations (``index.json`` listing ``episode_XXXXXX.npz``) gives templated captions of its
static-camera frames instead (``TabletopCaptions``).
Image folders: every .png/.jpg/.jpeg below ROOT. Videos: every .mp4/.mkv/.avi/.webm/.mov below ROOT (PyAV).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omnistream_perception.camera_model import rescale_intrinsics  # the one convention; re-exported

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".webm", ".mov")
TABLETOP_FAR = 3.0  # omnistream_sim.tabletop.cameras.CameraSpec.far: depth of pixels that hit nothing


def _to_float_chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0  # a writable copy


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size): shorter side to ``size``, centre crop (aspect kept)."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    images = F.interpolate(images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[..., top : top + size, left : left + size]


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _files(root: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{what} directory {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"no {what} files ({', '.join(suffixes)}) below {root}")
    return files


class ImageFolder:
    """Images as T = 1 streams: item -> {"rgb": (1, 3, S, S)}."""

    def __init__(self, root: str | Path, size: int) -> None:
        self.files = _files(Path(root), IMAGE_SUFFIXES, "image")
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return {"rgb": resize_square(_to_float_chw(_read_image(self.files[i]))[None], self.size)}


class CaptionJSONL:
    """item -> {"rgb": (1, 3, S, S), "caption": str}."""

    def __init__(self, path: str | Path, size: int) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"caption file {path} does not exist")
        self.rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "image" not in row or "caption" not in row:
                raise ValueError(f"{path}:{n}: each line needs 'image' and 'caption', got keys {sorted(row)}")
            self.rows.append((path.parent / row["image"], str(row["caption"])))
        if not self.rows:
            raise ValueError(f"{path} holds no captions")
        self.size = size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        image, caption = self.rows[i]
        return {"rgb": resize_square(_to_float_chw(_read_image(image))[None], self.size), "caption": caption}


class VideoFolder:
    """Clips of ``frames`` consecutive frames (every ``stride``-th decoded frame) from video files (PyAV)."""

    def __init__(self, root: str | Path, frames: int, size: int, stride: int = 1) -> None:
        import av

        self.frames, self.size, self.stride = frames, size, stride
        self.items: list[tuple[Path, int]] = []
        for path in _files(Path(root), VIDEO_SUFFIXES, "video"):
            with av.open(str(path)) as container:
                count = container.streams.video[0].frames or sum(1 for _ in container.decode(video=0))
            span = frames * stride
            self.items += [(path, start) for start in range(0, max(0, count - span) + 1, max(1, span // 2))]
        if not self.items:
            raise ValueError(f"no video below {root} has {frames * stride} frames")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        import av

        path, start = self.items[i]
        wanted = set(range(start, start + self.frames * self.stride, self.stride))
        out = []
        with av.open(str(path)) as container:
            for n, frame in enumerate(container.decode(video=0)):
                if n in wanted:
                    out.append(_to_float_chw(frame.to_ndarray(format="rgb24")))
                if len(out) == self.frames:
                    break
        return {"rgb": resize_square(torch.stack(out), self.size)}


def resize_geometry(rgb, depth, intrinsics, size: int):
    """Square resize of a clip with its ground truth: bilinear RGB, nearest depth, intrinsics rescaled.

    Intrinsics stay in OpenCV's convention (the centre of pixel u is at u), the convention of
    ``omnistream_perception.model.geometry``: a pixel edge at e maps to e * scale, so a centre c maps to
    (c + 0.5) * scale - 0.5.
    """
    h, w = rgb.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    rgb = F.interpolate(rgb, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    depth = F.interpolate(depth[:, None], size=(nh, nw), mode="nearest")[:, 0]
    k = rescale_intrinsics(intrinsics, nw / w, nh / h)
    k[:, 0, 2] -= left
    k[:, 1, 2] -= top
    crop = (slice(None), slice(top, top + size), slice(left, left + size))
    return rgb[:, :, top : top + size, left : left + size], depth[crop], k


class GeometryFolder:
    """Clips of ``frames`` frames from geometry sequences (layout in the module docstring, or the tabletop
    generator's ``sequence_*.npz``).

    item -> {"rgb" (T,3,S,S), "depth" (T,S,S), "intrinsics" (T,3,3), "cam_to_world" (T,4,4), "caption"}.
    """

    def __init__(self, root: str | Path, frames: int, size: int, max_cached: int = 256) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"geometry directory {root} does not exist")
        self.frames, self.size = frames, size
        self.items: list[tuple[Path, int]] = []
        self._cache: dict[Path, dict] = {}
        self.max_cached = max_cached
        index = root / "index.json"
        if index.is_file() and "sequences" in json.loads(index.read_text()):
            for entry in json.loads(index.read_text())["sequences"]:
                count = int(entry["frames"])
                path = root / entry["file"]
                self.items += [(path, s) for s in range(0, max(0, count - frames) + 1, max(1, frames // 2))]
        for seq in sorted(p for p in root.iterdir() if (p / "cameras.json").is_file()):
            count = len(list((seq / "rgb").glob("*.png")))
            self.items += [(seq, s) for s in range(0, max(0, count - frames) + 1, max(1, frames // 2))]
        if not self.items:
            raise ValueError(
                f"{root} holds no geometry sequence with {frames} frames "
                "(expected <sequence>/rgb/*.png, depth/*.npy, cameras.json)"
            )

    def __len__(self) -> int:
        return len(self.items)

    def _npz_item(self, path: Path, start: int) -> dict:
        if path not in self._cache:
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            with np.load(path) as f:
                self._cache[path] = {k: f[k] for k in ("rgb", "depth", "intrinsics", "cam_to_world")}
        seq = self._cache[path]
        span = slice(start, start + self.frames)
        rgb = torch.from_numpy(seq["rgb"][span]).permute(0, 3, 1, 2).float() / 255.0
        depth = torch.from_numpy(seq["depth"][span].astype(np.float32))
        # the tabletop renders "nothing hit" at its far plane: no depth there
        depth = torch.where((depth >= TABLETOP_FAR - 1e-3) | (depth <= 0), torch.zeros_like(depth), depth)
        k = torch.as_tensor(seq["intrinsics"], dtype=torch.float32)
        k = k.expand(rgb.shape[0], 3, 3).clone() if k.ndim == 2 else k[span]
        c2w = torch.as_tensor(seq["cam_to_world"][span], dtype=torch.float32)
        rgb, depth, k = resize_geometry(rgb, depth, k, self.size)
        return {"rgb": rgb, "depth": depth, "intrinsics": k, "cam_to_world": c2w, "caption": ""}

    def __getitem__(self, i: int) -> dict:
        seq, start = self.items[i]
        if seq.suffix == ".npz":
            return self._npz_item(seq, start)
        cams = json.loads((seq / "cameras.json").read_text())
        names = sorted(p.stem for p in (seq / "rgb").glob("*.png"))[start : start + self.frames]
        rgb = torch.stack([_to_float_chw(_read_image(seq / "rgb" / f"{n}.png")) for n in names])
        depth = torch.stack([torch.from_numpy(np.load(seq / "depth" / f"{n}.npy").astype(np.float32)) for n in names])
        depth = torch.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
        k = torch.tensor(cams["intrinsics"][start : start + self.frames], dtype=torch.float32)
        c2w = torch.tensor(cams["cam_to_world"][start : start + self.frames], dtype=torch.float32)
        rgb, depth, k = resize_geometry(rgb, depth, k, self.size)
        caption_file = seq / "caption.txt"
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        return {"rgb": rgb, "depth": depth, "intrinsics": k, "cam_to_world": c2w, "caption": caption}


class TabletopCaptions:
    """Static-camera frames of tabletop demonstrations with templated captions of the blocks' layout.

    item -> {"rgb": (1, 3, S, S), "caption": "from left to right: the green block, the red block and the blue
    block; the red block is in the air"}. ``per_episode`` frames are taken evenly from each episode.
    """

    COLOURS = ("red", "green", "blue")  # order of the 9 scene values (omnistream_sim.tabletop)

    def __init__(self, root: str | Path, size: int, per_episode: int = 4, block_size: float = 0.05) -> None:
        root = Path(root)
        index = root / "index.json"
        if not index.is_file() or "episodes" not in json.loads(index.read_text()):
            raise FileNotFoundError(f"{root} holds no tabletop demonstrations (index.json with 'episodes')")
        self.items: list[tuple[torch.Tensor, str]] = []
        for entry in json.loads(index.read_text())["episodes"]:
            with np.load(root / entry["file"]) as f:
                frames, scene = f["static"], f["scene"]
            for t in np.linspace(0, len(frames) - 1, per_episode).round().astype(int):
                image = resize_square(_to_float_chw(frames[t])[None], size)
                self.items.append((image, self.caption(scene[t], block_size)))
        if not self.items:
            raise ValueError(f"{root} lists no episodes")

    @classmethod
    def caption(cls, scene: np.ndarray, block_size: float = 0.05) -> str:
        centres = np.asarray(scene, dtype=np.float64).reshape(3, 3)
        order = np.argsort(centres[:, 1])  # the static camera looks along -x: image left is world -y
        names = [f"the {cls.COLOURS[i]} block" for i in order]
        text = f"from left to right: {names[0]}, {names[1]} and {names[2]}"
        raised = [cls.COLOURS[i] for i in range(3) if centres[i, 2] > block_size / 2 + 0.03]
        if raised:
            text += (
                "; "
                + " and ".join(f"the {c} block" for c in raised)
                + (" is" if len(raised) == 1 else " are")
                + " in the air"
            )
        return text

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, caption = self.items[i]
        return {"rgb": image, "caption": caption}


def write_geometry_sequence(directory: str | Path, rgb, depth, intrinsics, cam_to_world, caption: str = "") -> Path:
    """Writes one sequence in the layout above (rgb (T,H,W,3) uint8, depth (T,H,W), K (T,3,3) OpenCV, c2w (T,4,4))."""
    from PIL import Image

    directory = Path(directory)
    (directory / "rgb").mkdir(parents=True, exist_ok=True)
    (directory / "depth").mkdir(parents=True, exist_ok=True)
    for t in range(len(rgb)):
        Image.fromarray(np.asarray(rgb[t], dtype=np.uint8)).save(directory / "rgb" / f"{t:06d}.png")
        np.save(directory / "depth" / f"{t:06d}.npy", np.asarray(depth[t], dtype=np.float32))
    cams = {"intrinsics": np.asarray(intrinsics).tolist(), "cam_to_world": np.asarray(cam_to_world).tolist()}
    (directory / "cameras.json").write_text(json.dumps(cams))
    if caption:
        (directory / "caption.txt").write_text(caption + "\n", encoding="utf-8")
    return directory


# ------------------------------------------------------------------------------------------------------
# Resumable sampling
# ------------------------------------------------------------------------------------------------------
def sample_indices(length: int, step: int, rank: int, world: int, batch: int, seed: int, stream: int) -> list[int]:
    """Indices of one rank's batch at ``step``: epochs are seeded permutations, ranks take disjoint slices.

    A pure function of its arguments, so a resumed run sees exactly the data order of an uninterrupted one.
    """
    out = []
    cache: dict[int, torch.Tensor] = {}
    for i in range(batch):
        position = (step * world + rank) * batch + i
        epoch = position // length
        if epoch not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + stream * 7919 + epoch)
            cache[epoch] = torch.randperm(length, generator=gen)
        out.append(int(cache[epoch][position % length]))
    return out


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
