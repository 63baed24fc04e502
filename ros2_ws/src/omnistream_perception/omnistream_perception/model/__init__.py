"""The OmniStream backbone (rclpy-free): configuration, network, streaming session and geometry heads."""

from .configuration_omnistream import OmniStreamConfig
from .modeling_omnistream import IMAGENET_MEAN, IMAGENET_STD, OmniStreamModel, OmniStreamOutput
from .streaming import OmniStreamSession, StreamResetWarning

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OmniStreamConfig",
    "OmniStreamModel",
    "OmniStreamOutput",
    "OmniStreamSession",
    "StreamResetWarning",
]
