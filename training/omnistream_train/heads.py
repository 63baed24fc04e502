"""Head probing: ``omnistream train heads`` trains the depth/ray and camera heads on a FROZEN backbone.

The published checkpoint ships the backbone only; this writes ``geometry_heads.json`` +
``geometry_heads.safetensors`` beside it, so ``perception_node`` publishes depth and pose with the published
weights. It is the pretraining engine with every objective but geometry switched off and the backbone
frozen (same data readers, checkpoints, resume, torchrun, logs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import PretrainConfig, apply_overrides

_PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(heads_size="tiny", stages=[[0, 32]], clip_frames=3, batch_geometry=2, lr=1e-3, warmup_steps=2, max_steps=20, synthetic_sequences=8, save_every=10),
    "demo": dict(heads_size="tiny", stages=[[0, 64]], clip_frames=4, batch_geometry=4, lr=1e-3, warmup_steps=20, max_steps=300, synthetic_sequences=48, save_every=100),
    "paper": dict(heads_size="auto", stages=[[0, 512]], clip_frames=16, batch_geometry=8, lr=1e-4, warmup_steps=1000, max_steps=20000, save_every=1000),
}  # fmt: skip


def heads_config(preset: str, checkpoint: str | Path, **overrides) -> PretrainConfig:
    if preset not in _PRESETS:
        raise ValueError(f"unknown heads preset {preset!r}; choose one of {sorted(_PRESETS)}")
    base = dict(
        backbone=str(checkpoint),
        ssl_images=False,
        ssl_videos=False,
        captioning=False,
        gram=False,
        geometry=True,
        freeze_backbone=True,
        rope_rescaling=False,
        grad_clip=1.0,
    )
    base.update(_PRESETS[preset])
    return apply_overrides(PretrainConfig(**base), overrides)


def run_head_probing(
    checkpoint: str | Path,
    config: PretrainConfig,
    out_dir: str | Path,
    save_to: str | Path | None = None,
    resume: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    parallel=None,
) -> dict:
    """Trains the heads; saves them into ``save_to`` (default: the checkpoint directory itself).
    ``parallel``: ``distributed.ParallelOptions`` (FSDP2 shards the frozen backbone too; only the heads have
    gradients and optimiser state)."""
    from .pretrain import run_pretraining

    target = Path(save_to) if save_to else Path(checkpoint)
    if not save_to and not Path(checkpoint).is_dir():
        raise ValueError(f"{checkpoint} is not a local directory: pass --save-to DIR to choose where the heads go")
    return run_pretraining(
        config,
        out_dir,
        resume=resume,
        device=device,
        progress=progress,
        export_dir=target,
        heads_only=True,
        parallel=parallel,
    )
