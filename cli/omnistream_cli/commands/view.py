"""`omnistream view`: show a running stack live in Rerun (camera, depth, world points, camera path, instruction,
the VLA's actions), or record it to an `.rrd` file."""

from __future__ import annotations

import argparse
import contextlib

from omnistream_cli.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    from omnistream_perception.visualization import ViewTopics

    defaults = ViewTopics()
    p = sub.add_parser(
        "view",
        help="show a running stack in the Rerun viewer (or record it to an .rrd with --save)",
        description="Subscribes to the topics of a running perception_node / vla_node and logs them to Rerun on "
        "the messages' own header stamps (timeline ros_time). Without --save or --connect it spawns the Rerun "
        "viewer. SIGINT or SIGTERM stops it cleanly and finishes the file (exit 0).",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--save", default=None, metavar="FILE.rrd", help="write a Rerun recording instead of a viewer")
    out.add_argument("--connect", default=None, metavar="URL", help="a running viewer's gRPC URL (rerun+http://...)")
    p.add_argument("--image", default=defaults.image, help=f"camera Image or .../compressed topic ({defaults.image})")
    p.add_argument("--depth", default=defaults.depth,
                   help=f"depth Image topic ({defaults.depth}; its depth_scale_free sibling too)")  # fmt: skip
    p.add_argument("--depth-info", default=defaults.depth_info, help=f"depth CameraInfo ({defaults.depth_info})")
    p.add_argument("--points", default=defaults.points, help=f"PointCloud2 topic ({defaults.points})")
    p.add_argument("--pose", default=defaults.pose, help=f"PoseStamped topic ({defaults.pose})")
    p.add_argument("--instruction", default=defaults.instruction, help=f"String topic ({defaults.instruction})")
    p.add_argument("--action", default=defaults.action, help=f"EndEffectorAction topic ({defaults.action})")
    p.add_argument("--jpeg-quality", type=int, default=85, help="camera images stored as JPEG (0: raw; default 85)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    p.set_defaults(handler=_view)


def _view(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.duration is not None and args.duration <= 0:
        raise UserError(f"--duration must be > 0 seconds, got {args.duration}")
    if not 0 <= args.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be in 0..100 (0: raw images), got {args.jpeg_quality}")
    if args.save is not None and Path(args.save).suffix != ".rrd":
        raise UserError(f"--save must name an .rrd file, got {args.save}")
    try:
        from omnistream_perception.visualization import RerunLog
    except ImportError as exc:
        raise UserError(str(exc)) from None

    import rclpy

    from omnistream_perception.ros.bringup import spin_nodes
    from omnistream_perception.ros.rerun_bridge import RerunBridgeNode
    from omnistream_perception.visualization import ViewTopics

    topics = ViewTopics(args.image, args.depth, args.depth_info, args.points, args.pose, args.instruction, args.action)
    try:
        log = RerunLog("omnistream_view", save=args.save, connect=args.connect,
                       spawn=args.save is None and args.connect is None,
                       jpeg_quality=args.jpeg_quality or None)  # fmt: skip
    except (ValueError, OSError, RuntimeError) as exc:
        hint = "" if args.save else " (on a machine without a display, record with --save FILE.rrd)"
        raise UserError(f"cannot open Rerun{hint}: {' '.join(str(exc).split())}") from None
    rclpy.init()  # its SIGINT/SIGTERM handlers shut the context down; spin_nodes then returns
    context = rclpy.get_default_context()
    node = None
    try:
        try:
            node = RerunBridgeNode(log, topics, context=context)
        except Exception:
            if not context.ok():
                return 0  # stopped during start-up
            raise
        where = args.save or args.connect or "the Rerun viewer"
        print(f"omnistream view -> {where} (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C raised after rclpy's handler shut the context
            spin_nodes([node], context=context, duration=args.duration)
    finally:
        problem = None
        try:
            log.close()  # after the executor has drained: the file ends after the last logged message
        except RuntimeError as exc:  # the viewer went away (or never came up: no display)
            problem = " ".join(str(exc).split())
        if node is not None:
            print(node.summary() + (f"; wrote {args.save}" if args.save else ""), flush=True)
            node.destroy_node()
        rclpy.try_shutdown()
    if problem is not None:
        raise UserError(f"the Rerun viewer did not take the data ({problem}); without a display use --save FILE.rrd")
    return 0
