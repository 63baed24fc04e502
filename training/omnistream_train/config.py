"""Configurations of the training commands, with named presets (``debug`` for tests, ``demo`` for
``make demo`` on 2 CPU cores, ``paper`` for the published recipe's hyper-parameters).

Each config is a dataclass; ``from_preset(name, **overrides)`` builds one, ``to_dict``/``from_dict`` round
trip through the JSON written into every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from .captioning import CaptionerConfig


def apply_overrides(config, overrides: dict[str, Any]):
    """Set the fields named in ``overrides`` (None = keep the preset's); a name that is no field is a ValueError."""
    names = {f.name for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in names:
            raise ValueError(f"{type(config).__name__} has no field {key!r}; fields: {sorted(names)}")
        setattr(config, key, value)
    return config


@dataclass
class PretrainConfig:
    # backbone: a preset name (random init) or a checkpoint directory / hub id to start from (paper: DINOv3)
    backbone: str = "debug"
    backbone_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"hidden_size": 128, "depth": 4}
    init_dinov3: str | None = None  # DINOv3 weights (file or HF directory) for a preset backbone, as the paper
    heads_size: str = "auto"  # GeometryHeadsConfig.for_backbone size
    freeze_backbone: bool = False  # head probing: only the heads train, on frozen features
    # objectives (each can be switched off: the paper's ablations)
    ssl_images: bool = True
    ssl_videos: bool = True
    geometry: bool = True
    captioning: bool = True
    gram: bool = True
    lambda_ssl: float = 0.1
    lambda_geo: float = 1.0
    lambda_cap: float = 1.0
    koleo_weight: float = 0.1
    depth_alpha: float = 0.2
    # self-distillation
    prototypes: int = 256
    head_hidden: int = 256
    head_bottleneck: int = 64
    local_crops: int = 2
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.1, 0.4)
    ema_momentum: float = 0.992  # cosine ramp to 1.0 over training
    student_temperature: float = 0.1
    teacher_temperature: float = 0.05
    # resolution stages: [start step, global crop size]; local crops are half the global size (>= 1 patch)
    stages: list[list[int]] = field(default_factory=lambda: [[0, 224], [60000, 512]])
    clip_frames: int = 16
    # GLOBAL batches (all processes x accumulation together; distributed.micro_batch gives a rank's share)
    batch_images: int = 8
    batch_videos: int = 8
    batch_geometry: int = 8
    batch_captions: int = 8
    rope_rescaling: bool = True
    # optimisation
    lr: float = 1e-4
    warmup_steps: int = 4000
    min_lr_ratio: float = 0.01
    max_steps: int = 180000
    grad_clip: float | None = 3.0
    # captioning decoder
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    # data: None = the built-in scenes (the synthetic stand-in unless a geometry directory is given)
    images: str | None = None
    videos: str | None = None
    geometry_data: str | None = None
    captions: str | None = None
    synthetic_sequences: int = 64
    source_size: int | None = None  # frames are loaded at this size (default: the largest stage)
    # bookkeeping
    seed: int = 0
    save_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 1

    @classmethod
    def from_preset(cls, name: str, **overrides) -> PretrainConfig:
        presets: dict[str, dict[str, Any]] = {
            "paper": dict(backbone="large"),
            "debug": dict(
                backbone="debug",
                heads_size="tiny",
                prototypes=64,
                head_hidden=64,
                head_bottleneck=32,
                local_crops=1,
                ema_momentum=0.9,
                stages=[[0, 32], [12, 48]],
                clip_frames=3,
                batch_images=2,
                batch_videos=2,
                batch_geometry=2,
                batch_captions=2,
                lr=1e-3,
                warmup_steps=3,
                max_steps=20,
                synthetic_sequences=8,
                save_every=10,
                captioner=CaptionerConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, max_caption_tokens=64),
            ),
            "demo": dict(
                backbone="debug",
                backbone_overrides={"hidden_size": 128, "num_attention_heads": 4, "depth": 4},
                heads_size="tiny",
                prototypes=128,
                head_hidden=128,
                head_bottleneck=64,
                local_crops=1,
                ema_momentum=0.98,
                stages=[[0, 64]],
                clip_frames=4,
                batch_images=4,
                batch_videos=2,
                batch_geometry=4,
                batch_captions=4,
                lr=5e-4,
                warmup_steps=20,
                max_steps=300,
                synthetic_sequences=48,
                save_every=100,
                captioner=CaptionerConfig(hidden_size=64, layers=2, heads=4, kv_heads=2, max_caption_tokens=96),
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown pretraining preset {name!r}; choose one of {sorted(presets)}")
        return apply_overrides(cls(**presets[name]), overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        data = dict(data)
        data["captioner"] = CaptionerConfig(**data.get("captioner", {}))
        data["global_crop_scale"] = tuple(data.get("global_crop_scale", (0.4, 1.0)))
        data["local_crop_scale"] = tuple(data.get("local_crop_scale", (0.1, 0.4)))
        return cls(**data)

    def stage_size(self, step: int) -> int:
        size = self.stages[0][1]
        for start, s in self.stages:
            if step >= start:
                size = s
        return size

    def validate(self, patch_size: int) -> None:
        if not any([self.ssl_images, self.ssl_videos, self.geometry, self.captioning]):
            raise ValueError(
                "every objective is switched off: enable at least one of ssl images/videos, geometry, captioning"
            )
        for start, size in self.stages:
            if size % patch_size or size < 2 * patch_size:
                raise ValueError(
                    f"stage size {size} (from step {start}) must be a multiple of {patch_size} and >= {2 * patch_size}"
                )
        if self.clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {self.clip_frames}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


# The question kinds generated from the tabletop's ground truth (omnistream_train.vlm_data.TABLETOP_QUESTIONS).
VLM_QUESTIONS = ("which_colour", "where", "caption", "holds", "moved", "task")


@dataclass
class VLMTrainConfig:
    """``omnistream train vlm``: the vision-language stage before the VLA (LLaVA-style, see training/omnistream_train/vlm.py).

    The architecture fields (``policy_preset``, ``policy_overrides``, ``backbone*``, ``cameras``, ``features``) mean
    what they mean for ``VLATrainConfig`` and build the projector and LLM through the same code, so a VLM output
    starts a VLA of the same preset (``train vla --init-vlm``)."""

    policy_preset: str = "debug"  # OmniStreamVLAConfig preset: debug | qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-7b
    policy_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"llm": "<Qwen2.5 directory>"}
    backbone: str | None = None  # backbone directory; None = a random backbone of ``backbone_preset``
    backbone_preset: str = "debug"
    cameras: list[str] = field(default_factory=lambda: ["static"])
    features: str = "frame"  # frame | stream (as VLATrainConfig.features)
    feature_batch: int = 32
    init_vlm: str | None = None  # start from a VLM output (e.g. stage 2 after a stage-1 run)
    # LLaVA's two stages: 1 = align the projector (LLM frozen), 2 = instruction tuning (projector and LLM).
    # [1, 2] runs both in one schedule: stage 1 for ``stage1_steps``, stage 2 for the rest of ``max_steps``.
    stages: list[int] = field(default_factory=lambda: [1, 2])
    stage1_steps: int = 200
    max_steps: int = 1000
    batch_size: int = 32
    stage1_lr: float = 1e-3  # the projector in stage 1 (LLaVA-1.5)
    projector_lr: float = 2e-5  # the projector in stage 2
    lr: float = 2e-5  # the LLM in stage 2
    warmup_steps: int = 30  # per stage
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPUs that support it) | bf16 | fp32
    # question kinds from tabletop demonstrations (VLM_QUESTIONS); "moved" needs features="stream" (one frame
    # alone does not show what moved since the episode began)
    questions: list[str] = field(default_factory=lambda: [q for q in VLM_QUESTIONS if q != "moved"])
    frame_stride: int = 1  # every n-th frame of each episode becomes a sample
    eval_dataset: str | None = None  # held-out tabletop demonstrations: grounding accuracy at the end
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VLMTrainConfig:
        from .vla import VLATrainConfig

        def like_vla(vla_preset: str) -> dict[str, Any]:
            """The architecture of a VLA preset, so the VLM's projector and LLM fit that VLA."""
            vla = VLATrainConfig.from_preset(vla_preset)
            return dict(
                policy_preset=vla.policy_preset,
                policy_overrides=dict(vla.policy_overrides),
                backbone_preset=vla.backbone_preset,
                cameras=list(vla.cameras),
                features=vla.features,
            )

        real = dict(stage1_steps=2000, max_steps=10000, batch_size=16, backbone_preset="large")
        presets: dict[str, dict[str, Any]] = {
            # tiny models learn at larger rates than LLaVA's (which are for a 7B LLM)
            "debug": dict(like_vla("debug"), stage1_steps=100, max_steps=400, batch_size=32, stage1_lr=3e-3,
                          projector_lr=2e-3, lr=2e-3, warmup_steps=20, min_lr_ratio=0.01, save_every=200),
            # the architecture of the demo VLA (128 px, unpooled tokens, visual positions) on its demonstrations
            "demo": dict(like_vla("demo"), stage1_steps=300, max_steps=1500, batch_size=32, stage1_lr=3e-3,
                         projector_lr=2e-3, lr=1e-3, warmup_steps=30, min_lr_ratio=0.01, save_every=500,
                         frame_stride=2),
            "qwen2.5-0.5b": dict(real, policy_preset="qwen2.5-0.5b"),
            "qwen2.5-1.5b": dict(real, policy_preset="qwen2.5-1.5b"),
            "qwen2.5-7b": dict(real, policy_preset="qwen2.5-7b"),
            "paper": dict(like_vla("paper"), **{k: v for k, v in real.items() if k != "backbone_preset"}),
        }  # fmt: skip
        if name not in presets:
            raise ValueError(f"unknown VLM preset {name!r}; choose one of {sorted(presets)}")
        config = apply_overrides(cls(**presets[name]), overrides)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.stages or any(s not in (1, 2) for s in self.stages) or sorted(set(self.stages)) != self.stages:
            raise ValueError(f"stages must be [1], [2] or [1, 2], got {self.stages}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.stages == [1, 2] and not 0 < self.stage1_steps < self.max_steps:
            raise ValueError(f"stage1_steps ({self.stage1_steps}) must be in (0, max_steps={self.max_steps})")
        unknown = [q for q in self.questions if q not in VLM_QUESTIONS]
        if unknown:
            raise ValueError(f"unknown question kinds {unknown}; choose from {list(VLM_QUESTIONS)}")
        if "moved" in self.questions and self.features != "stream":
            raise ValueError("the 'moved' questions need features='stream' (one frame alone does not show motion)")
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {self.frame_stride}")

    def stage_at(self, step: int) -> int:
        """The stage that optimiser step ``step`` (0-based) belongs to."""
        if self.stages == [1, 2]:
            return 1 if step < self.stage1_steps else 2
        return self.stages[0]

    def stage_span(self, step: int) -> tuple[int, int]:
        """(first step, number of steps) of the stage ``step`` is in: each stage has its own warm-up + cosine."""
        if self.stages == [1, 2]:
            if step < self.stage1_steps:
                return 0, self.stage1_steps
            return self.stage1_steps, self.max_steps - self.stage1_steps
        return 0, self.max_steps


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine down to ``min_ratio`` at ``total``."""
    import math

    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
