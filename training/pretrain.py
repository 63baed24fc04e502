"""Multi-task pretraining (paper section 3.3 / 4.2): ``omnistream train pretrain``.

One optimiser step interleaves the enabled tasks with gradient accumulation, then updates once:

    SSL on images (T = 1)  ->  backward(0.1 * L_ssl_img / n_ssl)
    SSL on video clips     ->  backward(0.1 * L_ssl_vid / n_ssl)
    geometry on clips      ->  backward(L_geo)        (heads on causal clips, normalised ground truth)
    captioning on images   ->  backward(L_cap)        (projector + Qwen3, gradients into the backbone)
    all-reduce gradients (mean over ranks), clip, Adam step (warm-up + cosine, no weight decay), EMA teacher

Randomness (data order, crops, masks, RoPE rescaling) is drawn from a generator seeded by (seed, step,
rank), so a run resumed from a checkpoint repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omnistream_perception.model import IMAGENET_MEAN, IMAGENET_STD, OmniStreamModel

from .augment import multiblock_masks, random_patch_masks, random_resized_crop, rope_coordinate_scale
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import PretrainConfig, warmup_cosine
from .data import (
    CaptionJSONL,
    GeometryFolder,
    ImageFolder,
    TabletopCaptions,
    VideoFolder,
    collate,
    rescale_intrinsics,
    sample_indices,
)
from .distributed import (
    DistributedContext,
    average_gradients,
    broadcast_parameters,
    gather_strings,
    init_distributed,
    mean_across_ranks,
    shutdown_distributed,
    weights_digest,
)
from .geometry_targets import normalised_geometry_targets
from .losses import geometry_loss
from .metrics import MetricsLogger
from .ssl import DINOHead, SSLWeights, ema_update, ssl_losses
from .synthetic import SyntheticTabletopStandIn


def normalise(rgb: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB (..., 3, H, W) -> ImageNet-normalised (normalisation lives outside the model)."""
    mean = torch.tensor(IMAGENET_MEAN, device=rgb.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=rgb.device).view(3, 1, 1)
    return (rgb - mean) / std


def build_backbone(config: PretrainConfig) -> OmniStreamModel:
    path = Path(config.backbone).expanduser()
    if config.backbone in ("debug", "small", "base", "large"):
        if config.init_dinov3:
            from omnistream_perception.model import OmniStreamConfig

            shape = OmniStreamConfig.preset(config.backbone)
            for key, value in config.backbone_overrides.items():
                setattr(shape, key, value)
            return OmniStreamModel.from_dinov3(shape, config.init_dinov3)
        return OmniStreamModel.from_preset(config.backbone, **config.backbone_overrides)
    if path.is_dir() or config.backbone.count("/") == 1:
        return OmniStreamModel.from_pretrained(config.backbone).train()
    raise ValueError(
        f"backbone must be a preset (debug|small|base|large) or a checkpoint directory, got {config.backbone!r}"
    )


# ------------------------------------------------------------------------------------------------------
# Data views over the sources
# ------------------------------------------------------------------------------------------------------
class FramesOf:
    """Single frames (T = 1 images) of a clip dataset; item k = frame k % T of clip k // T."""

    def __init__(self, clips, frames: int, with_caption: bool = False) -> None:
        self.clips, self.frames, self.with_caption = clips, frames, with_caption

    def __len__(self) -> int:
        return len(self.clips) * self.frames

    def __getitem__(self, i: int) -> dict:
        item = self.clips[i // self.frames]
        t = i % item["rgb"].shape[0]
        out = {"rgb": item["rgb"][t : t + 1]}
        if self.with_caption:
            out["caption"] = item["caption"]
        return out


class PretrainData:
    """The four streams the objectives read; each is an indexable dataset of dicts."""

    def __init__(self, config: PretrainConfig) -> None:
        size = config.source_size or max(s for _, s in config.stages)
        t = config.clip_frames
        if config.geometry_data:
            clips = GeometryFolder(config.geometry_data, t, size)
        else:
            with torch.random.fork_rng():
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # tiny ops: threads only add overhead here
                clips = SyntheticTabletopStandIn(config.synthetic_sequences, t, size, seed=config.seed + 12345)
                torch.set_num_threads(threads)
        self.clips = clips
        self.images = ImageFolder(config.images, size) if config.images else FramesOf(clips, t)
        self.videos = VideoFolder(config.videos, t, size) if config.videos else clips
        if config.captions and Path(config.captions).is_dir():
            self.captions = TabletopCaptions(config.captions, size)
        elif config.captions:
            self.captions = CaptionJSONL(config.captions, size)
        else:
            self.captions = FramesOf(clips, t, True)
        if (
            config.captioning
            and not config.captions
            and not any(clips[i]["caption"] for i in range(min(4, len(clips))))
        ):
            raise ValueError(
                "captioning is on but the geometry sequences carry no caption.txt; pass --captions FILE.jsonl "
                "(or a tabletop demonstrations directory) or --no-captioning"
            )

    def batch(self, source, step: int, rank: int, world: int, size: int, seed: int, stream: int) -> dict:
        return collate([source[i] for i in sample_indices(len(source), step, rank, world, size, seed, stream)])


# ------------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------------
class Pretrainer:
    def __init__(self, config: PretrainConfig, out_dir: str | Path, ctx: DistributedContext | None = None) -> None:
        from omnistream_perception.model.heads import GeometryHeads, GeometryHeadsConfig

        from .captioning import Captioner

        self.config = config
        self.out_dir = Path(out_dir)
        self.ctx = ctx or DistributedContext()
        torch.manual_seed(config.seed)
        backbone = build_backbone(config)
        config.validate(backbone.config.patch_size)
        dim = backbone.config.hidden_size
        student = nn.ModuleDict({"backbone": backbone})
        if config.ssl_images or config.ssl_videos:
            student["dino_head"] = DINOHead(dim, config.head_hidden, config.head_bottleneck, config.prototypes)
            student["ibot_head"] = DINOHead(dim, config.head_hidden, config.head_bottleneck, config.prototypes)
        if config.geometry:
            heads_cfg = GeometryHeadsConfig.for_backbone(dim, backbone.config.depth, config.heads_size)
            student["geometry_heads"] = GeometryHeads(heads_cfg)
        if config.captioning:
            student["captioner"] = Captioner(dim, config.captioner, seed=config.seed)
        if config.freeze_backbone:
            backbone.requires_grad_(False).eval()
        self.student = student.to(self.ctx.device).train()
        if config.freeze_backbone:
            backbone.eval()
        self.teacher = None
        self.gram_teacher = None
        if "dino_head" in student:
            self.teacher = nn.ModuleDict({k: copy.deepcopy(student[k]) for k in ("backbone", "dino_head", "ibot_head")})
            self.teacher.requires_grad_(False).eval()
            if config.gram and config.ssl_images:
                self.gram_teacher = copy.deepcopy(backbone).requires_grad_(False).eval()
        broadcast_parameters(self.student, self.ctx)
        if self.teacher is not None:
            broadcast_parameters(self.teacher, self.ctx)
        if self.gram_teacher is not None:
            broadcast_parameters(self.gram_teacher, self.ctx)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.data = PretrainData(config)
        self.weights = SSLWeights(
            koleo=config.koleo_weight,
            gram=1.0 if config.gram else 0.0,
            student_temperature=config.student_temperature,
            teacher_temperature=config.teacher_temperature,
        )
        self.step = 0

    # -- checkpoints ----------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        mods = {"student": self.student}
        if self.teacher is not None:
            mods["teacher"] = self.teacher
        return mods

    def save(self) -> Path | None:
        if not self.ctx.is_main:
            return None
        directory = self.out_dir / "checkpoints" / f"step-{self.step:06d}"
        scalars = {
            "step": self.step,
            "world_size": self.ctx.world_size,
            "config": self.config.to_dict(),
            "lr": self.current_lr(),
        }
        return save_checkpoint(directory, self.modules(), self.optimizer, scalars, keep=self.config.keep_checkpoints)

    def resume(self, checkpoint: str | Path) -> int:
        path = Path(checkpoint)
        if path.name == "checkpoints" or (path / "checkpoints").is_dir():
            found = latest_checkpoint(path if path.name == "checkpoints" else path / "checkpoints")
            if found is None:
                raise FileNotFoundError(f"no checkpoint below {path}")
            path = found
        scalars = load_checkpoint(path, self.modules(), self.optimizer)
        if scalars.get("world_size", 1) != self.ctx.world_size:
            raise ValueError(
                f"{path} was written by {scalars['world_size']} processes; resume with the same number "
                f"(got {self.ctx.world_size}) so that data order and batch statistics match"
            )
        self.step = int(scalars["step"])
        return self.step

    def current_lr(self) -> float:
        c = self.config
        return c.lr * warmup_cosine(self.step, c.warmup_steps, c.max_steps, c.min_lr_ratio)

    def ema_momentum(self) -> float:
        c = self.config
        progress = min(1.0, self.step / max(1, c.max_steps))
        return 1.0 - (1.0 - c.ema_momentum) * (math.cos(math.pi * progress) + 1) / 2

    # -- one step -------------------------------------------------------------------------------------
    def _views(self, clips: torch.Tensor, gen: torch.Generator, video: bool):
        c = self.config
        size = c.stage_size(self.step)
        p = self.student["backbone"].config.patch_size
        local = max(p, (size // 2) // p * p)
        globals_ = [normalise(random_resized_crop(clips, size, c.global_crop_scale, gen)) for _ in range(2)]
        locals_ = [normalise(random_resized_crop(clips, local, c.local_crop_scale, gen)) for _ in range(c.local_crops)]
        b, t = clips.shape[:2]
        grid = (size // p, size // p)
        if video:
            masks = [multiblock_masks(b, t, grid, gen) for _ in range(2)]
        else:
            masks = [random_patch_masks(b, grid, gen)[:, None] for _ in range(2)]
        dev = self.ctx.device
        return [g.to(dev) for g in globals_], [v.to(dev) for v in locals_], [m.to(dev) for m in masks]

    def _ssl(self, clips: torch.Tensor, gen, rope, video: bool) -> dict[str, torch.Tensor]:
        g, loc, masks = self._views(clips, gen, video)
        s = self.student
        return ssl_losses(
            s["backbone"], s["dino_head"], s["ibot_head"],
            self.teacher["backbone"], self.teacher["dino_head"], self.teacher["ibot_head"],
            self.gram_teacher, g, loc, masks, self.weights, rope, images=not video,
        )  # fmt: skip

    def _geometry(self, batch: dict, rope) -> dict[str, torch.Tensor]:
        size = self.config.stage_size(self.step)
        rgb, depth, k = batch["rgb"], batch["depth"], batch["intrinsics"].clone()
        b, t, _, h, w = rgb.shape
        if (h, w) != (size, size):
            rgb = F.interpolate(rgb.flatten(0, 1), size=(size, size), mode="bilinear", antialias=True).view(
                b, t, 3, size, size
            )
            depth = F.interpolate(depth.flatten(0, 1)[:, None], size=(size, size), mode="nearest").view(
                b, t, size, size
            )
            k = rescale_intrinsics(k, size / w, size / h)
        dev = self.ctx.device
        targets = normalised_geometry_targets(depth, k, batch["cam_to_world"])
        targets = {key: v.to(dev) for key, v in targets.items()}
        heads = self.student["geometry_heads"]
        frozen = self.config.freeze_backbone
        with torch.set_grad_enabled(not frozen):  # probing: frozen features at inference coordinates
            out = self.student["backbone"](
                normalise(rgb).to(dev),
                camera_token=True,
                output_hidden_states=heads.layers,
                rope_coord_scale=None if frozen else rope,
            )
        pred = heads(out, (size, size))
        return geometry_loss(pred, targets, alpha=self.config.depth_alpha)

    def _caption(self, batch: dict, rope) -> torch.Tensor:
        size = self.config.stage_size(self.step)
        rgb = batch["rgb"]
        b, t = rgb.shape[:2]
        if rgb.shape[-1] != size:
            rgb = F.interpolate(rgb.flatten(0, 1), size=(size, size), mode="bilinear", antialias=True).view(
                b, t, 3, size, size
            )
        out = self.student["backbone"](
            normalise(rgb).to(self.ctx.device), output_hidden_states=False, rope_coord_scale=rope
        )
        tokens = out.last_hidden_state.flatten(1, 2)  # (B, T*h*w, D)
        return self.student["captioner"](tokens, batch["caption"])

    def train_step(self) -> dict[str, float]:
        c, ctx, step = self.config, self.ctx, self.step
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + step * 1009 + ctx.rank)
        rope = rope_coordinate_scale(gen) if c.rope_rescaling else None
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        total = 0.0
        n_ssl = int(c.ssl_images) + int(c.ssl_videos)
        ssl_sum = 0.0
        data = self.data
        if c.ssl_images:
            batch = data.batch(data.images, step, ctx.rank, ctx.world_size, c.batch_images, c.seed, 1)
            terms = self._ssl(batch["rgb"], gen, rope, video=False)
            (c.lambda_ssl * terms["ssl"] / n_ssl).backward()
            ssl_sum += terms["ssl"].item()
            for key in ("dino", "ibot", "koleo", "gram"):
                if key in terms:
                    logs[f"img_{key}"] = terms[key].item()
        if c.ssl_videos:
            batch = data.batch(data.videos, step, ctx.rank, ctx.world_size, c.batch_videos, c.seed, 2)
            terms = self._ssl(batch["rgb"], gen, rope, video=True)
            (c.lambda_ssl * terms["ssl"] / n_ssl).backward()
            ssl_sum += terms["ssl"].item()
            for key in ("dino", "ibot", "koleo"):
                logs[f"vid_{key}"] = terms[key].item()
        if n_ssl:
            logs["ssl"] = ssl_sum / n_ssl
            total += c.lambda_ssl * logs["ssl"]
        if c.geometry:
            batch = data.batch(data.clips, step, ctx.rank, ctx.world_size, c.batch_geometry, c.seed, 3)
            terms = self._geometry(batch, rope)
            (c.lambda_geo * terms["geo"]).backward()
            for key, value in terms.items():
                logs[key] = value.item()
            total += c.lambda_geo * logs["geo"]
        if c.captioning:
            batch = data.batch(data.captions, step, ctx.rank, ctx.world_size, c.batch_captions, c.seed, 4)
            loss = self._caption(batch, rope)
            (c.lambda_cap * loss).backward()
            logs["cap"] = loss.item()
            total += c.lambda_cap * logs["cap"]
        logs["loss"] = total
        average_gradients(self.params, ctx)
        if c.grad_clip:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip))
        self.optimizer.step()
        if self.teacher is not None:
            ema_update(self.teacher, nn.ModuleDict({k: self.student[k] for k in self.teacher}), self.ema_momentum())
        self.step += 1
        logs = mean_across_ranks(logs, ctx)
        logs["lr"] = lr
        return logs

    # -- export -----------------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """The backbone (authors' layout) with the geometry heads beside it, and the captioner."""
        directory = Path(directory)
        self.student["backbone"].save_pretrained(directory)
        if "geometry_heads" in self.student:
            self.student["geometry_heads"].save_pretrained(directory)
        if "captioner" in self.student:
            self.student["captioner"].save_pretrained(directory / "captioner")
        return directory


def run_pretraining(
    config: PretrainConfig,
    out_dir: str | Path,
    resume: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    export_dir: str | Path | None = None,
    heads_only: bool = False,
) -> dict:
    """The whole command: train, checkpoint every ``save_every`` steps, export to ``export_dir``
    (default ``<out>/backbone``); ``heads_only`` writes just the geometry heads there (head probing)."""
    from tqdm.auto import tqdm

    ctx = init_distributed(device)
    try:
        out = Path(out_dir)
        trainer = Pretrainer(config, out, ctx)
        start = trainer.resume(resume) if resume else 0
        logger = MetricsLogger(out, enabled=ctx.is_main, resume_step=start if resume else None)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "pretrain_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        bar = tqdm(
            total=config.max_steps,
            initial=start,
            desc="heads" if heads_only else "pretrain",
            disable=not (progress and ctx.is_main),
        )
        began = time.perf_counter()
        logs: dict[str, float] = {}
        while trainer.step < config.max_steps:
            logs = trainer.train_step()
            if trainer.step % config.log_every == 0 or trainer.step == config.max_steps:
                logger.log(trainer.step, logs)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
            if config.save_every and trainer.step % config.save_every == 0:
                trainer.save()
        bar.close()
        if config.save_every and trainer.step % config.save_every:
            trainer.save()
        seconds = time.perf_counter() - began
        # every rank's weights fingerprint, so a run can show the replicas never drifted apart
        digests = gather_strings(weights_digest(trainer.student), ctx)
        if ctx.is_main:
            (out / "rank_weights_sha256.json").write_text(json.dumps(digests, indent=2) + "\n")
        export = None
        if ctx.is_main:
            export = Path(export_dir) if export_dir else out / "backbone"
            if heads_only:
                trainer.student["geometry_heads"].save_pretrained(export)
            else:
                trainer.export(export)
        logger.close()
        return {
            "steps": trainer.step,
            "seconds": seconds,
            "final": logs,
            "backbone": str(export) if export else None,
            "rank_digests": digests,
        }
    finally:
        shutdown_distributed()
