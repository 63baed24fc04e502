"""StreamFeatures -> numpy, validated (rclpy-free apart from the message type the caller passes).

The perception node publishes the (already pooled, by default 2x2) patch grid of each frame as raw
little-endian bytes with its dtype named in the message. A message that does not add up (unknown dtype, a
byte count that is not grid_height x grid_width x dim values, a width the policy was not built for, NaN/inf)
raises ValueError naming what is wrong, so the node can log it, count it and drop it.
"""

from __future__ import annotations

import numpy as np

FEATURE_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


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
    data = bytes(msg.patch_tokens) if not isinstance(msg.patch_tokens, bytes | bytearray) else msg.patch_tokens
    expected_bytes = h * w * d * dtype.itemsize
    if len(data) != expected_bytes:
        raise ValueError(
            f"StreamFeatures patch_tokens has {len(data)} bytes; {h}x{w}x{d} {msg.dtype} needs {expected_bytes}"
        )
    tokens = np.frombuffer(data, dtype=dtype).reshape(h, w, d).astype(np.float32)
    if not np.isfinite(tokens).all():
        raise ValueError("StreamFeatures patch_tokens contain NaN or inf")
    return tokens


def encode_patch_tokens(tokens: np.ndarray, msg, dtype: str = "float16"):
    """Fills ``msg``'s grid fields from an (h, w, d) array (tests and tools; the perception node has its own)."""
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
    array = np.ascontiguousarray(tokens, dtype=FEATURE_DTYPES[dtype])
    if array.ndim != 3:
        raise ValueError(f"patch tokens must be (h, w, d), got shape {array.shape}")
    msg.grid_height, msg.grid_width, msg.dim = (int(v) for v in array.shape)
    msg.dtype = dtype
    msg.patch_tokens = array.tobytes()
    return msg
