"""`omnistream bringup`: the nodes of a launch file in one process, for machines without `ros2 launch`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bringup",
        help="run the perception (and VLA) nodes of a launch file in one process (pip-only ROS)",
        description="Runs the nodes that launch/perception.launch.py (or omnistream.launch.py with --with-vla) "
        "declares, with their params YAML, in one process on a MultiThreadedExecutor.",
    )
    p.add_argument("--with-vla", action="store_true", help="perception + VLA (launch/omnistream.launch.py)")
    p.add_argument("--launch", default=None, help="another launch file (default: the one for --with-vla or not)")
    p.add_argument(
        "--params",
        action="append",
        default=[],
        metavar="FILE",
        help="extra ROS params YAML applied after the launch file's (repeatable; `/**/node_name:` keys)",
    )
    p.add_argument("--checkpoint", default=None, help="perception_node checkpoint (directory or hub id)")
    p.add_argument("--image", default=None, help="camera image topic (launch argument image:=TOPIC)")
    p.add_argument("--arg", action="append", default=[], metavar="NAME:=VALUE", help="launch argument (repeatable)")
    p.add_argument(
        "--set", action="append", default=[], metavar="NODE.PARAM=VALUE", help="parameter override (repeatable)"
    )
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    p.set_defaults(handler=_bringup)


def _parse_pairs(items: list[str], sep: str, what: str) -> list[tuple[str, str]]:
    from omnistream_cli.main import UserError

    pairs = []
    for item in items:
        key, found, value = item.partition(sep)
        if not found or not key:
            raise UserError(f"{what} must look like KEY{sep}VALUE, got {item!r}")
        pairs.append((key, value))
    return pairs


def _bringup(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omnistream_cli.main import UserError

    launch_arguments = dict(_parse_pairs(args.arg, ":=", "--arg"))
    if args.image:
        launch_arguments["image"] = args.image
    overrides: dict[str, dict[str, str]] = {}
    for key, value in _parse_pairs(args.set, "=", "--set"):
        node, dot, param = key.partition(".")
        if not dot or not param:
            raise UserError(f"--set needs NODE.PARAM=VALUE, got {key}={value}")
        overrides.setdefault(node, {})[param] = value
    if args.checkpoint:
        overrides.setdefault("perception_node", {})["checkpoint"] = args.checkpoint
    for path in args.params:
        if not Path(path).is_file():
            raise UserError(f"--params file not found: {path}")
    if args.duration is not None and args.duration <= 0:
        raise UserError(f"--duration must be > 0 seconds, got {args.duration}")

    import rclpy

    from omnistream_perception.bringup import create_nodes, default_launch_file, load_launch_file, spin_nodes

    launch_file = Path(args.launch) if args.launch else default_launch_file(args.with_vla)
    try:
        declarations = load_launch_file(launch_file, launch_arguments)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    unknown = set(overrides) - {d.name for d in declarations}
    if unknown:
        raise UserError(f"--set names unknown node(s) {sorted(unknown)}; {launch_file.name} declares "
                        f"{[d.name for d in declarations]}")  # fmt: skip

    rclpy.init()
    try:
        try:
            nodes = create_nodes(declarations, extra_params_files=args.params, overrides=overrides)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"cannot start the nodes of {launch_file.name}: {exc}") from exc
        for decl in declarations:
            print(f"started {decl.package}/{decl.executable} as {decl.name}")
        try:
            spin_nodes(nodes, duration=args.duration)
        except KeyboardInterrupt:
            pass
        finally:
            for node in nodes:
                node.destroy_node()
    finally:
        rclpy.try_shutdown()
    return 0
