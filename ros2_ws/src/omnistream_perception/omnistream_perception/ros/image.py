"""numpy -> sensor_msgs Image / CompressedImage / CameraInfo (and CameraInfo -> intrinsics), without cv_bridge.

Reading images is ``omnistream_perception.image_codec`` (rclpy-free). Write ``bytes`` into ``msg.data``:
assigning a numpy array goes element by element (about 100x slower).
"""

from __future__ import annotations

import io
import sys

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header

from ..image_codec import COMPRESSED_FORMATS, _check_encoding


def make_header(stamp: Time | None = None, frame_id: str = "") -> Header:
    header = Header()
    if stamp is not None:
        header.stamp = stamp
    header.frame_id = frame_id
    return header


def numpy_to_image(array: np.ndarray, encoding: str, header: Header | None = None) -> Image:
    """Build an ``Image`` from (H, W) or (H, W, C) ``array`` in ``encoding`` (dtype must match)."""
    info = _check_encoding(encoding)
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] != info.channels:
        raise ValueError(f"{encoding} needs shape (H, W) or (H, W, {info.channels}), got {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"zero-size image {tuple(array.shape)}")
    if array.dtype != info.dtype:
        raise ValueError(f"{encoding} needs dtype {info.dtype}, got {array.dtype}")
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = int(sys.byteorder == "big")
    msg.step = msg.width * info.channels * info.dtype.itemsize
    msg.data = np.ascontiguousarray(array).tobytes()  # bytes, not the array: 100x faster
    return msg


def rgb_to_image(rgb: np.ndarray, header: Header | None = None, encoding: str = "rgb8") -> Image:
    """(H, W, 3) uint8 RGB to an ``Image`` in rgb8 (default), bgr8 or mono8."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {tuple(rgb.shape)} {rgb.dtype}")
    if encoding == "rgb8":
        return numpy_to_image(rgb, "rgb8", header)
    if encoding == "bgr8":
        return numpy_to_image(rgb[..., ::-1], "bgr8", header)
    if encoding == "mono8":
        grey = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)
        return numpy_to_image(grey, "mono8", header)
    raise ValueError(f"rgb_to_image writes rgb8, bgr8 or mono8, not {encoding!r}")


def rgb_to_compressed(
    rgb: np.ndarray, header: Header | None = None, fmt: str = "jpeg", quality: int = 90
) -> CompressedImage:
    """(H, W, 3) uint8 RGB to a jpeg or png ``CompressedImage``."""
    from PIL import Image as PILImage

    if fmt not in COMPRESSED_FORMATS:
        raise ValueError(f"unsupported compressed format {fmt!r}; supported: {', '.join(COMPRESSED_FORMATS)}")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {tuple(rgb.shape)} {rgb.dtype}")
    buffer = io.BytesIO()
    kwargs = {"quality": int(quality)} if fmt == "jpeg" else {}
    PILImage.fromarray(rgb).save(buffer, format=fmt.upper(), **kwargs)
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = fmt
    msg.data = buffer.getvalue()
    return msg


def depth_to_msg(depth: np.ndarray, header: Header | None = None) -> Image:
    """(H, W) depth to a ``32FC1`` ``Image`` (NaN allowed here: it marks pixels without depth). On a depth topic
    32FC1 means metres (REP 118): perception_node puts scale-free depth on ``~/depth_scale_free`` instead."""
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got {tuple(depth.shape)}")
    return numpy_to_image(depth.astype(np.float32, copy=False), "32FC1", header)


def camera_info_from_intrinsics(
    intrinsics: np.ndarray, width: int, height: int, header: Header | None = None
) -> CameraInfo:
    """A ``CameraInfo`` for a pinhole camera without distortion from its 3x3 matrix ``K``."""
    k = np.asarray(intrinsics, dtype=np.float64)
    if k.shape != (3, 3) or not np.isfinite(k).all():
        raise ValueError(f"intrinsics must be a finite 3x3 matrix, got shape {tuple(k.shape)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"camera size must be positive, got {width}x{height}")
    msg = CameraInfo()
    if header is not None:
        msg.header = header
    msg.width, msg.height = int(width), int(height)
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    msg.k = k.reshape(-1).tolist()
    msg.r = np.eye(3).reshape(-1).tolist()
    projection = np.zeros((3, 4))
    projection[:, :3] = k
    msg.p = projection.reshape(-1).tolist()
    return msg


def intrinsics_from_camera_info(msg: CameraInfo) -> np.ndarray:
    """The 3x3 ``K`` of a ``CameraInfo``; ValueError when it is unset (all zeros) or not finite."""
    k = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    if not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise ValueError("CameraInfo has no valid intrinsics (K is unset or not finite)")
    return k
