"""What perception_node's depth, points and pose mean: units, invalid pixels, the world frame (rclpy-free).

* Units. The geometry heads are trained on per-clip normalised targets (every length divided by the clip's mean
  point distance to the first camera, ``omnistream_train.geometry_targets``): their depth, pose translation and
  points are scale-free ("model units"). ``scale_source`` says where metres come from:

  - ``none`` (default): nothing is called metres. Depth goes out on ``~/depth_scale_free`` (REP 118 makes 32FC1
    on a depth topic metres), points and pose translation are in model units; ``/diagnostics`` says so.
  - ``fixed``: ``scale`` metres per model unit, known for a setup (a camera at a fixed height over a similar
    scene: the model's unit is the scene's mean distance, so it holds only while the scene stays alike).
  - ``depth_topic``: a depth sensor registered to the camera (e.g. a RealSense aligned depth, 16UC1 millimetres or
    32FC1 metres). Each frame's scale is the median of sensor / predicted depth over the pixels where both are
    valid (at least ``MIN_SCALE_PIXELS``); the published scale follows it with an exponential filter in time
    (``scale_time_constant`` seconds of image stamps: a step in the true scale is 63 % followed after one
    constant), in log space so a factor above and below count alike. It restarts with the stream.

  With a scale, ``~/depth``, ``~/points`` and the pose translation are metres; before the first scale of a stream
  (``depth_topic``) they are withheld, and counted, rather than published in the wrong unit.
* Invalid pixels are NaN: the depth head's confidence is ``1 + exp(x)`` (> 1), trained with
  ``c |error| - alpha log c`` (alpha 0.2), whose optimum is c = alpha / expected error: a confidence below
  ``min_depth_confidence`` (default 1.5) means an expected error above about 13 % of the scene's mean distance.
  Depth that is not finite, not positive or beyond ``MAX_MODEL_DEPTH`` model units (the head's exp() saturating)
  is NaN too. The point cloud leaves NaN pixels out.
* The world is the stream's first camera frame, exactly: poses are relative to the stream's first predicted pose
  (reset with the stream), so the first pose is the identity.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .camera_model import CameraModel, rescale_pixel

SCALE_SOURCES = ("none", "fixed", "depth_topic")
METRES, SCALE_FREE = "metres", "scale-free"
DEFAULT_MIN_DEPTH_CONFIDENCE = 1.5
DEFAULT_SCALE_TIME_CONSTANT_S = 1.0
DEFAULT_DEPTH_SYNC_TOLERANCE_S = 0.05
MIN_SCALE_PIXELS = 100  # pixels where sensor and model both have depth, for one frame's ratio
MAX_MODEL_DEPTH = 1e3  # model units (the scene's mean distance is 1): beyond is the head's exp() saturating
SENSOR_BUFFER = 8  # depth sensor images kept to pair with a camera frame by stamp
_ASPECT_TOLERANCE = 0.02


def depth_topic_name(scale_source: str) -> str:
    """The relative name of the depth output: ``depth`` (metres) or ``depth_scale_free``."""
    return "depth" if scale_source != "none" else "depth_scale_free"


def units_notice(scale_source: str) -> str:
    """What the node says once at start about its units."""
    if scale_source == "none":
        return (
            "scale_source none: the model's depth, points and pose translation are scale-free (model units: the "
            "scene's mean distance is about 1), so depth is published on ~/depth_scale_free, not ~/depth, and "
            "~/points and ~/pose are in model units; set scale_source to fixed (with scale) or depth_topic (with "
            "a depth sensor on depth_sensor) for metres"
        )
    if scale_source == "fixed":
        return "scale_source fixed: depth, points and pose translation in metres from the fixed scale"
    return (
        "scale_source depth_topic: depth, points and pose translation in metres, scaled to the depth sensor on "
        "depth_sensor (withheld until its first usable image)"
    )


@dataclass(frozen=True)
class UnitsConfig:
    scale_source: str = "none"
    scale: float = 0.0  # metres per model unit (fixed)
    min_depth_confidence: float = DEFAULT_MIN_DEPTH_CONFIDENCE
    scale_time_constant: float = DEFAULT_SCALE_TIME_CONSTANT_S
    depth_sync_tolerance: float = DEFAULT_DEPTH_SYNC_TOLERANCE_S

    def __post_init__(self) -> None:
        if self.scale_source not in SCALE_SOURCES:
            raise ValueError(f"scale_source must be one of {', '.join(SCALE_SOURCES)}, got {self.scale_source!r}")
        if self.scale_source == "fixed" and not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale_source fixed needs scale > 0 (metres per model unit), got {self.scale:g}")
        if self.scale_time_constant < 0 or self.depth_sync_tolerance < 0:
            raise ValueError("scale_time_constant and depth_sync_tolerance must be >= 0")

    @property
    def metric(self) -> bool:
        return self.scale_source != "none"

    @classmethod
    def from_node_parameters(cls, params: dict) -> UnitsConfig:
        return cls(
            scale_source=params["scale_source"],
            scale=float(params["scale"]),
            min_depth_confidence=float(params["min_depth_confidence"]),
            scale_time_constant=float(params["scale_time_constant"]),
            depth_sync_tolerance=float(params["depth_sync_tolerance"]),
        )


def valid_depth(depth: np.ndarray, confidence: np.ndarray | None, min_confidence: float) -> np.ndarray:
    """(H, W) float32 depth with NaN where the head does not vouch for it (see the module's docstring)."""
    depth = np.array(depth, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(depth) & (depth > 0) & (depth <= MAX_MODEL_DEPTH))
        if confidence is not None:
            bad |= ~(np.asarray(confidence) >= min_confidence)
    depth[bad] = np.nan
    return depth


def depth_image_metres(msg: Any) -> np.ndarray:
    """A depth sensor image (duck-typed ``sensor_msgs/Image``) as (H, W) float32 metres, NaN where it has no
    reading: 16UC1 millimetres (0 = none), 32FC1 metres (NaN, +-inf or 0 = none, REP 118)."""
    encoding, height, width, step = msg.encoding, int(msg.height), int(msg.width), int(msg.step)
    if encoding not in ("16UC1", "32FC1"):
        raise ValueError(f"depth sensor image must be 16UC1 (mm) or 32FC1 (m), got {encoding!r}")
    size = 2 if encoding == "16UC1" else 4
    if height == 0 or width == 0 or step < size * width or len(msg.data) != step * height:
        raise ValueError(f"{encoding} depth of {width}x{height}, step {step}: data length {len(msg.data)} does not fit")
    raw = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(height, step)[:, : size * width]
    order = ">" if msg.is_bigendian else "<"
    values = np.ascontiguousarray(raw).view(order + ("u2" if size == 2 else "f4")).astype(np.float32)
    if encoding == "16UC1":
        values /= 1000.0
    with np.errstate(invalid="ignore"):
        values[~(np.isfinite(values) & (values > 0))] = np.nan
    return values


def sample_at(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W) read at the pixel centres of an image of ``shape`` covering the same view (nearest pixel,
    :func:`rescale_pixel`); ValueError when the aspect ratios differ (not registered to each other)."""
    h, w = image.shape
    th, tw = shape
    if (th, tw) == (h, w):
        return image
    if abs((tw / th) / (w / h) - 1) > _ASPECT_TOLERANCE:
        raise ValueError(
            f"depth sensor image {tw}x{th} does not have the camera image's aspect ratio ({w}x{h}): it is not "
            "registered to the camera (use an aligned depth topic)"
        )
    rows = np.clip(np.rint(rescale_pixel(np.arange(th), h / th)), 0, h - 1).astype(int)
    cols = np.clip(np.rint(rescale_pixel(np.arange(tw), w / tw)), 0, w - 1).astype(int)
    return image[rows[:, None], cols[None, :]]


class ScaleEstimator:
    """Metres per model unit from a depth sensor: each frame's median of sensor / predicted depth, followed with an
    exponential filter in log space, time constant ``time_constant_s`` of image stamps (0: each frame's own)."""

    def __init__(self, time_constant_s: float = DEFAULT_SCALE_TIME_CONSTANT_S, min_pixels: int = MIN_SCALE_PIXELS):
        self.time_constant_s = time_constant_s
        self.min_pixels = min_pixels
        self.reset()

    def reset(self) -> None:
        self.scale: float | None = None
        self.last_ratio: float | None = None
        self.last_pixels = 0
        self.measurements = 0
        self._last_stamp_s: float | None = None

    def age_s(self, stamp_s: float) -> float | None:
        """Seconds of image time since the last measurement (None before the first)."""
        return None if self._last_stamp_s is None else stamp_s - self._last_stamp_s

    def frame_ratio(self, sensor_m: np.ndarray, predicted: np.ndarray) -> tuple[float | None, int]:
        """(median sensor / predicted over the pixels both have, their count); None below ``min_pixels``.
        ``sensor_m`` may have another resolution than ``predicted`` (the same view): read at its pixels."""
        predicted = sample_at(np.asarray(predicted, dtype=np.float64), np.asarray(sensor_m).shape)
        sensor = np.asarray(sensor_m, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = sensor / predicted
            ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
        if ratio.size < self.min_pixels:
            return None, int(ratio.size)
        return float(np.median(ratio)), int(ratio.size)

    def update(self, sensor_m: np.ndarray, predicted: np.ndarray, stamp_s: float) -> float | None:
        """Adds a frame measured at ``stamp_s``; returns its ratio (None: too few pixels, nothing changes)."""
        ratio, self.last_pixels = self.frame_ratio(sensor_m, predicted)
        if ratio is None:
            return None
        self.last_ratio = ratio
        self.measurements += 1
        if self.scale is None or self.time_constant_s <= 0:
            self.scale = ratio
        else:
            dt = max(0.0, stamp_s - self._last_stamp_s) if self._last_stamp_s is not None else 0.0
            weight = 1.0 - math.exp(-dt / self.time_constant_s)
            self.scale = math.exp(math.log(self.scale) + weight * (math.log(ratio) - math.log(self.scale)))
        self._last_stamp_s = stamp_s
        return ratio


class SensorDepthBuffer:
    """The last few depth sensor images (as received), to pair a camera frame with the one nearest in stamp."""

    def __init__(self, size: int = SENSOR_BUFFER) -> None:
        self._items: deque[tuple[int, Any]] = deque(maxlen=size)
        self.received = 0

    def add(self, stamp_ns: int, msg: Any) -> None:  # the subscription callback: cheap, no decoding
        self._items.append((stamp_ns, msg))
        self.received += 1

    def clear(self) -> None:
        self._items.clear()

    def nearest(self, stamp_ns: int, tolerance_s: float) -> Any | None:
        """The image stamped nearest to ``stamp_ns``, if within ``tolerance_s``; else None."""
        items = list(self._items)
        if not items:
            return None
        gap, msg = min(((abs(s - stamp_ns), m) for s, m in items), key=lambda item: item[0])
        return msg if gap <= tolerance_s * 1e9 else None


def invert_pose(pose: np.ndarray) -> np.ndarray:
    """The inverse of a rigid 4x4 transform (rotation transposed)."""
    out = np.eye(4)
    rot = np.asarray(pose, dtype=np.float64)[:3, :3]
    out[:3, :3] = rot.T
    out[:3, 3] = -rot.T @ np.asarray(pose, dtype=np.float64)[:3, 3]
    return out


@dataclass
class FrameGeometry:
    """One frame's depth, pose and camera as published: ``units`` metres or scale-free (``scale``: metres per model
    unit applied, None when scale-free); NaN depth = invalid; pose camera-to-world, world = the stream's first camera
    frame. ``camera``: the intrinsics of depth and points, from ``camera_info`` (the camera's CameraInfo, when used:
    republished with the depth) or the model. ``withheld``: why depth/pose/points are not published this frame
    (metres asked for, no scale yet). ``notices``: (kind, text) for the node's throttled log."""

    units: str
    scale: float | None
    depth: np.ndarray | None = None
    pose: np.ndarray | None = None
    camera: CameraModel | None = None
    camera_info: Any = None
    withheld: str | None = None
    notices: list[tuple[str, str]] = field(default_factory=list)

    def world_points(self, stride: int = 1) -> np.ndarray | None:
        """(ceil(H/stride) * ceil(W/stride), 3) points in the world frame (NaN rows: invalid pixels)."""
        if self.depth is None or self.camera is None:
            return None
        camera_points = self.camera.backproject(self.depth, stride).reshape(-1, 3)
        pose = self.pose if self.pose is not None else np.eye(4)
        return (camera_points @ pose[:3, :3].T + pose[:3, 3]).astype(np.float32)


class StreamGeometry:
    """One camera stream's units, invalid pixels, world frame and intrinsics (see the module's docstring).

    ``camera`` picks the intrinsics for a frame (a CameraInfo of the image's size, else the model's prediction);
    ``finish`` turns a ``PerceptionResult`` into the published :class:`FrameGeometry`; ``reset`` with the stream
    (also done by ``finish`` at a frame 0). ``sensor.add`` takes the depth sensor's images."""

    def __init__(self, config: UnitsConfig | None = None) -> None:
        self.config = config or UnitsConfig()
        self.estimator = ScaleEstimator(self.config.scale_time_constant)
        self.sensor = SensorDepthBuffer()
        self._anchor: np.ndarray | None = None  # world <- first camera: the inverse of the stream's first pose
        self.camera_info_ignored = 0  # CameraInfo messages not used (size mismatch, unsupported lens)
        self.camera_info_problem = ""
        self.frames_without_scale = 0
        self.sensor_unmatched = 0  # frames with no depth sensor image near their stamp
        self.sensor_errors = 0
        self.sensor_problem = ""
        self.valid_fraction: float | None = None
        self.scale_age_s: float | None = None

    # -- stream ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """A new stream: a new world frame and a new scale. The sensor images stay: they pair by stamp."""
        self._anchor = None
        self.estimator.reset()

    @property
    def units(self) -> str:
        return METRES if self.config.metric else SCALE_FREE

    @property
    def scale(self) -> float | None:
        """Metres per model unit now (None: scale-free, or no sensor measurement yet)."""
        if self.config.scale_source == "fixed":
            return self.config.scale
        if self.config.scale_source == "depth_topic":
            return self.estimator.scale
        return None

    @property
    def needs_anchor(self) -> bool:
        """True until the stream's first pose is known (the next frame must compute its pose)."""
        return self._anchor is None

    def needs_depth(self, pose_wanted: bool) -> bool:
        """The model's depth is needed for the scale even when only the pose is published (``depth_topic``)."""
        return self.config.scale_source == "depth_topic" and pose_wanted

    # -- intrinsics --------------------------------------------------------------------------------------------
    def camera(self, info: Any, size: tuple[int, int]) -> tuple[CameraModel | None, str | None]:
        """The camera of a CameraInfo for an image of ``size`` (H, W), or (None, why it is not used): a CameraInfo
        of another size than the image (an earlier stream's, a resized image) or with a lens we do not undistort
        is ignored and counted; the caller then uses the model's intrinsics."""
        if info is None:
            return None, None
        h, w = size
        if (int(info.width), int(info.height)) != (w, h):
            problem = (
                f"camera_info ignored: it is for {info.width}x{info.height} images, the image is {w}x{h} (using "
                "the model's intrinsics)"
            )
        else:
            try:
                return CameraModel.from_camera_info(info), None
            except ValueError as exc:
                problem = f"camera_info ignored: {exc} (using the model's intrinsics)"
        self.camera_info_ignored += 1
        self.camera_info_problem = problem
        return None, problem

    # -- one frame ---------------------------------------------------------------------------------------------
    def finish(self, result: Any, info: Any, size: tuple[int, int], stamp_ns: int) -> FrameGeometry:
        """The published geometry of a frame's ``PerceptionResult`` (depth at the input resolution ``size`` (H, W),
        confidence, pose, predicted intrinsics), with ``info`` the camera's latest CameraInfo (or None). A bad depth
        sensor image is reported in the notices; the frame goes out with the scale it had."""
        notices: list[tuple[str, str]] = []
        camera, problem = self.camera(info, size)
        if problem is not None:
            notices.append(("camera_info", problem))
        given = info if camera is not None else None
        if result.frame_index == 0:  # a new stream (start, restart, resolution change): a new world and scale
            self.reset()
        pose = None
        if result.pose is not None:
            if self._anchor is None:
                self._anchor = invert_pose(result.pose)
                pose = np.eye(4)  # exactly, not to rounding
            else:
                pose = self._anchor @ np.asarray(result.pose, dtype=np.float64)
        depth = None
        if result.depth is not None:
            depth = valid_depth(result.depth, result.confidence, self.config.min_depth_confidence)
            self.valid_fraction = float(np.isfinite(depth).mean())
            if camera is None and result.intrinsics is not None:
                camera = CameraModel.pinhole(result.intrinsics, depth.shape[1], depth.shape[0])
            if self.config.scale_source == "depth_topic" and (problem := self._measure(depth, stamp_ns)):
                notices.append(("depth_sensor", problem))
        self.scale_age_s = self.estimator.age_s(stamp_ns / 1e9)
        frame = FrameGeometry(self.units, self.scale, depth, pose, camera, given, notices=notices)
        if not self.config.metric:
            frame.scale = None
            return frame
        if frame.scale is None:
            self.frames_without_scale += 1
            frame.depth, frame.pose = None, None
            frame.withheld = "no depth sensor image usable for the scale yet: depth, points and pose withheld"
            notices.append(("units", frame.withheld))
            return frame
        if frame.depth is not None:
            frame.depth = frame.depth * np.float32(frame.scale)
        if frame.pose is not None:
            frame.pose = frame.pose.copy()
            frame.pose[:3, 3] *= frame.scale
        return frame

    def _measure(self, depth: np.ndarray, stamp_ns: int) -> str | None:
        """Updates the scale from the sensor image nearest in stamp; returns why it could not be used, if so."""
        msg = self.sensor.nearest(stamp_ns, self.config.depth_sync_tolerance)
        if msg is None:
            self.sensor_unmatched += 1
            return None
        try:
            self.estimator.update(depth_image_metres(msg), depth, stamp_ns / 1e9)
        except ValueError as exc:
            self.sensor_errors += 1
            self.sensor_problem = f"depth_sensor image not used: {exc}"
            return self.sensor_problem
        return None

    def diagnostics_values(self) -> dict[str, Any]:
        scale = self.scale
        values = {
            "units": self.units,
            "scale_source": self.config.scale_source,
            "scale_m_per_unit": f"{scale:.6g}" if scale is not None else "",
            "depth_valid_fraction": f"{self.valid_fraction:.3f}" if self.valid_fraction is not None else "",
            "camera_info_ignored": self.camera_info_ignored,
            "camera_info_problem": self.camera_info_problem,
        }
        if self.config.scale_source == "depth_topic":
            est = self.estimator
            values |= {
                "scale_last_ratio": f"{est.last_ratio:.6g}" if est.last_ratio is not None else "",
                "scale_pixels": est.last_pixels,
                "scale_measurements": est.measurements,
                "scale_age_s": f"{self.scale_age_s:.2f}" if self.scale_age_s is not None else "",
                "depth_sensor_received": self.sensor.received,
                "depth_sensor_unmatched": self.sensor_unmatched,
                "depth_sensor_errors": self.sensor_errors,
                "depth_sensor_problem": self.sensor_problem,
                "frames_without_scale": self.frames_without_scale,
            }
        return values
