"""Configuration of the OmniStream backbone.

The on-disk ``config.json`` is the authors' (``model_type: "vfm"``); only a handful of its fields shape the
network (see ``docs``/the checkpoint spec). Every other field is kept verbatim in ``extra`` so that a
``save_pretrained`` round trip does not lose anything a user's tooling may rely on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"

# Fields of the authors' config.json that shape the network, mapped to our attribute names.
_AUTHOR_FIELDS = {
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "video_aggregator_layer": "depth",
    "patch_size": "patch_size",
    "mlp_ratio": "mlp_ratio",
    "ffn_layer": "ffn_layer",
}


@dataclass
class OmniStreamConfig:
    """Shape of the backbone. ``depth`` is the authors' ``video_aggregator_layer``."""

    hidden_size: int = 1024
    num_attention_heads: int = 16
    depth: int = 24
    patch_size: int = 16
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"  # "mlp" (fc1, exact GELU, fc2) or "swiglu"
    # Fixed in the published network; parameters here so tests can vary them.
    num_register_tokens: int = 4
    rope_base: float = 100.0
    # Frames per unit of RoPE time (t = frame_index / total_length). The authors' wrapper silently switches
    # it to the clip length for clips longer than 16 frames; we keep it fixed so features never depend on
    # how long a clip is.
    rope_total_length: float = 16.0
    layer_norm_eps: float = 1e-5
    # Unknown fields of the authors' config.json, written back unchanged by ``save_pretrained``.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_attention_heads", "depth", "patch_size", "num_register_tokens"):
            value, minimum = getattr(self, name), 0 if name == "num_register_tokens" else 1
            if type(value) is not int or value < minimum:  # a JSON string or float would fail much later
                raise ValueError(f"config field {name} must be an integer >= {minimum}, got {value!r}")
        for name in ("mlp_ratio", "rope_base", "rope_total_length", "layer_norm_eps"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not value > 0:
                raise ValueError(f"config field {name} must be a number > 0, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 8:
            raise ValueError(f"head_dim ({self.head_dim}) must be a multiple of 8 for the 3D-RoPE layout")
        if self.ffn_layer not in ("mlp", "swiglu"):
            raise ValueError(f"ffn_layer must be 'mlp' or 'swiglu', got {self.ffn_layer!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> OmniStreamConfig:
        """``debug`` (tests), ``small`` (ViT-S/16), ``base`` (ViT-B/16), ``large`` (the published ViT-L/16)."""
        presets = {
            "debug": dict(hidden_size=64, num_attention_heads=4, depth=2),
            "small": dict(hidden_size=384, num_attention_heads=6, depth=12),
            "base": dict(hidden_size=768, num_attention_heads=12, depth=12),
            "large": dict(hidden_size=1024, num_attention_heads=16, depth=24),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmniStreamConfig:
        """Reads the authors' config.json (or ours, which is a superset of it)."""
        if not isinstance(data, dict):
            raise ValueError(f"a backbone config must be a JSON object, got a {type(data).__name__}")
        data = dict(data)
        kwargs: dict[str, Any] = {}
        for src, dst in _AUTHOR_FIELDS.items():
            if src in data:
                kwargs[dst] = data.pop(src)
        ours = data.pop("omnistream", {})
        if not isinstance(ours, dict):
            raise ValueError(f"the config's 'omnistream' field must be a JSON object, got {ours!r}")
        for f in dataclasses.fields(cls):
            if f.name in ours and f.name != "extra":
                kwargs[f.name] = ours[f.name]
        kwargs["extra"] = data
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.setdefault("model_type", "vfm")
        data.setdefault("architectures", ["OmnistreamMultiFrameTransformer"])
        for src, dst in _AUTHOR_FIELDS.items():
            data[src] = getattr(self, dst)
        # Our own, non-published knobs live under one key that the authors' code ignores.
        data["omnistream"] = {
            "num_register_tokens": self.num_register_tokens,
            "rope_base": self.rope_base,
            "rope_total_length": self.rope_total_length,
            "layer_norm_eps": self.layer_norm_eps,
        }
        return data

    @classmethod
    def from_json_file(cls, path: str | Path) -> OmniStreamConfig:
        with open(path, encoding="utf-8") as fh:
            try:
                return cls.from_dict(json.load(fh))
            except ValueError as exc:  # JSONDecodeError is one too
                raise ValueError(f"{path}: {exc}") from exc

    def to_json_file(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")
