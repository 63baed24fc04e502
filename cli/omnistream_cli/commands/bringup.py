"""`omnistream bringup`: the nodes of a launch file in one process, for machines without `ros2 launch`."""

from __future__ import annotations

import argparse
import contextlib

from omnistream_cli.errors import user_errors


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bringup",
        help="run the perception (and VLA) nodes of a launch file in one process (pip-only ROS)",
        description="Runs the nodes that launch/perception.launch.py (or omnistream.launch.py with --with-vla) "
        "declares, with their params YAML and the environment they set, in one process on a "
        "MultiThreadedExecutor. SIGINT or SIGTERM stops it cleanly (exit 0).",
    )
    p.add_argument(
        "--with-vla", action="store_true", help="perception + VLA (launch/omnistream.launch.py; needs --policy)"
    )
    p.add_argument("--launch", default=None, help="another launch file (default: the one for --with-vla or not)")
    p.add_argument(
        "--params",
        action="append",
        default=[],
        metavar="FILE",
        help="extra ROS params YAML applied after the launch file's (repeatable; `/**/node_name:` keys)",
    )
    p.add_argument(
        "--checkpoint", default=None, help="perception_node checkpoint, directory or hub id (launch argument)"
    )
    p.add_argument(
        "--policy", default=None, help="vla_node policy directory (`omnistream vla init` or training; --with-vla)"
    )
    p.add_argument("--device", default=None, help="torch device of the nodes: cpu | cuda | cuda:N | mps")
    p.add_argument("--image", default=None, help="camera image topic (launch argument image:=TOPIC)")
    p.add_argument("--camera-info", default=None, help="CameraInfo topic (default: camera_info beside the image topic)")
    p.add_argument("--arg", action="append", default=[], metavar="NAME:=VALUE", help="launch argument (repeatable)")
    p.add_argument(
        "--set", action="append", default=[], metavar="NODE.PARAM=VALUE", help="parameter override (repeatable)"
    )
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    p.set_defaults(handler=_bringup)


def _parse_pairs(items: list[str], sep: str, what: str) -> list[tuple[str, str]]:
    from omnistream_cli.errors import UserError

    pairs = []
    for item in items:
        key, found, value = item.partition(sep)
        if not found or not key:
            raise UserError(f"{what} must look like KEY{sep}VALUE, got {item!r}")
        pairs.append((key, value))
    return pairs


def _launch_arguments(args: argparse.Namespace) -> dict[str, str]:
    from pathlib import Path

    from omnistream_cli.errors import UserError

    arguments = dict(_parse_pairs(args.arg, ":=", "--arg"))
    if args.policy is not None and not args.with_vla and not args.launch:
        raise UserError("--policy is for the VLA node: add --with-vla")
    if args.with_vla and not args.launch and args.policy is None and "policy" not in arguments:
        raise UserError(
            "--with-vla needs --policy DIR: a VLA policy directory (write one with `omnistream vla init --out DIR` "
            "or `omnistream train vla`)"
        )
    if args.policy is not None:
        policy = Path(args.policy).expanduser()
        if not (policy / "config.json").is_file():
            what = "no such directory" if not policy.is_dir() else "no config.json in it"
            raise UserError(f"--policy {args.policy}: {what} (write one with `omnistream vla init --out DIR`)")
        arguments["policy"] = str(policy.resolve())
    if args.checkpoint is not None:
        checkpoint = Path(args.checkpoint).expanduser()
        arguments["checkpoint"] = str(checkpoint.resolve()) if checkpoint.is_dir() else args.checkpoint
    for option, name in ((args.image, "image"), (args.camera_info, "camera_info"), (args.device, "device")):
        if option is not None:
            arguments[name] = option
    return arguments


def _bringup(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from omnistream_cli.errors import UserError

    launch_arguments = _launch_arguments(args)
    overrides: dict[str, dict[str, str]] = {}
    for key, value in _parse_pairs(args.set, "=", "--set"):
        node, dot, param = key.partition(".")
        if not dot or not param:
            raise UserError(f"--set needs NODE.PARAM=VALUE, got {key}={value}")
        overrides.setdefault(node, {})[param] = value
    for path in args.params:
        if not Path(path).is_file():
            raise UserError(f"--params file not found: {path}")
    if args.duration is not None and args.duration <= 0:
        raise UserError(f"--duration must be > 0 seconds, got {args.duration}")

    if not (args.checkpoint and Path(args.checkpoint).is_dir()):
        from omnistream_cli.hub import prefer_offline_when_unreachable

        prefer_offline_when_unreachable()  # a hub checkpoint offline: the cached copy, or a clear error at once

    import rclpy

    from omnistream_perception.ros.bringup import create_nodes, default_launch_file, load_launch_file, spin_nodes

    launch_file = Path(args.launch) if args.launch else default_launch_file(args.with_vla)
    with user_errors():
        declarations = load_launch_file(launch_file, launch_arguments)
    unknown = set(overrides) - {d.name for d in declarations}
    if unknown:
        raise UserError(f"--set names unknown node(s) {sorted(unknown)}; {launch_file.name} declares "
                        f"{[d.name for d in declarations]}")  # fmt: skip
    for decl in declarations:
        for params in decl.parameters:
            if not isinstance(params, dict) and not Path(params).is_file():
                raise UserError(f"{decl.name}: params file not found: {params}")

    # Before rclpy.init: the middleware reads its settings when the context starts (as a launched process would).
    os.environ.update(declarations.environment)
    for name, value in declarations.environment.items():
        print(f"{launch_file.name} sets {name}={value}", flush=True)
    rclpy.init()  # its SIGINT/SIGTERM handlers shut the context down; spin_nodes then returns
    context = rclpy.get_default_context()
    nodes: list = []
    try:
        try:
            nodes = create_nodes(declarations, context=context, extra_params_files=args.params, overrides=overrides)
        except (FileNotFoundError, ValueError, OSError) as exc:
            if not context.ok():
                return 0  # stopped while a model was loading
            raise UserError(f"cannot start the nodes of {launch_file.name}: {' '.join(str(exc).split())}") from exc
        except Exception:
            if not context.ok():
                return 0  # a signal during start-up invalidates the context under the constructors
            raise
        for decl in declarations:
            print(f"started {decl.package}/{decl.executable} as {decl.name}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C raised after rclpy's handler shut the context
            spin_nodes(nodes, context=context, duration=args.duration)
    finally:
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
