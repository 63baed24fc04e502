"""PointCloud2 packing (xyz + packed rgb) with numpy; ``sensor_msgs_py`` is not on PyPI.

Layout: x, y, z as float32 and ``rgb`` as one float32 whose bits are 0x00RRGGBB (the PCL / RViz
convention), 16 bytes per point, little-endian, unorganised (height 1), dense (no NaN points).
"""

from __future__ import annotations

import numpy as np
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

_XYZRGB_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4")])


def _fields() -> list[PointField]:
    return [
        PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
        for i, name in enumerate(("x", "y", "z", "rgb"))
    ]


def xyzrgb_to_pointcloud2(
    points: np.ndarray, colors: np.ndarray | None = None, header: Header | None = None
) -> PointCloud2:
    """(N, 3) float points (+ optional (N, 3) uint8 RGB colours) to a ``PointCloud2``; non-finite points are dropped."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {tuple(points.shape)}")
    if colors is None:
        colors = np.full(points.shape, 255, dtype=np.uint8)
    colors = np.asarray(colors)
    if colors.shape != points.shape or colors.dtype != np.uint8:
        raise ValueError(
            f"colors must be (N, 3) uint8 like points {tuple(points.shape)}, got {tuple(colors.shape)} {colors.dtype}"
        )
    keep = np.isfinite(points).all(axis=1)
    points, colors = points[keep], colors[keep]
    packed = np.empty(len(points), dtype=_XYZRGB_DTYPE)
    packed["x"], packed["y"], packed["z"] = points[:, 0], points[:, 1], points[:, 2]
    c = colors.astype(np.uint32)
    packed["rgb"] = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
    msg = PointCloud2()
    if header is not None:
        msg.header = header
    msg.height, msg.width = 1, len(points)
    msg.fields = _fields()
    msg.is_bigendian = False
    msg.point_step = _XYZRGB_DTYPE.itemsize
    msg.row_step = msg.point_step * msg.width
    msg.is_dense = True
    msg.data = packed.tobytes()  # bytes, not an array: 100x faster
    return msg


def pointcloud2_to_xyzrgb(msg: PointCloud2) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, 3) float32 points and (N, 3) uint8 colours (None without an ``rgb`` field) of a float32 xyz cloud."""
    offsets = {f.name: f for f in msg.fields}
    for name in ("x", "y", "z"):
        if name not in offsets or offsets[name].datatype != PointField.FLOAT32:
            raise ValueError(f"PointCloud2 needs float32 field {name!r}")
    n = int(msg.width) * int(msg.height)
    if len(msg.data) != msg.row_step * msg.height or msg.point_step * msg.width > msg.row_step:
        raise ValueError(f"PointCloud2 data length {len(msg.data)} does not match row_step x height")
    order = ">" if msg.is_bigendian else "<"
    raw = np.frombuffer(msg.data, dtype=np.uint8).reshape(int(msg.height), int(msg.row_step))
    raw = np.ascontiguousarray(raw[:, : msg.point_step * msg.width]).reshape(n, msg.point_step)

    def column(name: str, kind: str) -> np.ndarray:
        start = offsets[name].offset
        return raw[:, start : start + 4].copy().view(order + kind).reshape(n)

    points = np.stack([column(a, "f4") for a in ("x", "y", "z")], axis=1).astype(np.float32)
    if "rgb" not in offsets:
        return points, None
    rgb = column("rgb", "u4")
    colors = np.stack([(rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255], axis=1).astype(np.uint8)
    return points, colors
