"""Record a live stack with `omnistream view`: plays a camera sequence (an npz from `omnistream sim geometry`:
rgb, intrinsics) on `image` / `camera_info` with an instruction, while `omnistream bringup` runs perception_node
(and vla_node with --policy) and `omnistream view --save` records everything. Each process is stopped with SIGINT.

    .venv/bin/python scripts/record_live_view.py --checkpoint DIR [--policy DIR] --sequence SEQ.npz --out live.rrd
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _wait(predicate, timeout: float, what: str, procs) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args[:4]} exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="backbone with geometry heads")
    parser.add_argument("--policy", default=None, help="a VLA policy directory (adds vla_node)")
    parser.add_argument("--sequence", required=True, help="npz with rgb (T, H, W, 3) and intrinsics (3, 3)")
    parser.add_argument("--out", required=True, help="the .rrd to write")
    parser.add_argument("--rate", type=float, default=3.0, help="camera frames per second (default 3)")
    parser.add_argument("--instruction", default="lift the red block")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE", help="for bringup")
    parser.add_argument("--log-dir", default=None, help="where the processes' logs go (default: beside --out)")
    args = parser.parse_args(argv)

    import rclpy
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import String

    from omnistream_perception.ros.image import camera_info_from_intrinsics, make_header, rgb_to_image

    data = np.load(args.sequence)
    frames, intrinsics = data["rgb"], data["intrinsics"]
    out = Path(args.out)
    logs = Path(args.log_dir or out.parent)
    logs.mkdir(parents=True, exist_ok=True)
    omnistream = [sys.executable, "-m", "omnistream_cli.main"]
    bringup = [*omnistream, "bringup", "--checkpoint", args.checkpoint]
    if args.policy:
        bringup += ["--with-vla", "--policy", args.policy]
    for item in args.set:
        bringup += ["--set", item]
    procs = [
        subprocess.Popen([*omnistream, "view", "--save", str(out)], stdout=(logs / "view.log").open("w"),
                         stderr=subprocess.STDOUT),
        subprocess.Popen(bringup, stdout=(logs / "bringup.log").open("w"), stderr=subprocess.STDOUT),
    ]  # fmt: skip
    rclpy.init()
    depth_seen = []
    try:
        node = Node("sequence_camera")
        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        image_pub = node.create_publisher(Image, "image", reliable)
        info_pub = node.create_publisher(CameraInfo, "camera_info", reliable)
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        node.create_publisher(String, "instruction", latched).publish(String(data=args.instruction))
        # no scale_source in the live view: the depth goes out scale-free, on ~/depth_scale_free
        node.create_subscription(Image, "perception_node/depth_scale_free", depth_seen.append, reliable)
        spin = lambda: rclpy.spin_once(node, timeout_sec=0.02)  # noqa: E731
        # The view and perception_node both listen to the camera; the view listens to the depth.
        _wait(lambda: (spin(), image_pub.get_subscription_count() >= 2)[1], 180, "subscribers of image", procs)
        _wait(
            lambda: (spin(), node.count_subscribers("perception_node/depth_scale_free") >= 2)[1], 60, "the view", procs
        )
        period = 1.0 / args.rate
        for i, rgb in enumerate(frames):
            header = make_header(node.get_clock().now().to_msg(), "camera")
            info_pub.publish(camera_info_from_intrinsics(intrinsics, rgb.shape[1], rgb.shape[0], header))
            image_pub.publish(rgb_to_image(np.ascontiguousarray(rgb), header))
            until = time.monotonic() + period
            while time.monotonic() < until:
                spin()
            # A camera that waits for the model (perception_node keeps only the newest frame, so a busy machine
            # would otherwise skip frames): every frame of the sequence gets its depth, points and pose.
            _wait(lambda i=i: (spin(), len(depth_seen) > i)[1], 60, f"the depth of frame {i}", procs)
        deadline = time.monotonic() + 2.0  # a few more control steps of the VLA
        while time.monotonic() < deadline:
            spin()
        node.destroy_node()
    finally:
        rclpy.try_shutdown()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        codes = [proc.wait(timeout=60) for proc in procs]
    print(f"{len(frames)} frames played, {len(depth_seen)} depth maps seen; exit codes {codes}; wrote {out}")
    print((logs / "view.log").read_text().strip().splitlines()[-1])
    return 0 if codes == [0, 0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
