"""The one StreamFeatures codec: patch grid <-> message, and the policy batch keys the grid goes under.

rclpy-free: the functions fill or read a message object the caller passes (``omnistream_msgs.msg.StreamFeatures``
or anything with its fields). perception_node encodes with :func:`fill_features_message`, vla_node decodes
with :func:`decode_patch_tokens`, and vla_node, training and the simulators name a camera's features in a
policy batch with :func:`batch_key` / :func:`batch_entry`.

Wire format: the (already pooled, by default 2x2) patch grid of one frame as raw little-endian bytes of
``dtype`` (float16 | float32), row-major ``grid_height x grid_width x dim``. A message that does not add up
(unknown dtype, a byte count that is not the grid's, a width the reader was not built for, NaN/inf) raises
ValueError naming what is wrong, so a node can log it, count it and drop it.
"""

from __future__ import annotations

import array

import numpy as np

FEATURE_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
FEATURES_KEY = "observation.features"  # pooled tokens, (B, n, D)
PATCH_TOKENS_KEY = "observation.patch_tokens"  # the unpooled grid, (B, h, w, D); the policy pools it


def encode_patch_tokens(tokens: np.ndarray, msg, dtype: str | None = None):
    """Fills ``msg``'s grid fields from an (h, w, d) array in ``dtype`` (default: the array's own, which must be
    float16 or float32) and returns ``msg``."""
    tokens = np.asarray(tokens)
    dtype = dtype if dtype is not None else str(tokens.dtype)
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
    if tokens.ndim != 3:
        raise ValueError(f"patch tokens must be (h, w, d), got shape {tokens.shape}")
    msg.grid_height, msg.grid_width, msg.dim = (int(v) for v in tokens.shape)
    msg.dtype = dtype
    # bytes, never a numpy array: rosidl copies arrays element by element
    msg.patch_tokens = np.ascontiguousarray(tokens, dtype=FEATURE_DTYPES[dtype]).tobytes()
    return msg


def fill_features_message(msg, patch_tokens, cls_token, camera_token=None, frame_index: int = 0, header=None):
    """A complete StreamFeatures: grid, CLS and camera tokens (float32 buffers), frame index and header."""
    if header is not None:
        msg.header = header
    msg.frame_index = int(frame_index)
    encode_patch_tokens(patch_tokens, msg)
    msg.cls_token = array.array("f", np.asarray(cls_token, dtype=np.float32).tobytes())
    if camera_token is not None:
        msg.camera_token = array.array("f", np.asarray(camera_token, dtype=np.float32).tobytes())
    return msg


def decode_patch_tokens(msg, expected_dim: int | None = None) -> np.ndarray:
    """(grid_height, grid_width, dim) float32 array of ``msg.patch_tokens``."""
    dtype = FEATURE_DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"unknown StreamFeatures dtype {msg.dtype!r}; expected one of {sorted(FEATURE_DTYPES)}")
    h, w, d = int(msg.grid_height), int(msg.grid_width), int(msg.dim)
    if h <= 0 or w <= 0 or d <= 0:
        raise ValueError(f"StreamFeatures grid {h}x{w}x{d} has a zero size")
    if expected_dim is not None and d != expected_dim:
        raise ValueError(f"StreamFeatures dim {d} != the policy's vision width {expected_dim} (wrong backbone?)")
    data = msg.patch_tokens if isinstance(msg.patch_tokens, bytes | bytearray) else bytes(msg.patch_tokens)
    expected_bytes = h * w * d * dtype.itemsize
    if len(data) != expected_bytes:
        raise ValueError(
            f"StreamFeatures patch_tokens has {len(data)} bytes; {h}x{w}x{d} {msg.dtype} needs {expected_bytes}"
        )
    tokens = np.frombuffer(data, dtype=dtype).reshape(h, w, d).astype(np.float32)
    if not np.isfinite(tokens).all():
        raise ValueError("StreamFeatures patch_tokens contain NaN or inf")
    return tokens


def stamp_seconds(msg) -> float:
    """``msg.header.stamp`` in seconds."""
    return int(msg.header.stamp.sec) + int(msg.header.stamp.nanosec) * 1e-9


def batch_key(camera: str, pooled: bool = True) -> str:
    """The policy batch key of one camera's features: ``observation.features.<camera>`` (pooled tokens) or
    ``observation.patch_tokens.<camera>`` (the unpooled grid)."""
    return f"{FEATURES_KEY if pooled else PATCH_TOKENS_KEY}.{camera}"


def batch_entry(tokens, pooled: bool = True):
    """One frame's (h, w, D) grid -> a batch of one: (1, h*w, D) pooled tokens or (1, h, w, D) grid."""
    return tokens.reshape(1, -1, tokens.shape[-1]) if pooled else tokens[None]
