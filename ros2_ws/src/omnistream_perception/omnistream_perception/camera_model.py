"""Pinhole cameras with lens distortion in numpy (no OpenCV): resizing intrinsics, undistorting, back-projecting.

Conventions (those of ``model/geometry.py``, ROS ``CameraInfo`` and the training data, one set everywhere):

* the centre of pixel (column u, row v) is at (u, v). Resizing an image by ``s`` maps a pixel edge e to e * s, so a
  pixel centre c to (c + 0.5) * s - 0.5: :func:`rescale_pixel` and :func:`rescale_intrinsics` are the one place
  this is written (the training data resize and the node use them);
* ``CameraInfo`` distortion models: ``plumb_bob`` (k1, k2, p1, p2, k3) and ``rational_polynomial`` (k1, k2, p1, p2,
  k3, k4, k5, k6), with OpenCV's formulas; an empty or all-zero D is a plain pinhole. Other models (``equidistant``
  fisheye, thin-prism terms, unknown names), binning and a region of interest are refused with a ValueError that
  names them: the caller reports it and falls back on the model's own intrinsics;
* back-projection undistorts every pixel: the normalised coordinates (x, y) with distort(x, y) = K^-1 (u, v, 1) are
  found by Newton's method (converged to 1e-12, far below a pixel); a pixel that the lens model cannot undistort
  (outside the region where it is invertible) gets NaN, never a guess.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

DISTORTION_MODELS = ("plumb_bob", "rational_polynomial")
_COEFFICIENTS = {"plumb_bob": 5, "rational_polynomial": 8}
_NEWTON_STEPS = 30
_NEWTON_TOLERANCE = 1e-12
_UNDISTORT_RESIDUAL = 1e-9  # normalised units (a 1000 px focal length: a micro-pixel)
_GRID_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
_GRID_CACHE_SIZE = 8
_GRID_LOCK = threading.Lock()


def rescale_pixel(c, scale: float):
    """A pixel-centre coordinate of an image resized by ``scale`` (edges scale, centres shift by half a pixel)."""
    return (c + 0.5) * scale - 0.5


def rescale_intrinsics(intrinsics, scale_x: float, scale_y: float):
    """(..., 3, 3) intrinsics of an image resized by (scale_x, scale_y): focal lengths and skew scale, principal
    points as pixel centres (:func:`rescale_pixel`). numpy in, float64 numpy out; a torch tensor in, float32 out
    (the training data's)."""
    k = intrinsics.clone().float() if hasattr(intrinsics, "clone") else np.array(intrinsics, dtype=np.float64)
    k[..., 0, 0] *= scale_x
    k[..., 0, 1] *= scale_x
    k[..., 1, 1] *= scale_y
    k[..., 0, 2] = rescale_pixel(k[..., 0, 2], scale_x)
    k[..., 1, 2] = rescale_pixel(k[..., 1, 2], scale_y)
    return k


def _coefficients(model: str, d) -> np.ndarray:
    """D padded to (k1, k2, p1, p2, k3, k4, k5, k6); ValueError for what we do not undistort."""
    d = np.asarray(list(d), dtype=np.float64)
    if not np.isfinite(d).all():
        raise ValueError(f"distortion coefficients must be finite, got {d.tolist()}")
    zero = not d.any()
    if model == "" and zero:
        return np.zeros(8)
    if model not in _COEFFICIENTS:
        supported = ", ".join(DISTORTION_MODELS)
        raise ValueError(f"distortion model {model!r} is not supported (supported: {supported}, or none with D = 0)")
    n = _COEFFICIENTS[model]
    if d[n:].any():
        raise ValueError(f"{model} takes {n} coefficients; D has {len(d)} with non-zero extra terms: {d.tolist()}")
    out = np.zeros(8)
    out[: min(n, len(d))] = d[:n]
    return out


def distort(x: np.ndarray, y: np.ndarray, coefficients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised undistorted (x, y) -> distorted (x, y) (OpenCV's model, ``coefficients`` k1 k2 p1 p2 k3 k4 k5 k6)."""
    xd, yd, *_ = _distort_with_jacobian(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), coefficients)
    return xd, yd


def _distort_with_jacobian(x, y, coefficients):
    """distort(x, y) and its Jacobian (j11, j12 = j21, j22)."""
    k1, k2, p1, p2, k3, k4, k5, k6 = coefficients
    r2 = x * x + y * y
    num = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    den = 1 + r2 * (k4 + r2 * (k5 + r2 * k6))
    radial = num / den
    d_radial = ((k1 + r2 * (2 * k2 + 3 * k3 * r2)) * den - num * (k4 + r2 * (2 * k5 + 3 * k6 * r2))) / den**2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    j11 = radial + 2 * x * x * d_radial + 2 * p1 * y + 6 * p2 * x
    j12 = 2 * x * y * d_radial + 2 * p1 * x + 2 * p2 * y
    j22 = radial + 2 * y * y * d_radial + 6 * p1 * y + 2 * p2 * x
    return xd, yd, j11, j12, j22


def undistort(xd: np.ndarray, yd: np.ndarray, coefficients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distorted normalised (x, y) -> undistorted, by Newton's method from (xd, yd). NaN where it does not converge
    or lands beyond the fold of the lens model (where the distortion stops being one-to-one: Jacobian det <= 0)."""
    xd, yd = np.asarray(xd, dtype=np.float64), np.asarray(yd, dtype=np.float64)
    if not coefficients.any():
        return xd.copy(), yd.copy()
    x, y = xd.copy(), yd.copy()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(_NEWTON_STEPS):
            fx, fy, j11, j12, j22 = _distort_with_jacobian(x, y, coefficients)
            fx, fy = fx - xd, fy - yd
            det = j11 * j22 - j12 * j12
            dx, dy = (j22 * fx - j12 * fy) / det, (j11 * fy - j12 * fx) / det
            x, y = x - dx, y - dy
            moving = np.isfinite(dx) & np.isfinite(dy)
            if not moving.any() or max(np.abs(dx[moving]).max(), np.abs(dy[moving]).max()) < _NEWTON_TOLERANCE:
                break
        rx, ry, j11, j12, j22 = _distort_with_jacobian(x, y, coefficients)
        good = (np.abs(rx - xd) <= _UNDISTORT_RESIDUAL) & (np.abs(ry - yd) <= _UNDISTORT_RESIDUAL)
        good &= j11 * j22 - j12 * j12 > 0
    x, y = np.where(good, x, np.nan), np.where(good, y, np.nan)
    return x, y


@dataclass(frozen=True)
class CameraModel:
    """A camera's intrinsics for images of ``width`` x ``height``, with its lens distortion (zeros: pinhole)."""

    k: np.ndarray
    width: int
    height: int
    distortion_model: str = "plumb_bob"
    d: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        k = np.asarray(self.k, dtype=np.float64)
        if k.shape != (3, 3) or not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
            raise ValueError(f"intrinsics must be a finite 3x3 matrix with positive focal lengths, got {k.tolist()}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"camera size must be positive, got {self.width}x{self.height}")
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "d", tuple(float(v) for v in self.d))
        _coefficients(self.distortion_model, self.d)  # refuse what we cannot undistort, at once

    @classmethod
    def pinhole(cls, k: np.ndarray, width: int, height: int) -> CameraModel:
        return cls(np.asarray(k, dtype=np.float64), int(width), int(height), "plumb_bob", (0.0,) * 5)

    @classmethod
    def from_camera_info(cls, msg: Any) -> CameraModel:
        """From a ``sensor_msgs/CameraInfo`` (duck-typed); ValueError when K is unset or the lens, binning or region
        of interest is one we do not handle."""
        k = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
        if not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
            raise ValueError("CameraInfo has no valid intrinsics (K is unset or not finite)")
        if int(msg.binning_x) > 1 or int(msg.binning_y) > 1:
            raise ValueError(f"CameraInfo binning {msg.binning_x}x{msg.binning_y} is not supported")
        roi = msg.roi
        full = (int(roi.width), int(roi.height)) in ((0, 0), (int(msg.width), int(msg.height)))
        if not full or int(roi.x_offset) or int(roi.y_offset):
            raise ValueError("CameraInfo with a region of interest is not supported")
        return cls(k, int(msg.width), int(msg.height), str(msg.distortion_model), tuple(msg.d))

    @property
    def coefficients(self) -> np.ndarray:
        return _coefficients(self.distortion_model, self.d)

    @property
    def distorted(self) -> bool:
        return bool(self.coefficients.any())

    def normalised_grid(self, stride: int = 1) -> np.ndarray:
        """(ceil(H/stride), ceil(W/stride), 2) undistorted normalised coordinates (x, y) of the pixel centres
        (every ``stride``-th row and column from 0); NaN where the lens model cannot be inverted. Cached."""
        key = (self.k.tobytes(), self.coefficients.tobytes(), self.width, self.height, int(stride))
        with _GRID_LOCK:
            grid = _GRID_CACHE.get(key)
            if grid is not None:
                _GRID_CACHE.move_to_end(key)
                return grid
        v, u = np.meshgrid(
            np.arange(0, self.height, stride, dtype=np.float64),
            np.arange(0, self.width, stride, dtype=np.float64),
            indexing="ij",
        )
        pixels = np.stack([u, v, np.ones_like(u)], axis=-1)
        normalised = pixels @ np.linalg.inv(self.k).T
        x, y = undistort(normalised[..., 0], normalised[..., 1], self.coefficients)
        grid = np.stack([x, y], axis=-1)
        grid.setflags(write=False)
        with _GRID_LOCK:
            _GRID_CACHE[key] = grid
            while len(_GRID_CACHE) > _GRID_CACHE_SIZE:
                _GRID_CACHE.popitem(last=False)
        return grid

    def backproject(self, depth: np.ndarray, stride: int = 1) -> np.ndarray:
        """(H, W) z-depth -> (ceil(H/stride), ceil(W/stride), 3) points in the camera's optical frame (x right,
        y down, z forward), lens distortion undone; NaN depth (or an uninvertible pixel) gives a NaN point."""
        depth = np.asarray(depth)
        if depth.shape != (self.height, self.width):
            raise ValueError(f"depth {depth.shape[1]}x{depth.shape[0]} does not match the camera's "
                             f"{self.width}x{self.height}")  # fmt: skip
        z = depth[::stride, ::stride].astype(np.float64)
        grid = self.normalised_grid(stride)
        return np.stack([grid[..., 0] * z, grid[..., 1] * z, z], axis=-1)
