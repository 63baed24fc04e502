"""Creates a fresh (random-init projector/query/head) policy directory: what `omnistream vla init` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..normalization import ActionNormalizer
from .configuration_omnistream_vla import OmniStreamVLAConfig
from .modeling_omnistream_vla import OmniStreamVLAPolicy, build_llm


def init_policy(
    out: str | Path,
    preset: str = "debug",
    backbone: str | Path | None = None,
    llm: str | None = None,
    stats: str | Path | None = None,
    normalization: str | None = None,
    copy_backbone: bool = True,
    random_llm: bool = False,
    seed: int = 0,
    **overrides: Any,
) -> OmniStreamVLAPolicy:
    """Builds the policy of ``preset`` on ``backbone`` and saves it to ``out``.

    backbone: an OmniStream checkpoint (directory or hub id); its width sets ``vision_hidden_size``. Copied into
        ``out/backbone`` (``copy_backbone``) or referenced as given. None: features-only policy.
    llm: a Qwen2/Qwen2.5 hub id or directory replacing the preset's; ``random_llm`` builds the preset's shape
        with random weights instead (benchmarks, tests; no download).
    stats: a LeRobot ``meta/stats.json`` for the action normalisation (mode ``normalization``, default the
        preset's); without it the arm dims are assumed to be in [-1, 1] already (identity).
    """
    torch.manual_seed(seed)
    config = OmniStreamVLAConfig.preset(preset, **overrides)
    if llm is not None:
        config.llm = str(llm)
    backbone_model = None
    if backbone is not None:
        from omnistream_perception.model import OmniStreamModel

        backbone_model = OmniStreamModel.from_pretrained(str(backbone))
        config.vision_hidden_size = backbone_model.config.hidden_size
        config.patch_size = backbone_model.config.patch_size
        config.backbone = "backbone" if copy_backbone else str(backbone)
    else:
        config.backbone = None
    mode = normalization or config.normalization_mode
    if stats is not None:
        normalizer = ActionNormalizer.from_lerobot_stats(stats, mode, config.arm_dims)
    else:
        normalizer = ActionNormalizer.identity(config.arm_dims)
    policy = OmniStreamVLAPolicy(
        config,
        llm=build_llm(config, random_weights=random_llm),
        normalizer=normalizer,
        backbone=backbone_model if copy_backbone else None,
    )
    policy.save_pretrained(out, save_llm=config.llm == "debug" or random_llm)
    return policy
