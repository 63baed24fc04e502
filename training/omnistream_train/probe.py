"""Probing on frozen features (paper C.1): ``omnistream train probe --task classification|depth``.

The backbone is frozen (eval mode, no gradients); only a head trains:

* ``classification``: a linear layer on [CLS, mean of the patch tokens] of the last layer (the DINOv2/v3 linear
  protocol), one head per learning rate of the preset's sweep (the paper sweeps 13 rates on ImageNet-1K and
  reports the best); images in class folders, ``DIR/<class>/*.png|jpg`` (or ``DIR/train/<class>`` and
  ``DIR/val/<class>``; without them every 5th image of a class is held out). Metric: top-1 accuracy.
* ``depth``: a linear head (1x1 on the last layer's patch tokens, bilinearly upsampled) or the DPT head of
  ``omnistream_perception.model.heads`` on four layers, predicting log depth, trained with the scale-invariant
  log loss; data: a geometry folder (``omnistream_train.data`` layout or tabletop sequences, the last 20 % of
  the frames held out) or the synthetic stand-in. Metrics on the held-out frames: RMSE (the paper's NYUv2
  figure), AbsRel and delta < 1.25 in metric scale.

Writes ``probe.json`` (config + results), ``report.md`` (the result table) and ``probe_head.safetensors``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IMAGE_SUFFIXES, _read_image, _to_float_chw, resize_square
from .pretrain import normalise


@dataclass
class ProbeConfig:
    task: str = "classification"  # classification | depth
    head: str = "linear"  # depth: linear | dpt
    image_size: int = 224
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    max_steps: int = 1000
    warmup_steps: int = 0
    batch_size: int = 32
    weight_decay: float = 0.0
    holdout_every: int = 5  # classification without train/ and val/ folders: every 5th image of a class is held out
    val_fraction: float = 0.2  # depth: the last fraction of the frames is held out
    synthetic_sequences: int = 8  # depth without --geometry: the synthetic stand-in
    seed: int = 0

    @classmethod
    def from_preset(cls, name: str, task: str, **overrides) -> ProbeConfig:
        presets = {
            "debug": dict(image_size=32, lrs=[1e-2, 1e-3], max_steps=20, batch_size=8, synthetic_sequences=4),
            "demo": dict(image_size=64, lrs=[1e-3, 1e-2], max_steps=300, batch_size=16, synthetic_sequences=16),
            # paper Table 10: ImageNet-1K 224 px, 13 rates 1e-5 .. 1e-1, 12,500 steps; NYUv2 416 x 544 (here the
            # shorter side, square crops), lr 1e-3, 12,800 warm-up of 38,400 steps
            "paper": dict(image_size=224, lrs=[m * 10.0**e for e in range(-5, -1) for m in (1, 2, 5)] + [0.1],
                          max_steps=12500, batch_size=256)
            if task == "classification"
            else dict(image_size=416, lrs=[1e-3], max_steps=38400, warmup_steps=12800, batch_size=8),
        }  # fmt: skip
        if name not in presets:
            raise ValueError(f"unknown probe preset {name!r}; choose one of {sorted(presets)}")
        if task not in ("classification", "depth"):
            raise ValueError(f"--task must be classification or depth, got {task!r}")
        config = cls(task=task, **presets[name])
        for key, value in overrides.items():
            if value is None:
                continue
            if not hasattr(config, key):
                raise ValueError(f"ProbeConfig has no field {key!r}")
            setattr(config, key, value)
        if config.head not in ("linear", "dpt"):
            raise ValueError(f"--head must be linear or dpt, got {config.head!r}")
        if config.task == "classification" and config.head != "linear":
            raise ValueError("classification probing uses a linear head (--head linear)")
        if not config.lrs or any(lr <= 0 for lr in config.lrs):
            raise ValueError(f"learning rates must be > 0, got {config.lrs}")
        return config


# ------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------
def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[d.name] = files
    return classes


def class_folder_split(root: str | Path, holdout_every: int = 5):
    """-> (class names, [(path, label)] train, [(path, label)] val)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory {root} does not exist")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = _class_files(root / "train"), _class_files(root / "val")
        names = sorted(set(train) | set(val))
        pick = {n: i for i, n in enumerate(names)}
        return (names, [(f, pick[c]) for c, fs in train.items() for f in fs],
                [(f, pick[c]) for c, fs in val.items() for f in fs])  # fmt: skip
    classes = _class_files(root)
    if len(classes) < 2:
        raise ValueError(
            f"{root} needs at least two class folders with images (DIR/<class>/*.png), found {len(classes)}"
        )
    names = sorted(classes)
    train, val = [], []
    for label, name in enumerate(names):
        for i, f in enumerate(classes[name]):
            (val if i % holdout_every == holdout_every - 1 else train).append((f, label))
    if not val:
        raise ValueError(f"no held-out images: give each class of {root} at least {holdout_every} images, or add val/")
    return names, train, val


def _load_images(items, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rgb = torch.cat([resize_square(_to_float_chw(_read_image(p))[None], size) for p, _ in items])
    return rgb, torch.tensor([label for _, label in items])


def depth_frames(config: ProbeConfig, geometry: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """All single frames: rgb (N, 3, S, S) in [0, 1] and depth (N, S, S) metres (0 = unknown)."""
    if geometry is not None:
        from .data import GeometryFolder

        source = GeometryFolder(geometry, frames=1, size=config.image_size)
    else:
        from .synthetic import SyntheticTabletopStandIn

        source = SyntheticTabletopStandIn(config.synthetic_sequences, 4, config.image_size, seed=config.seed)
    items = [source[i] for i in range(len(source))]
    rgb = torch.cat([it["rgb"].reshape(-1, 3, config.image_size, config.image_size) for it in items])
    depth = torch.cat([it["depth"].reshape(-1, config.image_size, config.image_size) for it in items])
    return rgb, depth


# ------------------------------------------------------------------------------------------------------
# frozen features and heads
# ------------------------------------------------------------------------------------------------------
class FrozenBackbone:
    def __init__(self, model, layers: list[int] | None, device: torch.device) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.layers = layers
        self.device = device

    @torch.no_grad()
    def __call__(self, rgb: torch.Tensor):
        pixels = normalise(rgb.to(self.device))[:, None]  # (B, T=1, 3, H, W)
        return self.model(pixels, output_hidden_states=self.layers if self.layers else False)


def global_features(out) -> torch.Tensor:
    """[CLS, mean patch token] of the last layer: (B, 2D)."""
    return torch.cat([out.pooler_output[:, 0], out.last_hidden_state[:, 0].mean(1)], dim=-1)


class LinearDepthHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)  # the DINOv2 linear depth head normalises features the same way
        self.proj = nn.Conv2d(dim, 1, 1)

    def forward(self, out, size: tuple[int, int]) -> torch.Tensor:
        tokens = out.last_hidden_state[:, 0]
        h, w = out.grid_size
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return F.interpolate(self.proj(self.norm(x)), size=size, mode="bilinear", align_corners=False)[:, 0]


class DPTDepthHead(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        from omnistream_perception.model.heads import GeometryHeadsConfig
        from omnistream_perception.model.heads.dpt_head import DPTHead

        cfg = GeometryHeadsConfig.for_backbone(dim, depth)
        self.layers = cfg.layers
        self.dpt = DPTHead(dim, 1, cfg.features, tuple(cfg.channels))

    def forward(self, out, size: tuple[int, int]) -> torch.Tensor:
        start = out.patch_start_idx
        tokens = [hs[:, 0, start:] for hs in out.hidden_states]
        return self.dpt(tokens, out.grid_size, size)[:, 0]


def silog_loss(log_pred: torch.Tensor, depth: torch.Tensor, lam: float = 0.85) -> torch.Tensor:
    valid = depth > 0
    d = log_pred[valid] - torch.log(depth[valid])
    return torch.sqrt((d**2).mean() - lam * d.mean() ** 2 + 1e-8)


def _lr_at(step: int, config: ProbeConfig, lr: float) -> float:
    if step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------------
def _load_backbone(backbone: str):
    from omnistream_perception.model import OmniStreamModel

    if backbone in ("debug", "small", "base", "large"):
        return OmniStreamModel.from_preset(backbone)
    if not Path(backbone).is_dir() and backbone.count("/") != 1:
        raise FileNotFoundError(f"backbone {backbone!r} is neither a preset (debug|small|base|large) nor a directory")
    return OmniStreamModel.from_pretrained(backbone)


def _probe_classification(config, frozen, images, progress):
    names, train_items, val_items = class_folder_split(images, config.holdout_every)
    gen = torch.Generator().manual_seed(config.seed)

    def features(items):
        out = []
        for i in range(0, len(items), config.batch_size):
            rgb, _ = _load_images(items[i : i + config.batch_size], config.image_size)
            out.append(global_features(frozen(rgb)).float().cpu())
        return torch.cat(out), torch.tensor([label for _, label in items])

    # the backbone is frozen and there is no augmentation: each image's features are computed once
    x_train, y_train = features(train_items)
    x_val, y_val = features(val_items)
    rows, heads = [], {}
    for lr in config.lrs:
        torch.manual_seed(config.seed)
        head = nn.Linear(x_train.shape[1], len(names))
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=config.weight_decay)
        for step in range(config.max_steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, config, lr)
            idx = torch.randint(0, len(x_train), (min(config.batch_size, len(x_train)),), generator=gen)
            loss = F.cross_entropy(head(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = float((head(x_val).argmax(-1) == y_val).float().mean())
            train_acc = float((head(x_train).argmax(-1) == y_train).float().mean())
        rows.append({"lr": lr, "top1": acc, "train_top1": train_acc, "final_loss": loss.item()})
        heads[lr] = head
    best = max(rows, key=lambda r: r["top1"])
    meta = {"classes": names, "train_images": len(train_items), "val_images": len(val_items)}
    return rows, best, heads[best["lr"]], meta


def _probe_depth(config, frozen, geometry, model, device, progress):
    rgb, depth = depth_frames(config, geometry)
    n_val = max(1, int(round(len(rgb) * config.val_fraction)))
    if len(rgb) - n_val < 1:
        raise ValueError(f"need at least 2 frames for depth probing, got {len(rgb)}")
    train = (rgb[:-n_val], depth[:-n_val])
    val = (rgb[-n_val:], depth[-n_val:])
    dim, layers = model.config.hidden_size, model.config.depth
    size = (config.image_size, config.image_size)
    gen = torch.Generator().manual_seed(config.seed)
    rows, heads = [], {}
    for lr in config.lrs:
        torch.manual_seed(config.seed)
        head = (DPTDepthHead(dim, layers) if config.head == "dpt" else LinearDepthHead(dim)).to(device)
        frozen.layers = head.layers if config.head == "dpt" else None
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=config.weight_decay)
        head.train()
        for step in range(config.max_steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, config, lr)
            idx = torch.randint(0, len(train[0]), (min(config.batch_size, len(train[0])),), generator=gen)
            loss = silog_loss(head(frozen(train[0][idx]), size), train[1][idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            preds = torch.cat([torch.exp(head(frozen(val[0][i : i + config.batch_size]), size)).cpu()
                               for i in range(0, len(val[0]), config.batch_size)])  # fmt: skip
        gt = val[1]
        ok = gt > 0
        p, g = preds[ok].double(), gt[ok].double()
        ratio = torch.maximum(p / g, g / p)
        rows.append({
            "lr": lr,
            "rmse": float(torch.sqrt(((p - g) ** 2).mean())),
            "abs_rel": float(((p - g).abs() / g).mean()),
            "delta1": float((ratio < 1.25).double().mean()),
            "final_loss": loss.item(),
        })  # fmt: skip
        heads[lr] = head
    best = min(rows, key=lambda r: r["rmse"])
    meta = {"train_frames": len(train[0]), "val_frames": len(val[0]), "source": str(geometry or "synthetic stand-in")}
    return rows, best, heads[best["lr"]], meta


def run_probe(
    config: ProbeConfig,
    backbone: str,
    out_dir: str | Path,
    images: str | Path | None = None,
    geometry: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Trains the probe(s) and writes probe.json, report.md and probe_head.safetensors into ``out_dir``."""
    from safetensors.torch import save_file

    if config.task == "classification" and images is None:
        raise ValueError("classification probing needs --images DIR (one folder of images per class)")
    began = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _load_backbone(backbone)
    frozen = FrozenBackbone(model, None, dev)
    if config.task == "classification":
        rows, best, head, meta = _probe_classification(config, frozen, images, progress)
    else:
        rows, best, head, meta = _probe_depth(config, frozen, geometry, model, dev, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / "probe_head.safetensors")
    )
    result = {
        "task": config.task,
        "head": config.head,
        "backbone": str(backbone),
        "rows": rows,
        "best": best,
        **meta,
        "seconds": time.perf_counter() - began,
        "config": asdict(config),
    }
    (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(probe_table(result))
    return result


def probe_table(result: dict) -> str:
    if result["task"] == "classification":
        head = "| learning rate | top-1 (held out) | top-1 (train) |\n|---:|---:|---:|\n"
        body = "".join(f"| {r['lr']:.0e} | {r['top1']:.3f} | {r['train_top1']:.3f} |\n" for r in result["rows"])
        best = f"best: top-1 {result['best']['top1']:.3f} at lr {result['best']['lr']:.0e}"
    else:
        head = "| learning rate | RMSE (m) | AbsRel | delta < 1.25 |\n|---:|---:|---:|---:|\n"
        body = "".join(f"| {r['lr']:.0e} | {r['rmse']:.4f} | {r['abs_rel']:.4f} | {r['delta1']:.3f} |\n"
                       for r in result["rows"])  # fmt: skip
        best = f"best: RMSE {result['best']['rmse']:.4f} m at lr {result['best']['lr']:.0e}"
    title = f"# Probe: {result['task']} ({result['head']} head, frozen backbone `{result['backbone']}`)\n\n"
    return title + head + body + f"\n{best}\n"
