"""`omnistream train pretrain|heads|vlm|vla`: the paper's training recipes; every one runs unchanged under torchrun.

omnistream train pretrain --preset debug --max-steps 20 --out outputs/pretrain
torchrun --nproc-per-node 2 $(which omnistream) train pretrain --preset debug --out outputs/pretrain
torchrun --nproc-per-node 2 $(which omnistream) train pretrain --preset debug --batch-size 4 --grad-accum 2 --fsdp \
    --out outputs/pretrain_fsdp
omnistream train vla --preset paper --plan --nproc 8 --gpu-memory 80GB
omnistream train heads --checkpoint outputs/pretrain/backbone --preset demo
omnistream train vlm --preset debug --dataset outputs/demos --backbone outputs/pretrain/backbone --out outputs/vlm
omnistream train vla --preset debug --dataset outputs/demos --backbone outputs/pretrain/backbone --out outputs/vla \
    --init-vlm outputs/vlm
omnistream train probe --task classification --images data/classes --backbone outputs/pretrain/backbone --out outputs/probe
"""

from __future__ import annotations

import argparse
import json

from omnistream_cli.errors import user_errors


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


# fmt: off
def _parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL batch of every objective, whatever the processes and accumulation (per-rank "
                        "micro-batch = global / (processes x --grad-accum)); default: the preset's")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="FSDP2: shard parameters, gradients and optimiser state per block over the ranks "
                        "(default: on for multi-process GPU runs, off otherwise)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimiser step")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="FSDP parameter dtype (auto: bf16 with fp32 reductions on GPUs, fp32 on CPU)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (with --fsdp)")
# fmt: on


def _parallel(args: argparse.Namespace):
    from omnistream_train.distributed import ParallelOptions

    precision = getattr(args, "precision", "auto")  # train vlm: its config's precision sets FSDP's dtype
    return ParallelOptions(args.fsdp, args.grad_accum, precision, args.activation_checkpointing)


def _batch_overrides(args: argparse.Namespace) -> dict:
    keys = ("batch_images", "batch_videos", "batch_geometry", "batch_captions")
    return dict.fromkeys(keys, args.batch_size) if args.batch_size is not None else {}


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="pretraining, head probing, the VLM stage and VLA finetuning (torchrun-ready)")
    group = train.add_subparsers(dest="train", metavar="RECIPE")
    group.required = True

    p = group.add_parser("pretrain", help="multi-task pretraining: SSL + geometry + captioning (paper 3.3)")
    _common(p, "debug")
    _data_args(p)
    _parallel_args(p)
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
    _parallel_args(p)
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
    p.add_argument("--dataset", default=None, help="LeRobot v3 directory or CALVIN-format episode directory")
    p.add_argument("--backbone", default=None, help="backbone directory (default: the preset's random backbone)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL batch (per-rank micro-batch = global / (processes x --grad-accum)); default: preset's")  # fmt: skip
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimiser step (default: preset's)")
    p.add_argument("--random-backbone", action="store_true",
                   help="without --backbone, train on a random backbone of the preset's size on purpose")  # fmt: skip
    p.add_argument("--plan", action="store_true", help="print the per-GPU and host memory plan and exit (no data)")
    p.add_argument("--nproc", type=int, default=8, help="--plan: GPUs (processes) in the run (default 8)")
    p.add_argument("--gpu-memory", default="80GB", help="--plan: memory of one GPU, e.g. 80GB, 80GiB, 141GB")
    p.add_argument("--host-memory", default="128GiB", help="--plan: RAM of one machine (default 128GiB)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward pass (with --fsdp; --plan: counted)")  # fmt: skip
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="FSDP2: shard the trained policy per decoder layer over the ranks (default: on for "
                        "multi-process GPU runs, off otherwise)")  # fmt: skip
    p.add_argument("--epochs", type=float, default=None, help="train for this many passes over the data")
    p.add_argument("--eval-episodes", type=int, default=0, help="closed-loop episodes in the simulator at the end")
    p.add_argument("--init-vlm", default=None, help="start from a `train vlm` output (its projector, LLM, tokenizer)")
    p.set_defaults(handler=_vla)
    for action in p._actions:
        if action.dest == "out":
            action.required = False  # --plan needs no output directory

    p = group.add_parser("vlm", help="the VLM stage before the VLA: projector + LLM on captions and grounding Q&A")
    _common(p, "debug")
    p.add_argument("--dataset", action="append", default=[],
                   help="tabletop demonstrations, LeRobot v3 or CALVIN directory (repeatable)")  # fmt: skip
    p.add_argument("--captions", action="append", default=[], help="caption JSONL (repeatable)")
    p.add_argument("--stage", choices=("1", "2", "both"), default=None,
                   help="1: align the projector (LLM frozen); 2: instruction tuning (LLM trained); both (default)")  # fmt: skip
    p.add_argument("--stage1-steps", type=int, default=None, help="steps of stage 1 when both run (default: preset's)")
    p.add_argument("--backbone", default=None, help="backbone directory (default: the preset's random backbone)")
    p.add_argument("--llm", default=None, help="Qwen2.5 hub id or directory (default: the preset's)")
    p.add_argument("--init-vlm", default=None, help="start from a `train vlm` output (e.g. stage 2 after stage 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL batch (per-rank micro-batch = global / (processes x --grad-accum)); default: preset's")  # fmt: skip
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimiser step")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="FSDP2: shard projector and LLM per decoder layer over the ranks (default: on for "
                        "multi-process GPU runs, off otherwise)")  # fmt: skip
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward pass (with --fsdp)")  # fmt: skip
    p.add_argument("--eval-dataset", default=None, help="held-out tabletop demonstrations: grounding accuracy")
    p.set_defaults(handler=_vlm)

    p = group.add_parser("probe", help="linear / DPT probes on a frozen backbone: classification, depth (paper C.1)")
    p.add_argument("--task", required=True, choices=("classification", "depth"), help="what the probe predicts")
    p.add_argument("--backbone", required=True, help="backbone directory, or a preset (debug|small|base|large)")
    p.add_argument("--images", default=None, help="classification: DIR/<class>/*.png (or DIR/train/, DIR/val/)")
    p.add_argument("--geometry", default=None, help="depth: geometry sequences (default: the synthetic stand-in)")
    p.add_argument("--head", default="linear", choices=("linear", "dpt"), help="depth head (default linear)")
    p.add_argument("--preset", default="debug", help="debug | demo | paper (paper: Table 10's settings)")
    p.add_argument("--out", required=True, help="probe.json, report.md, probe_head.safetensors")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps per learning rate")
    p.add_argument("--lr", type=float, default=None, help="one learning rate instead of the preset's sweep")
    p.add_argument("--image-size", type=int, default=None, help="square input size (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="seed of head initialisation and batch order")
    p.add_argument("--device", default=None, help="cpu|cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_probe)


# ------------------------------------------------------------------------------------------------------
def _parse_overrides(items: list[str]) -> dict:
    from omnistream_cli.errors import UserError

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
    from omnistream_cli.errors import UserError
    from omnistream_perception.cpu_threads import configure_torch_threads

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    configure_torch_threads(args.threads)


def _overrides(args: argparse.Namespace, **fields) -> dict:
    """The config overrides of a training command: the flags every one has and its own ``fields`` (None = the
    preset's value), then ``--set KEY=JSON`` (which wins)."""
    common = dict(max_steps=args.max_steps, lr=args.lr, seed=args.seed, save_every=args.save_every)
    return {**common, **fields, **_parse_overrides(args.overrides)}


def _report(result: dict, out: str) -> None:
    final = result.get("final") or {}
    print(
        f"trained {result['steps']} steps in {result['seconds']:.1f} s; final loss {final.get('loss', float('nan')):.4f}; "
        f"logs in {out}/metrics.jsonl" + (f"; weights in {result['backbone']}" if result.get("backbone") else "")
    )


def _pretrain(args: argparse.Namespace) -> int:
    _threads(args)
    from omnistream_train.config import PretrainConfig
    from omnistream_train.pretrain import run_pretraining

    switched_off = [field for field in ("ssl_images", "ssl_videos", "geometry", "captioning", "gram", "rope_rescaling")
                    if getattr(args, f"no_{field}")]  # fmt: skip
    overrides = _overrides(
        args,
        backbone=args.backbone,
        init_dinov3=args.init_dinov3,
        geometry_data=args.geometry,
        images=args.images,
        videos=args.videos,
        captions=args.captions,
        clip_frames=args.clip_frames,
        **dict.fromkeys(switched_off, False),
        **_batch_overrides(args),
    )
    with user_errors():
        config = PretrainConfig.from_preset(args.preset, **overrides)
        result = run_pretraining(
            config, args.out, resume=args.resume, device=args.device, progress=not args.no_progress,
            parallel=_parallel(args),
        )  # fmt: skip
    if result.get("backbone") is not None:
        _report(result, args.out)
    return 0


def _heads(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omnistream_cli.errors import UserError

    checkpoint = str(args.checkpoint)
    # Anything but a hub id (org/name) is a path: a missing one is a typo, not a request for --save-to.
    if not Path(checkpoint).is_dir() and (checkpoint.count("/") != 1 or checkpoint.startswith((".", "/", "~"))):
        raise UserError(f"--checkpoint {checkpoint}: no such directory (a backbone directory or a hub id org/name)")
    _threads(args)
    from omnistream_train.heads import heads_config, run_head_probing

    out = args.out or str(Path(args.checkpoint) / "heads_training")
    overrides = _overrides(args, geometry_data=args.geometry, clip_frames=args.clip_frames, **_batch_overrides(args))
    with user_errors():
        config = heads_config(args.preset, args.checkpoint, **overrides)
        result = run_head_probing(
            args.checkpoint, config, out, save_to=args.save_to, resume=args.resume, device=args.device,
            progress=not args.no_progress, parallel=_parallel(args),
        )  # fmt: skip
    if result.get("backbone") is not None:
        _report(result, out)
    return 0


def _vla_plan(args: argparse.Namespace) -> int:
    from omnistream_train.plan import format_plan, plan_vla
    from omnistream_train.vla import VLATrainConfig

    with user_errors(ValueError):
        overrides = dict(batch_size=args.batch_size, grad_accum=args.grad_accum, fsdp=args.fsdp,
                         **_parse_overrides(args.overrides))  # fmt: skip
        config = VLATrainConfig.from_preset(args.preset, **overrides)
        plan = plan_vla(config, args.nproc, args.gpu_memory, args.host_memory, preset=args.preset,
                        activation_checkpointing=args.activation_checkpointing)  # fmt: skip
    print(format_plan(plan))
    return 0


def _vla(args: argparse.Namespace) -> int:
    from omnistream_cli.errors import UserError

    if args.plan:
        return _vla_plan(args)
    if not args.dataset or not args.out:
        raise UserError("train vla needs --dataset DIR and --out DIR (or --plan for the memory plan alone)")
    _threads(args)
    from omnistream_train.vla import VLATrainConfig, run_vla_training

    overrides = _overrides(
        args,
        backbone=args.backbone,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        random_backbone=args.random_backbone or None,
        epochs=args.epochs,
        eval_episodes=args.eval_episodes,
        init_vlm=args.init_vlm,
        fsdp=args.fsdp,
        activation_checkpointing=args.activation_checkpointing or None,
    )
    with user_errors():
        config = VLATrainConfig.from_preset(args.preset, **overrides)
        result = run_vla_training(
            config, args.dataset, args.out, resume=args.resume, device=args.device, progress=not args.no_progress
        )
    if result.get("policy") is not None:
        final = result.get("final") or {}
        print(
            f"trained {result['steps']} steps in {result['seconds']:.1f} s; loss over the dataset "
            f"{result['dataset_loss_before']:.4f} -> {result['dataset_loss_after']:.4f} (last step "
            f"{final.get('loss', float('nan')):.4f}); policy in {result['policy']}"
        )
    return 0


def _vlm(args: argparse.Namespace) -> int:
    from omnistream_cli.errors import UserError

    _threads(args)
    from omnistream_train.config import VLMTrainConfig
    from omnistream_train.vlm import run_vlm_training

    if not args.dataset and not args.captions:
        raise UserError("give training data: --dataset DIR and/or --captions FILE.jsonl")
    overrides = _overrides(
        args,
        backbone=args.backbone,
        batch_size=args.batch_size,
        stage1_steps=args.stage1_steps,
        init_vlm=args.init_vlm,
        eval_dataset=args.eval_dataset,
        stages={"1": [1], "2": [2], "both": [1, 2]}.get(args.stage),
    )
    with user_errors():
        config = VLMTrainConfig.from_preset(args.preset, **overrides)
        if args.llm:
            config.policy_overrides = dict(config.policy_overrides, llm=args.llm)
        result = run_vlm_training(config, args.dataset, args.out, captions=args.captions, resume=args.resume,
                                  device=args.device, progress=not args.no_progress, parallel=_parallel(args))  # fmt: skip
    if result.get("vlm") is not None:
        final = result.get("final") or {}
        line = (f"trained {result['steps']} steps in {result['seconds']:.1f} s on {result['samples']} questions; "
                f"last loss {final.get('loss', float('nan')):.4f}; VLM in {result['vlm']}")  # fmt: skip
        if "eval" in result:
            e = result["eval"]
            line += (f"; held-out grounding accuracy {e['grounding_accuracy_before']:.2f} -> "
                     f"{e['grounding_accuracy']:.2f} (chance {e['chance']:.2f})")  # fmt: skip
        print(line)
    return 0


def _probe(args: argparse.Namespace) -> int:
    from omnistream_cli.errors import UserError

    _threads(args)
    from omnistream_train.probe import ProbeConfig, probe_table, run_probe

    if args.task == "classification" and not args.images:
        raise UserError("--task classification needs --images DIR with one folder of images per class")
    if args.task == "classification" and args.head != "linear":
        raise UserError("--task classification trains a linear head: drop --head dpt")
    for flag, value in (("--max-steps", args.max_steps), ("--image-size", args.image_size),
                        ("--batch-size", args.batch_size)):  # fmt: skip
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    with user_errors():
        config = ProbeConfig.from_preset(
            args.preset, args.task, head=args.head, max_steps=args.max_steps, image_size=args.image_size,
            batch_size=args.batch_size, seed=args.seed, lrs=[args.lr] if args.lr is not None else None,
        )  # fmt: skip
        result = run_probe(config, args.backbone, args.out, images=args.images, geometry=args.geometry,
                           device=args.device, progress=not args.no_progress)  # fmt: skip
    print(probe_table(result))
    print(f"probe trained in {result['seconds']:.1f} s; results in {args.out}/probe.json and report.md")
    return 0
