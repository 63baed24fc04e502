"""Rollout videos: a list of RGB frames -> mp4 (H.264 through PyAV) or GIF (Pillow) by the file suffix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: int = 15) -> Path:
    """Write (H, W, 3) uint8 frames; ``.mp4`` uses PyAV (libx264, else mpeg4), ``.gif`` uses Pillow."""
    if len(frames) == 0:
        raise ValueError("no frames to write")
    first = np.asarray(frames[0])
    if first.ndim != 3 or first.shape[-1] != 3 or first.dtype != np.uint8:
        raise ValueError(f"frames must be (H, W, 3) uint8, got {first.shape} {first.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(np.asarray(f)) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    if path.suffix != ".mp4":
        raise ValueError(f"video path must end in .mp4 or .gif, got {path.name}")
    import av

    h, w = first.shape[:2]
    # H.264 with yuv420p needs even sizes; pad by one pixel rather than resample.
    pad_h, pad_w = h % 2, w % 2
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w + pad_w, h + pad_h, "yuv420p"
        for frame in frames:
            img = np.pad(np.asarray(frame), ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
