"""sensor_msgs Image / CompressedImage -> numpy, without cv_bridge and without ROS (messages are duck-typed:
rclpy's and rosbags' alike, so a bag converter reads images with the same code as the node).

cv_bridge is not available from any registry we reach (see ``../shared/specs/ros2-from-pypi.md``), so the
conversions are ours. Two rules keep them fast:

* read with ``np.frombuffer(msg.data, ...)`` (a view, no copy of the pixel data);
* write ``bytes`` into ``msg.data``: assigning a numpy array goes element by element (about 100x slower).

Every reader validates the message and raises ``ValueError`` with a message that says what is wrong
(unknown encoding, data length not matching step x height, zero-size image, corrupt compressed data, NaN
in float images), so a node can log it, count it and drop the frame.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EncodingInfo:
    dtype: np.dtype
    channels: int


# The encodings we read and write (REP 104 / sensor_msgs/image_encodings names).
ENCODINGS: dict[str, EncodingInfo] = {
    "rgb8": EncodingInfo(np.dtype(np.uint8), 3),
    "bgr8": EncodingInfo(np.dtype(np.uint8), 3),
    "rgba8": EncodingInfo(np.dtype(np.uint8), 4),
    "bgra8": EncodingInfo(np.dtype(np.uint8), 4),
    "mono8": EncodingInfo(np.dtype(np.uint8), 1),
    "8UC1": EncodingInfo(np.dtype(np.uint8), 1),
    "8UC3": EncodingInfo(np.dtype(np.uint8), 3),
    "mono16": EncodingInfo(np.dtype(np.uint16), 1),
    "16UC1": EncodingInfo(np.dtype(np.uint16), 1),
    "32FC1": EncodingInfo(np.dtype(np.float32), 1),
}
COLOUR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1", "8UC3", "32FC1")
DEPTH_ENCODINGS = ("32FC1", "16UC1")  # 16UC1 depth is millimetres by convention
COMPRESSED_FORMATS = ("jpeg", "png")


def _check_encoding(encoding: str) -> EncodingInfo:
    info = ENCODINGS.get(encoding)
    if info is None:
        raise ValueError(f"unsupported image encoding {encoding!r}; supported: {', '.join(ENCODINGS)}")
    return info


def image_to_numpy(msg: Any) -> np.ndarray:
    """The pixels of ``msg`` as an array (H, W) or (H, W, C) in the message's own encoding and dtype.

    Row padding (step > width * pixel size) is removed; big-endian multi-byte data is byte-swapped.
    The result may be a read-only view of ``msg.data``; copy it if you need to write to it.
    """
    info = _check_encoding(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise ValueError(f"zero-size image ({width}x{height})")
    row_bytes = width * info.channels * info.dtype.itemsize
    if step < row_bytes:
        raise ValueError(f"step {step} is smaller than width x pixel size = {row_bytes} for {msg.encoding}")
    data = msg.data
    if len(data) != step * height:
        raise ValueError(f"data length {len(data)} does not match step x height = {step} x {height} = {step * height}")
    raw = np.frombuffer(data, dtype=np.uint8).reshape(height, step)
    if step != row_bytes:
        raw = raw[:, :row_bytes]
    if not raw.flags.c_contiguous:
        raw = np.ascontiguousarray(raw)
    dtype = info.dtype
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    array = raw.view(dtype).reshape(height, width, info.channels)
    if dtype.itemsize > 1 and not dtype.isnative:
        array = array.astype(info.dtype)  # to native byte order
    if info.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{msg.encoding} image contains NaN or infinite values")
    return array[..., 0] if info.channels == 1 else array


def check_pixel_count(width: int, height: int, max_pixels: int | None) -> None:
    """ValueError when a ``width`` x ``height`` image has more than ``max_pixels`` pixels (None: no limit)."""
    if max_pixels is not None and int(width) * int(height) > max_pixels:
        raise ValueError(
            f"image of {width}x{height} = {int(width) * int(height) / 1e6:.1f} MP refused: more than the "
            f"{max_pixels / 1e6:g} MP limit (max_input_pixels)"
        )


def image_to_rgb(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """A colour ``Image`` (rgb8, bgr8, rgba8, bgra8, mono8, or 32FC1 intensity in [0, 1]) as (H, W, 3) uint8 RGB.

    An image over ``max_pixels`` (width x height from the header) is refused before any pixel is touched."""
    check_pixel_count(msg.width, msg.height, max_pixels)
    if msg.encoding not in COLOUR_ENCODINGS:
        if msg.encoding in ENCODINGS:
            raise ValueError(f"expected a colour image ({', '.join(COLOUR_ENCODINGS)}), got {msg.encoding!r}")
        _check_encoding(msg.encoding)
    return to_rgb(image_to_numpy(msg), msg.encoding)


def to_rgb(array: np.ndarray, encoding: str) -> np.ndarray:
    """Convert an array in a colour ``encoding`` (see COLOUR_ENCODINGS) to contiguous (H, W, 3) uint8 RGB."""
    if encoding in ("rgb8", "8UC3"):
        # a writable copy: the input is a read-only view of msg.data (torch warns on those, callers may write)
        return np.array(array, order="C", copy=True)
    if encoding == "bgr8":
        return np.ascontiguousarray(array[..., ::-1])
    if encoding == "rgba8":
        return np.ascontiguousarray(array[..., :3])
    if encoding == "bgra8":
        return np.ascontiguousarray(array[..., 2::-1])
    if encoding in ("mono8", "8UC1"):
        return np.repeat(array[..., None], 3, axis=2)
    if encoding == "32FC1":  # float intensity in [0, 1] (NaN was rejected by image_to_numpy)
        grey = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    raise ValueError(f"cannot convert {encoding!r} to RGB")


def image_to_depth(msg: Any) -> np.ndarray:
    """A depth ``Image`` as (H, W) float32 metres: 32FC1 in metres, 16UC1 in millimetres (0 = no reading)."""
    if msg.encoding not in DEPTH_ENCODINGS:
        _check_encoding(msg.encoding)
        raise ValueError(f"expected a depth image ({', '.join(DEPTH_ENCODINGS)}), got {msg.encoding!r}")
    array = image_to_numpy(msg)
    if msg.encoding == "16UC1":
        return array.astype(np.float32) / 1000.0
    return np.asarray(array, dtype=np.float32)


def compressed_to_rgb(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """A jpeg/png ``CompressedImage`` as (H, W, 3) uint8 RGB (decoded with Pillow).

    The size is read from the header first: an image over ``max_pixels`` is refused without being decoded (a
    small PNG can declare 9000x9000 pixels)."""
    from PIL import Image as PILImage

    fmt = (msg.format or "").lower()
    # image_transport writes e.g. "rgb8; jpeg compressed bgr8"; plain "jpeg"/"png" is common too.
    if not any(name in fmt for name in ("jpeg", "jpg", "png")) and fmt:
        raise ValueError(f"unsupported compressed format {msg.format!r}; supported: jpeg, png")
    if len(msg.data) == 0:
        raise ValueError("zero-size compressed image (empty data)")
    try:
        img = PILImage.open(io.BytesIO(bytes(msg.data)))  # parses the header only
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ...) on corrupt data
        raise ValueError(f"corrupt compressed image ({msg.format or 'unknown format'}): {exc}") from exc
    with img:
        check_pixel_count(img.size[0], img.size[1], max_pixels)
        try:
            img.load()
            rgb = np.asarray(img.convert("RGB"))
        except Exception as exc:
            raise ValueError(f"corrupt compressed image ({msg.format or 'unknown format'}): {exc}") from exc
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError("zero-size compressed image")
    return rgb
