"""perception_node's parameters: names, defaults, descriptions and validation (rclpy-free).

The defaults are safe for a camera left running for days: a bounded KV cache (``window`` 16 with ``sink`` 1: the
first frame plus the 15 most recent), inputs resized so the longer side is at most 512 px (the published model's
training resolution), images over ``max_input_pixels`` refused before they are decoded, and frames stamped more
than ``max_stamp_ahead`` seconds in the future dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from ..deploy.stream_backend import BACKENDS
from ..depth_units import (
    DEFAULT_DEPTH_SYNC_TOLERANCE_S,
    DEFAULT_MIN_DEPTH_CONFIDENCE,
    DEFAULT_SCALE_TIME_CONSTANT_S,
    SCALE_SOURCES,
)
from ..perception import CAMERA_TOKEN_CHOICES
from .node_params import Check, ParamSpec, integer_in, non_empty, number_in, one_of, problem

_CAMERA_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
STRING_ARRAY = object()  # the default of an unset string-array parameter (``cameras``); the node declares the type
RELIABILITY_CHOICES = ("auto", "reliable", "best_effort")
# 8K UHD (7680x4320 = 33.2 MP) fits; a 9000x9000 picture does not. Checked on the header, before decoding.
DEFAULT_MAX_INPUT_PIXELS = 36_000_000
QUATERNION_NORM_TOLERANCE = 1e-3  # a quaternion typed with 4 decimals passes; it is normalised before use


def _device(value: Any) -> str | None:
    return (
        None if isinstance(value, str) and _DEVICE.match(value) else f"must be cpu, cuda, cuda:N or mps, got {value!r}"
    )


def _max_side(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and (value == 0 or value >= 16):
        return None
    return f"must be 0 (input size) or an integer >= 16, got {value!r}"


def _cameras(value: Any) -> str | None:
    if value is None or value is STRING_ARRAY:
        return None
    names = list(value)
    bad = [n for n in names if not _CAMERA_NAME.match(n)]
    if bad:
        return f"list: camera names must be letters, digits and _ (starting with a letter), got {bad}"
    if len(set(names)) != len(names):
        return f"list: camera names must be unique, got {names}"
    return None


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _frame_id(optional: bool) -> Check:
    """A TF frame id: no whitespace, no leading '/' (tf2 refuses it); ``optional`` admits '' (its meaning: see
    the parameter's description)."""

    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"must be a frame id (a string), got {value!r}"
        if not value:
            return None if optional else "must be a frame id, got ''"
        if value.startswith("/") or any(c.isspace() for c in value):
            return f"must be a frame id without a leading '/' or spaces, got {value!r}"
        return None

    return check


def _floats(count: int, what: str) -> Check:
    def check(value: Any) -> str | None:
        values = [] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else None
        if values is None or len(values) != count or not all(isinstance(v, float) for v in values):
            return f"must be {what}: {count} numbers written as floats (1.0, not 1), got {value!r}"
        if not all(math.isfinite(v) for v in values):
            return f"must be {what}: {count} finite numbers, got {values}"
        return None

    return check


def _unit_quaternion(value: Any) -> str | None:
    reason = _floats(4, "a unit quaternion [x, y, z, w]")(value)
    norm = math.sqrt(sum(v * v for v in value)) if reason is None else 0.0
    if reason is None and abs(norm - 1.0) > QUATERNION_NORM_TOLERANCE:
        reason = f"must be a unit quaternion [x, y, z, w] (norm 1 within {QUATERNION_NORM_TOLERANCE:g}), norm {norm:g}"
    return reason


PARAMETERS: dict[str, ParamSpec] = {
    "checkpoint": ParamSpec(
        "",
        "backbone checkpoint: a directory (config.json + model.safetensors) or a hub id",
        True,
        non_empty("a checkpoint directory or a hub id"),
    ),
    "device": ParamSpec("cpu", "torch device: cpu | cuda | cuda:N | mps", True, _device),
    "dtype": ParamSpec(
        "float32", "model dtype: float32 | bfloat16 | float16", True, one_of("float32", "bfloat16", "float16")
    ),
    "backend": ParamSpec(
        "torch",
        "what runs the streaming step: torch | onnxruntime (the exported float32 step in onnx_file, on the CPU; "
        "device cpu, dtype float32)",
        True,
        one_of(*BACKENDS),
    ),
    "onnx_file": ParamSpec(
        "",
        "the streaming step written by `omnistream export onnx` (backend onnxruntime): exported from this "
        "checkpoint with the node's window and sink, at the size max_side makes of the camera's images",
        True,
    ),
    "max_side": ParamSpec(
        224,
        "resize (aspect kept) so the longer side is <= max_side px (224: the VLA recipe's input and pretraining "
        "stage 1; 512: stage 2, finer depth at ~5x the compute); 0 = input size",
        True,
        _max_side,
    ),
    "max_input_pixels": ParamSpec(
        DEFAULT_MAX_INPUT_PIXELS,
        "images with more pixels (width x height, read before decoding) are refused",
        check=integer_in(256),
    ),
    "window": ParamSpec(
        16, "bounded KV cache in frames (oldest dropped, sink kept); 0 = whole stream (grows)", True, integer_in(0)
    ),
    "sink": ParamSpec(1, "first frames always kept in a bounded cache", True, integer_in(0)),
    "feature_pooling": ParamSpec(
        2, "average pooling of the patch grid per frame (2 = 2x2 as the paper's LLM input)", True, integer_in(1)
    ),
    "feature_dtype": ParamSpec(
        "float16", "dtype of StreamFeatures.patch_tokens: float16 | float32", True, one_of("float16", "float32")
    ),
    "camera_token": ParamSpec(
        "auto", "run with the camera token: auto (when heads exist) | true | false", True, one_of(*CAMERA_TOKEN_CHOICES)
    ),
    "cameras": ParamSpec(
        STRING_ARRAY,
        "camera names; each gets <name>/image inputs and ~/<name>/... outputs. Unset = one camera on `image`",
        True,
        _cameras,
    ),
    "world_frame_id": ParamSpec(
        "omnistream_world",
        "frame_id of pose/path/points and the parent of the camera transform on /tf: the stream's first camera "
        "optical frame (x right, y down, z forward; not z-up); suffixed _<camera> with several cameras",
        check=_frame_id(optional=False),
    ),
    "tf.publish": ParamSpec(
        True, "publish world_frame_id -> camera frame on /tf per frame (the ~/pose, the image's stamp)", check=_boolean
    ),
    "tf.camera_frame": ParamSpec(
        "",
        "child frame of the /tf transform, an optical frame (REP-103: x right, y down, z forward); empty = the "
        "image header's frame_id (as ~/depth's). Name another frame when the robot's TF already has the camera's "
        "(a frame has one parent); suffixed _<camera> with several cameras",
        True,
        _frame_id(optional=True),
    ),
    "tf.anchor_parent_frame": ParamSpec(
        "",
        "robot frame (e.g. base_link, odom) of a static transform to world_frame_id on /tf_static; empty = none "
        "(one camera only)",
        True,
        _frame_id(optional=True),
    ),
    "tf.anchor_translation": ParamSpec(
        [0.0, 0.0, 0.0],
        "x, y, z in metres: where world_frame_id (the first camera optical frame) is in tf.anchor_parent_frame",
        True,
        _floats(3, "a translation [x, y, z] in metres"),
    ),
    "tf.anchor_rotation": ParamSpec(
        [0.0, 0.0, 0.0, 1.0],
        "unit quaternion [x, y, z, w] of world_frame_id in tf.anchor_parent_frame (a camera looking along the "
        "parent's x axis, REP-103 body to optical: [-0.5, 0.5, -0.5, 0.5])",
        True,
        _unit_quaternion,
    ),
    "publish_features": ParamSpec(True, "publish ~/features", check=_boolean),
    "publish_depth": ParamSpec(
        True, "publish ~/depth (or ~/depth_scale_free) and its camera_info (needs heads)", check=_boolean
    ),
    "scale_source": ParamSpec(
        "none",
        "where metres come from: none (depth on ~/depth_scale_free, points and pose translation in model units) | "
        "fixed (the scale parameter) | depth_topic (a registered depth sensor image on depth_sensor, 16UC1 mm or "
        "32FC1 m)",
        True,
        one_of(*SCALE_SOURCES),
    ),
    "scale": ParamSpec(0.0, "metres per model unit with scale_source fixed (> 0)", True, number_in(0.0, 1e6)),
    "scale_time_constant": ParamSpec(
        DEFAULT_SCALE_TIME_CONSTANT_S,
        "seconds (image stamps) over which the depth_topic scale follows the sensor (exponential, in log); 0 = each "
        "frame's own",
        True,
        number_in(0.0, 3600.0),
    ),
    "depth_sync_tolerance": ParamSpec(
        DEFAULT_DEPTH_SYNC_TOLERANCE_S,
        "seconds between an image's stamp and the depth sensor image paired with it",
        True,
        number_in(0.0, 10.0),
    ),
    "min_depth_confidence": ParamSpec(
        DEFAULT_MIN_DEPTH_CONFIDENCE,
        "depth pixels whose predicted confidence (1 + exp(x) > 1) is lower are NaN (1.5: the heads expect an error "
        "above ~13% of the scene's mean distance); 1 = keep all",
        True,
        number_in(0.0, 1e9),
    ),
    "publish_pose": ParamSpec(True, "publish ~/pose (needs heads)", check=_boolean),
    "publish_path": ParamSpec(True, "publish ~/path (needs heads)", check=_boolean),
    "publish_points": ParamSpec(True, "publish ~/points (needs heads)", check=_boolean),
    "points_stride": ParamSpec(4, "keep every N-th pixel in rows and columns for ~/points", check=integer_in(1)),
    "max_path_length": ParamSpec(2000, "poses kept in ~/path", check=integer_in(1)),
    "reset_on_time_jump": ParamSpec(
        True, "restart the stream when image time goes backwards (looping bag)", check=_boolean
    ),
    "max_stamp_ahead": ParamSpec(
        10.0,
        "frames stamped more than this many seconds ahead of the node's clock are dropped; 0 = no check",
        check=number_in(0.0, 1e9),
    ),
    "diagnostics_period": ParamSpec(
        1.0, "seconds between /diagnostics reports", True, number_in(0.0, 3600.0, low_open=True)
    ),
    "autostart": ParamSpec(
        True, "configure and activate at start (false: wait for the lifecycle services)", True, _boolean
    ),
    "image_reliability": ParamSpec(
        "auto",
        "image QoS (newest frames only): auto (match the camera publisher: reliable when it is) | reliable | "
        "best_effort",
        True,
        one_of(*RELIABILITY_CHOICES),
    ),
}


def validate_parameter(name: str, value: Any) -> str | None:
    """A reason why ``value`` is bad for parameter ``name`` ("<name> <reason>"), or None when it is fine."""
    return problem(name, value, PARAMETERS)
