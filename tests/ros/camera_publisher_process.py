"""A camera process for the two-process tests: plain rclpy, no OmniStream import, as a camera driver would be.

    python camera_publisher_process.py --topic /image --size 640x480 --rate 15 --frames 45 --reliability reliable

Waits until a subscription matches, then publishes ``--frames`` rgb8 images at ``--rate`` Hz stamped
``--start`` + i / rate (so a receiver can tell how many frames were sent from the stamps), prints
``published N`` and exits 0.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import rclpy
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", default="/image")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--rate", type=float, default=15.0)
    parser.add_argument("--frames", type=int, default=45)
    parser.add_argument("--reliability", choices=["reliable", "best_effort"], default="reliable")
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--start", type=float, default=1000.0, help="stamp of the first frame (s)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a subscription")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between the match and frame 0")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    rclpy.init()
    node = rclpy.create_node("camera_publisher_process")
    reliability = ReliabilityPolicy.RELIABLE if args.reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
    qos = QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=args.depth, reliability=reliability, durability=DurabilityPolicy.VOLATILE
    )
    pub = node.create_publisher(Image, args.topic, qos)
    deadline = time.monotonic() + args.wait
    while pub.get_subscription_count() == 0:
        if time.monotonic() > deadline:
            print("no subscriber", flush=True)
            return 1
        time.sleep(0.05)
    time.sleep(args.settle)
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(4):  # smooth, camera-like content; the pixel values do not matter to the receiver
        small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        frames.append(np.ascontiguousarray(small.repeat(16, 0).repeat(16, 1)[:height, :width]).tobytes())
    period = 1.0 / args.rate
    start = time.perf_counter()
    for i in range(args.frames):
        delay = start + i * period - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        msg = Image(height=height, width=width, encoding="rgb8", step=width * 3, is_bigendian=0)
        stamp_ns = int(round((args.start + i * period) * 1e9))
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        msg.header.frame_id = "camera"
        msg.data = frames[i % len(frames)]  # bytes: assigning an array goes element by element
        pub.publish(msg)
    time.sleep(0.5)  # let the last samples leave before the participant goes away
    print(f"published {args.frames}", flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
