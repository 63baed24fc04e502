"""The OmniStream VLA policy (rclpy-free): configuration, processor (tokenizer, prompt, images) and model."""

from .configuration_omnistream_vla import OmniStreamVLAConfig
from .modeling_omnistream_vla import OmniStreamVLAPolicy
from .processor_omnistream_vla import OmniStreamVLAProcessor, build_debug_tokenizer, build_qwen25_tokenizer

__all__ = [
    "OmniStreamVLAConfig",
    "OmniStreamVLAPolicy",
    "OmniStreamVLAProcessor",
    "build_debug_tokenizer",
    "build_qwen25_tokenizer",
]
