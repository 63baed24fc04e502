"""The OmniStream backbone (rclpy-free): configuration, network, KV cache, streaming session and geometry heads."""

from .configuration_omnistream import OmniStreamConfig
from .kv_cache import KVCache
from .modeling_omnistream import IMAGENET_MEAN, IMAGENET_STD, OmniStreamModel, OmniStreamOutput
from .streaming import OmniStreamSession, StreamResetWarning

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KVCache",
    "OmniStreamConfig",
    "OmniStreamModel",
    "OmniStreamOutput",
    "OmniStreamSession",
    "StreamResetWarning",
]
