"""`omnistream vla ...`: create and inspect OmniStream VLA policies."""

from __future__ import annotations

import argparse
import re

from omnistream_cli.errors import user_errors

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def register(sub: argparse._SubParsersAction) -> None:
    vla = sub.add_parser("vla", help="OmniStream VLA policy: create (init) and inspect (info)")
    group = vla.add_subparsers(dest="vla", metavar="ACTION")
    group.required = True

    p = group.add_parser("init", help="write a random-init policy (projector, action query, head) on a backbone")
    p.add_argument("--preset", default="debug", help="debug | qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-3b | qwen2.5-7b")
    p.add_argument("--backbone", default=None, help="OmniStream checkpoint directory or hub id (omit: features only)")
    p.add_argument("--out", required=True, help="policy directory to write")
    p.add_argument("--llm", default=None, help="Qwen2/Qwen2.5 hub id or directory (default: the preset's)")
    p.add_argument("--random-llm", action="store_true", help="random LLM weights of the preset's shape (no download)")
    p.add_argument("--stats", default=None, help="LeRobot meta/stats.json for the action normalisation")
    p.add_argument("--normalization", default=None, help="min_max | mean_std | quantiles | identity")
    p.add_argument("--chunk-size", type=int, default=None, help="actions per LLM forward (default: the preset's)")
    p.add_argument("--image-size", type=int, default=None, help="square backbone input in pixels")
    p.add_argument("--link-backbone", action="store_true", help="reference the backbone instead of copying it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(handler=_init)

    p = group.add_parser("info", help="print a policy's configuration and parameter counts")
    p.add_argument("policy", help="policy directory")
    p.set_defaults(handler=_info)


def _init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omnistream_cli.errors import UserError

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UserError(f"--out {out} is not empty (use --force to overwrite)")
    if args.backbone is not None and not Path(args.backbone).is_dir() and not _HUB_ID.match(args.backbone):
        raise UserError(f"--backbone {args.backbone}: no such directory (or a hub id like org/name)")
    if args.stats is not None and not Path(args.stats).is_file():
        raise UserError(f"--stats {args.stats}: no such file")
    llm_from_hub = args.preset != "debug" and not args.random_llm and not (args.llm and Path(args.llm).is_dir())
    backbone_from_hub = args.backbone is not None and not Path(args.backbone).is_dir()
    offline = False
    if llm_from_hub or backbone_from_hub:
        from omnistream_cli.hub import prefer_offline_when_unreachable

        offline = prefer_offline_when_unreachable()  # before transformers is imported
    overrides = {}
    if args.chunk_size is not None:
        overrides["chunk_size"] = args.chunk_size
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    from omnistream_vla.policy.factory import init_policy

    try:
        policy = init_policy(
            out,
            preset=args.preset,
            backbone=args.backbone,
            llm=args.llm,
            stats=args.stats,
            normalization=args.normalization,
            copy_backbone=not args.link_backbone,
            random_llm=args.random_llm,
            seed=args.seed,
            **overrides,
        )
    except (ValueError, OSError) as exc:  # a bad checkpoint file is a ValueError naming it
        # transformers' OSError for an uncached hub model offline; the backbone's own errors say what to do.
        if offline and llm_from_hub and type(exc) is OSError:
            raise UserError(_offline_llm_message(args)) from exc
        raise UserError(" ".join(str(exc).split())) from exc
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    print(f"wrote {args.preset} policy to {out} ({trainable / 1e6:.2f} M trainable parameters)")
    return 0


def _offline_llm_message(args: argparse.Namespace) -> str:
    from omnistream_cli.hub import hub_endpoint
    from omnistream_vla.policy import OmniStreamVLAConfig

    llm = args.llm or OmniStreamVLAConfig.preset(args.preset).llm
    return (
        f"the LLM {llm} of --preset {args.preset} is not in the local Hugging Face cache and {hub_endpoint()} "
        f"cannot be reached: download it on a connected machine (`hf download {llm} --local-dir DIR`) and pass "
        "--llm DIR (a local directory), or --random-llm for random weights of the same shape"
    )


def _info(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from omnistream_vla.policy import OmniStreamVLAConfig

    with user_errors():
        config = OmniStreamVLAConfig.load(Path(args.policy))
    print(json.dumps(config.to_dict(), indent=2))
    return 0
