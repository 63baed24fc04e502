"""Geometry heads (paper section 3.3): a dual-DPT depth/ray head and a camera head, saved beside the backbone.

The published checkpoint holds the backbone only; heads come from ``omnistream train heads`` (or
pretraining) and live in ``geometry_heads.json`` + ``geometry_heads.safetensors`` in the checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..modeling_omnistream import OmniStreamOutput, load_safetensors, load_state_dict_strict
from .camera_head import CameraHead
from .dpt_head import DPTHead

HEADS_CONFIG_NAME = "geometry_heads.json"
HEADS_WEIGHTS_NAME = "geometry_heads.safetensors"


class MissingHeadsError(FileNotFoundError):
    """The checkpoint has no geometry heads (the published one ships the backbone only)."""


@dataclass
class GeometryHeadsConfig:
    hidden_size: int = 1024
    layers: list[int] = field(default_factory=lambda: [4, 11, 17, 23])  # backbone blocks feeding the DPTs
    features: int = 256
    channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    camera_hidden: int = 512

    @classmethod
    def for_backbone(cls, hidden_size: int, depth: int, size: str = "auto") -> GeometryHeadsConfig:
        """Four evenly spread layers ending at the last block; widths scaled to the backbone."""
        layers = [max(0, round(depth * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)]
        if size == "auto":
            size = "large" if hidden_size >= 768 else ("small" if hidden_size >= 256 else "tiny")
        widths = {
            "tiny": (32, (16, 32, 64, 64), 64),
            "small": (64, (48, 96, 192, 192), 256),
            "large": (256, (256, 512, 1024, 1024), 512),
        }
        features, channels, camera_hidden = widths[size]
        return cls(hidden_size, layers, features, channels, camera_hidden)


class GeometryHeads(nn.Module):
    """Depth (+ confidence) and ray maps from four layers' patch tokens; pose from the camera token."""

    def __init__(self, config: GeometryHeadsConfig) -> None:
        super().__init__()
        self.config = config
        dim, feats, chans = config.hidden_size, config.features, tuple(config.channels)
        self.depth_head = DPTHead(dim, 2, feats, chans)  # depth, confidence
        self.ray_head = DPTHead(dim, 6, feats, chans)  # origin, direction
        self.camera_head = CameraHead(dim, config.camera_hidden)

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def forward(
        self, output: OmniStreamOutput, image_size: tuple[int, int], *, rays: bool = True
    ) -> dict[str, torch.Tensor]:
        """``output`` must come from ``model(..., output_hidden_states=heads.layers)`` (camera_token=True for pose).

        Returns depth (B,T,H,W) > 0, depth_conf (B,T,H,W) > 1, and when asked rays (B,T,H,W,6) and
        points (B,T,H,W,3); pose_enc (B,T,9) when the camera token is present.
        """
        if output.hidden_states is None or len(output.hidden_states) != 4:
            raise ValueError(f"the geometry heads need the hidden states of layers {self.layers}: "
                             f"call the backbone with output_hidden_states={self.layers}")  # fmt: skip
        b, t = output.pooler_output.shape[:2]
        start = output.patch_start_idx
        tokens = [hs[:, :, start:].reshape(b * t, -1, hs.shape[-1]) for hs in output.hidden_states]
        out: dict[str, torch.Tensor] = {}
        raw = self.depth_head(tokens, output.grid_size, image_size)
        out["depth"] = torch.exp(raw[:, 0].clamp(max=20)).reshape(b, t, *image_size)
        out["depth_conf"] = (1 + torch.exp(raw[:, 1].clamp(max=20))).reshape(b, t, *image_size)
        if rays:
            ray = self.ray_head(tokens, output.grid_size, image_size).permute(0, 2, 3, 1)
            out["rays"] = ray.reshape(b, t, *image_size, 6)
            out["points"] = out["rays"][..., :3] + out["depth"][..., None] * out["rays"][..., 3:]
        if output.camera_token is not None:
            out["pose_enc"] = self.camera_head(output.camera_token)
        return out

    # -- IO beside the backbone -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        cfg["channels"] = list(cfg["channels"])
        (directory / HEADS_CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / HEADS_WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @staticmethod
    def present(directory: str | Path) -> bool:
        d = Path(directory)
        return (d / HEADS_CONFIG_NAME).is_file() and (d / HEADS_WEIGHTS_NAME).is_file()

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GeometryHeads:
        directory = Path(directory)
        if not cls.present(directory):
            raise MissingHeadsError(
                f"{directory} has no geometry heads ({HEADS_CONFIG_NAME} + {HEADS_WEIGHTS_NAME}); the published "
                "OmniStream checkpoint ships the backbone only. Train them with "
                f"`omnistream train heads --checkpoint {directory}`, or run features-only."
            )
        try:
            cfg = json.loads((directory / HEADS_CONFIG_NAME).read_text())
        except ValueError as exc:
            raise ValueError(f"{directory / HEADS_CONFIG_NAME} is not valid JSON: {exc}") from exc
        known = {f.name for f in dataclasses.fields(GeometryHeadsConfig)}
        if not isinstance(cfg, dict) or set(cfg) - known:
            unknown = sorted(set(cfg) - known) if isinstance(cfg, dict) else type(cfg).__name__
            raise ValueError(f"{directory / HEADS_CONFIG_NAME}: unknown {unknown}; expected keys {sorted(known)}")
        cfg["channels"] = tuple(cfg.get("channels", GeometryHeadsConfig.channels))
        heads = cls(GeometryHeadsConfig(**cfg))
        weights = directory / HEADS_WEIGHTS_NAME
        load_state_dict_strict(heads, load_safetensors(weights), source=str(weights))
        return heads.eval()


__all__ = ["CameraHead", "DPTHead", "GeometryHeads", "GeometryHeadsConfig", "MissingHeadsError"]
