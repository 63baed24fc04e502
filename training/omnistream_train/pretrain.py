"""Multi-task pretraining (paper section 3.3 / 4.2): ``omnistream train pretrain``.

One optimiser step interleaves the enabled tasks with gradient accumulation, then updates once:

    SSL on images (T = 1)  ->  backward(0.1 * L_ssl_img / n_ssl)
    SSL on video clips     ->  backward(0.1 * L_ssl_vid / n_ssl)
    geometry on clips      ->  backward(L_geo)        (heads on causal clips, normalised ground truth)
    captioning on images   ->  backward(L_cap)        (projector + Qwen3, gradients into the backbone)
    all-reduce gradients (mean over ranks), clip, Adam step (warm-up + cosine, no weight decay), EMA teacher

Every batch size is GLOBAL: each of the world x accumulation micro-batches of a step is one slice of it
(``distributed.micro_batch``). Randomness (data order, crops, masks) is drawn from a generator seeded by (seed,
step, slice), the RoPE rescaling by (seed, step), so a run resumed from a checkpoint repeats the uninterrupted run
exactly, and 1 process x accumulation 2 reads what 2 processes read. With ``ParallelOptions(fsdp=True)`` the
student, teacher and Gram teacher are FSDP2-sharded per block (``distributed.shard_module``), checkpoints are
sharded (``torch.distributed.checkpoint``) and the export is gathered into the usual safetensors layout.
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
from .checkpoint import latest_checkpoint
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
    ParallelEngine,
    ParallelOptions,
    full_state_dict,
    gather_strings,
    init_distributed,
    local_state_bytes,
    mean_across_ranks,
    shutdown_distributed,
    state_digest,
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
# (objective switch, config field of its global batch, data stream id)
_STREAMS = (("ssl_images", "batch_images", 1), ("ssl_videos", "batch_videos", 2), ("geometry", "batch_geometry", 3),
            ("captioning", "batch_captions", 4))  # fmt: skip


def build_student(config: PretrainConfig) -> nn.ModuleDict:
    """The trained modules (backbone, SSL heads, geometry heads, captioner), seeded by ``config.seed``."""
    from omnistream_perception.model.heads import GeometryHeads, GeometryHeadsConfig

    from .captioning import Captioner

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
    return student


class Pretrainer:
    def __init__(
        self,
        config: PretrainConfig,
        out_dir: str | Path,
        ctx: DistributedContext | None = None,
        parallel: ParallelOptions | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.ctx = ctx or DistributedContext()
        self.engine = ParallelEngine(self.ctx, parallel)
        self.parallel = self.engine.options
        accum = self.parallel.grad_accum
        self.micro: dict[str, int] = {}
        for switch, field_name, _ in _STREAMS:
            if getattr(config, switch):
                what = f"{field_name.replace('_', ' ')} (--batch-size)"
                self.micro[field_name] = self.engine.micro_batch(getattr(config, field_name), what)
        for switch, field_name in (("ssl_images", "batch_images"), ("ssl_videos", "batch_videos")):
            if getattr(config, switch) and self.micro[field_name] < 2:
                raise ValueError(
                    f"self-distillation needs >= 2 samples per micro-batch (KoLeo's nearest neighbour): the global "
                    f"{field_name} {getattr(config, field_name)} over {self.ctx.world_size} process(es) x "
                    f"accumulation {accum} leaves {self.micro[field_name]}; raise --batch-size"
                )
        student = build_student(config)
        backbone = student["backbone"]
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
        # every module called on its own is prepared (and, under FSDP, sharded) as its own root; the optimiser
        # is built afterwards, on the shards
        teachers = list(self.teacher.values()) if self.teacher is not None else []
        self.engine.prepare(*self.student.values(), *teachers, self.gram_teacher)
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
        directory = self.out_dir / "checkpoints" / f"step-{self.step:06d}"
        scalars = {"step": self.step, "config": self.config.to_dict(), "lr": self.current_lr()}
        return self.engine.save(directory, self.modules(), self.optimizer, scalars, self.config.keep_checkpoints)

    def resume(self, checkpoint: str | Path) -> int:
        path = Path(checkpoint)
        if path.name == "checkpoints" or (path / "checkpoints").is_dir():
            found = latest_checkpoint(path if path.name == "checkpoints" else path / "checkpoints")
            if found is None:
                raise FileNotFoundError(f"no checkpoint below {path}")
            path = found
        scalars = self.engine.load(path, self.modules(), self.optimizer)
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
        accum = self.engine.grad_accum
        slots = self.engine.slots()
        base_seed = c.seed * 1_000_003 + step * 1009
        # one RoPE rescaling per step for the whole global batch (the first draw of slice 0's stream)
        rope = rope_coordinate_scale(torch.Generator().manual_seed(base_seed)) if c.rope_rescaling else None
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(accum):
            slot = self.engine.slot(micro)
            gen = torch.Generator().manual_seed(base_seed + slot)
            if c.rope_rescaling:
                rope_coordinate_scale(gen)  # every slice's stream continues where slice 0's RoPE draw left it
            for key, value in self._micro_step(gen, rope, slot, slots, 1.0 / accum).items():
                sums[key] = sums.get(key, 0.0) + value / accum
        logs = sums
        norm = self.engine.finish_gradients(self.params, c.grad_clip)
        if norm is not None:
            logs["grad_norm"] = norm
        self.optimizer.step()
        # no-backward forwards (teachers, a frozen backbone) leave FSDP roots' whole weights gathered
        self.engine.after_step(self.student, self.teacher, self.gram_teacher)
        if self.teacher is not None:
            ema_update(self.teacher, nn.ModuleDict({k: self.student[k] for k in self.teacher}), self.ema_momentum())
        self.step += 1
        logs = mean_across_ranks(logs, ctx)
        logs["lr"] = lr
        return logs

    def _micro_step(self, gen: torch.Generator, rope, slot: int, slots: int, scale: float) -> dict[str, float]:
        """Forward + backward of every enabled objective on slice ``slot`` of the global batch (gradients
        scaled by ``scale`` = 1 / accumulation); returns the slice's logged values."""
        c, step, data, micro = self.config, self.step, self.data, self.micro
        logs: dict[str, float] = {}
        total = 0.0
        n_ssl = int(c.ssl_images) + int(c.ssl_videos)
        ssl_sum = 0.0
        if c.ssl_images:
            batch = data.batch(data.images, step, slot, slots, micro["batch_images"], c.seed, 1)
            terms = self._ssl(batch["rgb"], gen, rope, video=False)
            self._backward(scale * c.lambda_ssl * terms["ssl"] / n_ssl)
            ssl_sum += terms["ssl"].item()
            for key in ("dino", "ibot", "koleo", "gram"):
                if key in terms:
                    logs[f"img_{key}"] = terms[key].item()
        if c.ssl_videos:
            batch = data.batch(data.videos, step, slot, slots, micro["batch_videos"], c.seed, 2)
            terms = self._ssl(batch["rgb"], gen, rope, video=True)
            self._backward(scale * c.lambda_ssl * terms["ssl"] / n_ssl)
            ssl_sum += terms["ssl"].item()
            for key in ("dino", "ibot", "koleo"):
                logs[f"vid_{key}"] = terms[key].item()
        if n_ssl:
            logs["ssl"] = ssl_sum / n_ssl
            total += c.lambda_ssl * logs["ssl"]
        if c.geometry:
            batch = data.batch(data.clips, step, slot, slots, micro["batch_geometry"], c.seed, 3)
            terms = self._geometry(batch, rope)
            self._backward(scale * c.lambda_geo * terms["geo"])
            for key, value in terms.items():
                logs[key] = value.item()
            total += c.lambda_geo * logs["geo"]
        if c.captioning:
            batch = data.batch(data.captions, step, slot, slots, micro["batch_captions"], c.seed, 4)
            loss = self._caption(batch, rope)
            self._backward(scale * c.lambda_cap * loss)
            logs["cap"] = loss.item()
            total += c.lambda_cap * logs["cap"]
        logs["loss"] = total
        return logs

    def _backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, self.student)

    def state_bytes(self) -> dict[str, int]:
        """This rank's parameter (student, teacher, Gram teacher), gradient and optimiser bytes."""
        modules = [self.student] + [m for m in (self.teacher, self.gram_teacher) if m is not None]
        return local_state_bytes(modules, self.optimizer)

    def consolidated_student(self) -> nn.ModuleDict | None:
        """The student as plain modules with the whole weights (a collective under FSDP: every rank calls it;
        rank 0 gets the modules, the others None). Without FSDP: the student itself."""
        if not self.parallel.fsdp:
            return self.student
        state = full_state_dict(self.student)
        if not self.ctx.is_main:
            return None
        plain = build_student(self.config)
        plain.load_state_dict(state)
        return plain

    # -- export -----------------------------------------------------------------------------------------
    def export(self, directory: str | Path, student: nn.ModuleDict | None = None) -> Path:
        """The backbone (authors' layout) with the geometry heads beside it, and the captioner (of ``student``,
        default this trainer's plain student; a sharded run passes ``consolidated_student()``)."""
        directory = Path(directory)
        student = student if student is not None else self.student
        student["backbone"].save_pretrained(directory)
        if "geometry_heads" in student:
            student["geometry_heads"].save_pretrained(directory)
        if "captioner" in student:
            student["captioner"].save_pretrained(directory / "captioner")
        return directory


def run_pretraining(
    config: PretrainConfig,
    out_dir: str | Path,
    resume: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    export_dir: str | Path | None = None,
    heads_only: bool = False,
    parallel: ParallelOptions | None = None,
) -> dict:
    """The whole command: train, checkpoint every ``save_every`` steps, export to ``export_dir``
    (default ``<out>/backbone``); ``heads_only`` writes just the geometry heads there (head probing).
    ``parallel``: FSDP2 and gradient accumulation (``distributed.ParallelOptions``); ``summary.json`` records
    each rank's parameter + gradient + optimiser bytes (``per_rank_state_bytes``)."""
    from tqdm.auto import tqdm

    ctx = init_distributed(device)
    try:
        out = Path(out_dir)
        trainer = Pretrainer(config, out, ctx, parallel)
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
        state_bytes = [json.loads(b) for b in gather_strings(json.dumps(trainer.state_bytes()), ctx)]
        plain = trainer.consolidated_student()  # a collective under FSDP
        if trainer.parallel.fsdp:
            # one set of whole weights exists only once gathered: its fingerprint stands for every rank
            digests = [state_digest(plain.state_dict())] if ctx.is_main else []
        else:
            # every rank's weights fingerprint, so a run can show the replicas never drifted apart
            digests = gather_strings(weights_digest(trainer.student), ctx)
        if ctx.is_main:
            (out / "rank_weights_sha256.json").write_text(json.dumps(digests, indent=2) + "\n")
        export = None
        if ctx.is_main:
            export = Path(export_dir) if export_dir else out / "backbone"
            if heads_only:
                plain["geometry_heads"].save_pretrained(export)
            else:
                trainer.export(export, plain)
        summary = {
            "steps": trainer.step,
            "seconds": seconds,
            "final": logs,
            "world_size": ctx.world_size,
            "fsdp": bool(trainer.parallel.fsdp),
            "grad_accum": trainer.parallel.grad_accum,
            "param_dtype": str(trainer.parallel.param_dtype(ctx)).removeprefix("torch.")
            if trainer.parallel.fsdp
            else "float32",
            "global_batch": {k: getattr(config, k) for k in trainer.micro},
            "micro_batch": dict(trainer.micro),
            "per_rank_state_bytes": [b["total"] for b in state_bytes],
            "per_rank_state_bytes_detail": state_bytes,
        }
        if ctx.is_main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.close()
        return dict(summary, backbone=str(export) if export else None, rank_digests=digests)
    finally:
        shutdown_distributed()
