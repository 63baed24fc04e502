"""`omnistream train pretrain|heads|vla`: the paper's training recipes; every one runs unchanged under torchrun.

omnistream train pretrain --preset debug --max-steps 20 --out outputs/pretrain
torchrun --nproc-per-node 2 $(which omnistream) train pretrain --preset debug --out outputs/pretrain
omnistream train heads --checkpoint outputs/pretrain/backbone --preset demo
omnistream train vla --preset debug --dataset outputs/demos --backbone outputs/pretrain/backbone --out outputs/vla
"""

from __future__ import annotations

import argparse
import json
import os


def _common(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--preset", default=default_preset, help=f"configuration preset (default {default_preset})")
    p.add_argument("--out", required=True, help="output directory: checkpoints/, metrics.jsonl, tensorboard/, exports")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="seed of initialisation, data order and augmentation")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: the preset's)")
    p.add_argument(
        "--resume", default=None, help="a checkpoint directory (…/checkpoints/step-N) or the --out of an earlier run"
    )
    p.add_argument("--device", default=None, help="cpu|cuda (default: cuda when available)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per process (default: cores / processes)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON",
                   help="override any config field, e.g. --set clip_frames=8 --set 'stages=[[0,64]]'")  # fmt: skip


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--geometry", default=None, help="geometry sequences directory (layout: omnistream_train.data)")
    p.add_argument("--images", default=None, help="image folder for image SSL (default: frames of the sequences)")
    p.add_argument("--videos", default=None, help="video folder for video SSL (default: the sequences' clips)")
    p.add_argument("--captions", default=None, help="caption JSONL (default: the sequences' caption.txt)")
    p.add_argument("--clip-frames", type=int, default=None, help="frames per clip T (paper: 16)")


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="pretraining, head probing and VLA finetuning (torchrun-ready)")
    group = train.add_subparsers(dest="train", metavar="RECIPE")
    group.required = True

    p = group.add_parser("pretrain", help="multi-task pretraining: SSL + geometry + captioning (paper 3.3)")
    _common(p, "debug")
    _data_args(p)
    p.add_argument(
        "--backbone", default=None, help="preset (debug|small|base|large) or checkpoint directory to start from"
    )
    p.add_argument("--init-dinov3", default=None, help="initialise the preset backbone from DINOv3 weights (the paper)")
    for name, what in [
        ("ssl-images", "image self-distillation"),
        ("ssl-videos", "video self-distillation"),
        ("geometry", "geometric reconstruction"),
        ("captioning", "vision-language alignment"),
        ("gram", "Gram anchoring"),
        ("rope-rescaling", "RoPE coordinate rescaling"),
    ]:
        p.add_argument(f"--no-{name}", action="store_true", help=f"switch off {what}")
    p.set_defaults(handler=_pretrain)

    p = group.add_parser("heads", help="train the depth/ray and camera heads on a frozen backbone, save beside it")
    _common(p, "demo")
    _data_args(p)
    p.add_argument("--checkpoint", required=True, help="backbone directory (config.json + model.safetensors)")
    p.add_argument("--save-to", default=None, help="where the heads go (default: the checkpoint directory)")
    p.set_defaults(handler=_heads)
    p.set_defaults(out=None)
    for action in p._actions:
        if action.dest == "out":
            action.required = False
            action.help = "logs and checkpoints (default: <checkpoint>/heads_training)"

    p = group.add_parser("vla", help="VLA finetuning on a frozen backbone (paper C.4)")
    _common(p, "debug")
    p.add_argument("--dataset", required=True, help="LeRobot v3 directory or CALVIN-format episode directory")
    p.add_argument("--backbone", default=None, help="backbone directory (default: the preset's random backbone)")
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size")
    p.add_argument("--epochs", type=float, default=None, help="train for this many passes over the data")
    p.add_argument("--eval-episodes", type=int, default=0, help="closed-loop episodes in the simulator at the end")
    p.set_defaults(handler=_vla)


# ------------------------------------------------------------------------------------------------------
def _parse_overrides(items: list[str]) -> dict:
    from omnistream_cli.main import UserError

    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


def _threads(args) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            from omnistream_cli.main import UserError

            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _common_overrides(args: argparse.Namespace) -> dict:
    """The flags every training command has (None = the preset's value)."""
    return dict(max_steps=args.max_steps, lr=args.lr, seed=args.seed, save_every=args.save_every)


def _report(result: dict, out: str) -> None:
    final = result.get("final") or {}
    print(
        f"trained {result['steps']} steps in {result['seconds']:.1f} s; final loss {final.get('loss', float('nan')):.4f}; "
        f"logs in {out}/metrics.jsonl" + (f"; weights in {result['backbone']}" if result.get("backbone") else "")
    )


def _pretrain(args: argparse.Namespace) -> int:
    from omnistream_cli.main import UserError

    _threads(args)
    from omnistream_train.config import PretrainConfig
    from omnistream_train.pretrain import run_pretraining

    overrides = dict(
        **_common_overrides(args),
        backbone=args.backbone,
        init_dinov3=args.init_dinov3,
        geometry_data=args.geometry,
        images=args.images,
        videos=args.videos,
        captions=args.captions,
        clip_frames=args.clip_frames,
    )
    for flag, field in [
        ("no_ssl_images", "ssl_images"),
        ("no_ssl_videos", "ssl_videos"),
        ("no_geometry", "geometry"),
        ("no_captioning", "captioning"),
        ("no_gram", "gram"),
        ("no_rope_rescaling", "rope_rescaling"),
    ]:
        if getattr(args, flag):
            overrides[field] = False
    overrides.update(_parse_overrides(args.overrides))
    try:
        config = PretrainConfig.from_preset(args.preset, **overrides)
        result = run_pretraining(
            config, args.out, resume=args.resume, device=args.device, progress=not args.no_progress
        )
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    if result.get("backbone") is not None:
        _report(result, args.out)
    return 0


def _heads(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omnistream_cli.main import UserError

    _threads(args)
    from omnistream_train.heads import heads_config, run_head_probing

    out = args.out or str(Path(args.checkpoint) / "heads_training")
    overrides = dict(
        **_common_overrides(args),
        geometry_data=args.geometry,
        clip_frames=args.clip_frames,
    )
    overrides.update(_parse_overrides(args.overrides))
    try:
        config = heads_config(args.preset, args.checkpoint, **overrides)
        result = run_head_probing(
            args.checkpoint, config, out, save_to=args.save_to, resume=args.resume, device=args.device,
            progress=not args.no_progress,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    if result.get("backbone") is not None:
        _report(result, out)
    return 0


def _vla(args: argparse.Namespace) -> int:
    from omnistream_cli.main import UserError

    _threads(args)
    from omnistream_train.vla import VLATrainConfig, run_vla_training

    overrides = dict(
        **_common_overrides(args),
        backbone=args.backbone,
        batch_size=args.batch_size,
        epochs=args.epochs,
        eval_episodes=args.eval_episodes,
    )
    overrides.update(_parse_overrides(args.overrides))
    try:
        config = VLATrainConfig.from_preset(args.preset, **overrides)
        result = run_vla_training(
            config, args.dataset, args.out, resume=args.resume, device=args.device, progress=not args.no_progress
        )
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    if result.get("policy") is not None:
        final = result.get("final") or {}
        print(
            f"trained {result['steps']} steps in {result['seconds']:.1f} s; loss over the dataset "
            f"{result['dataset_loss_before']:.4f} -> {result['dataset_loss_after']:.4f} (last step "
            f"{final.get('loss', float('nan')):.4f}); policy in {result['policy']}"
        )
    return 0
