"""perception_node's parameters: names, defaults, descriptions and validation (rclpy-free).

The defaults are safe for a camera left running for days: a bounded KV cache (``window`` 16 with ``sink`` 1: the
first frame plus the 15 most recent), inputs resized so the longer side is at most 512 px (the published model's
training resolution), images over ``max_input_pixels`` refused before they are decoded, and frames stamped more
than ``max_stamp_ahead`` seconds in the future dropped.
"""

from __future__ import annotations

import re
from typing import Any

from ..perception import CAMERA_TOKEN_CHOICES
from .node_params import ParamSpec, integer_in, non_empty, number_in, one_of, problem

_CAMERA_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
STRING_ARRAY = object()  # the default of an unset string-array parameter (``cameras``); the node declares the type
RELIABILITY_CHOICES = ("auto", "reliable", "best_effort")
# 8K UHD (7680x4320 = 33.2 MP) fits; a 9000x9000 picture does not. Checked on the header, before decoding.
DEFAULT_MAX_INPUT_PIXELS = 36_000_000


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


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else f"must be a string, got {value!r}"


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
        "omnistream_world", "frame_id of pose/path/points (suffixed _<camera> with several cameras)", check=_text
    ),
    "publish_features": ParamSpec(True, "publish ~/features", check=_boolean),
    "publish_depth": ParamSpec(True, "publish ~/depth and ~/depth/camera_info (needs heads)", check=_boolean),
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
