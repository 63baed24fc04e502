"""``omnistream view``'s ROS side: a node that subscribes to a running stack's topics and logs them to Rerun.

Topics (relative names, remappable like the stack's own; defaults match perception_node's and vla_node's
publishers): ``image`` (the camera, Image or ``.../compressed``), ``perception_node/depth`` and
``perception_node/depth/camera_info`` (and their ``depth_scale_free`` siblings, where perception_node publishes
depth without a metric scale), ``perception_node/points``, ``perception_node/pose``, ``instruction``
(std_msgs/String) and ``vla_node/action`` (EndEffectorAction). Every message is logged at its header stamp on the
``ros_time`` timeline (the instruction, which has no header, at the newest stamp seen). A message that cannot be
logged is counted, warned about (throttled) and dropped. The logging itself is
``omnistream_perception.visualization`` (rclpy-free).
"""

from __future__ import annotations

import threading

import numpy as np
from geometry_msgs.msg import PoseStamped
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import String

from ..camera_pipeline import LogThrottle, subscription_reliability
from ..image_codec import compressed_to_rgb, image_to_depth, image_to_rgb
from ..visualization import RerunLog, ViewTopics
from .image import intrinsics_from_camera_info
from .pointcloud import pointcloud2_to_xyzrgb

NODE_NAME = "omnistream_view"
# Reliable outputs of the stack (perception_node, vla_node publish reliable): a reliable subscription gets large
# clouds whole between processes. The camera follows its publisher (camera drivers often publish best-effort).
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
# vla_node reads a latched instruction (transient local) by default; this gets the one already published.
INSTRUCTION_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)  # fmt: skip
_RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}


def stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def depth_array(msg: Image) -> np.ndarray:
    """A depth image as float32 metres, NaN/inf kept (REP 118: invalid depth pixels are NaN or +-inf)."""
    if msg.encoding != "32FC1":
        return image_to_depth(msg)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0 or step < 4 * width or len(msg.data) != step * height:
        raise ValueError(f"32FC1 depth of {width}x{height}, step {step}: data length {len(msg.data)} does not fit")
    raw = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, step)[:, : 4 * width]
    return np.ascontiguousarray(raw).view(">f4" if msg.is_bigendian else "<f4").astype(np.float32)


def with_scale_free(topic: str) -> list[str]:
    """``topic`` and, when a path component is ``depth``, its ``depth_scale_free`` sibling (perception_node's depth
    topic without a metric scale): ``perception_node/depth/camera_info`` -> ``.../depth_scale_free/camera_info``."""
    parts = topic.split("/")
    if "depth" not in parts:
        return [topic]
    i = len(parts) - 1 - parts[::-1].index("depth")
    return [topic, "/".join(parts[:i] + ["depth_scale_free"] + parts[i + 1 :])]


class RerunBridgeNode(Node):
    """Subscribes to the stack's topics and logs every message to ``log`` (a ``RerunLog``)."""

    def __init__(self, log: RerunLog, topics: ViewTopics | None = None, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        self.log = log
        self.topics = topics or ViewTopics()
        self.received: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self._lock = threading.Lock()  # RerunLog keeps a time cursor: one message is logged at a time
        self._throttle = LogThrottle(interval_s=5.0)
        self._last_stamp_ns: int | None = None
        self._depth_info: tuple[np.ndarray, int, int] | None = None
        t = self.topics
        self._image_reliability = "best_effort"
        self._image_sub = None
        self._subscribe_image()
        for topic in with_scale_free(t.depth):
            self.create_subscription(Image, topic, lambda m: self._handle("depth", m, self._on_depth), OUTPUT_QOS)
        for topic in with_scale_free(t.depth_info):
            self.create_subscription(CameraInfo, topic, lambda m: self._handle("depth_info", m, self._on_info),
                                     OUTPUT_QOS)  # fmt: skip
        self.create_subscription(PointCloud2, t.points, lambda m: self._handle("points", m, self._on_points),
                                 OUTPUT_QOS)  # fmt: skip
        self.create_subscription(PoseStamped, t.pose, lambda m: self._handle("pose", m, self._on_pose), OUTPUT_QOS)
        self.create_subscription(String, t.instruction, lambda m: self._handle("instruction", m, self._on_instruction),
                                 INSTRUCTION_QOS)  # fmt: skip
        try:
            from omnistream_msgs.msg import EndEffectorAction
        except ImportError:  # the interface package is built by `make setup`; without it there is no VLA to show
            self.get_logger().warning("omnistream_msgs is not importable: not showing the VLA's actions")
        else:
            self.create_subscription(EndEffectorAction, t.action, lambda m: self._handle("action", m, self._on_action),
                                     OUTPUT_QOS)  # fmt: skip
        self.create_timer(1.0, self._follow_camera_reliability)
        self.get_logger().info(
            f"logging image={self.resolve_topic_name(t.image)} depth={self.resolve_topic_name(t.depth)} "
            f"points={self.resolve_topic_name(t.points)} pose={self.resolve_topic_name(t.pose)} "
            f"instruction={self.resolve_topic_name(t.instruction)} action={self.resolve_topic_name(t.action)}"
        )

    # -- subscriptions ------------------------------------------------------------------------------------------
    def _image_type(self):
        return CompressedImage if self.topics.image.rstrip("/").endswith("compressed") else Image

    def _subscribe_image(self) -> None:
        if self._image_sub is not None:
            self.destroy_subscription(self._image_sub)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=_RELIABILITY[self._image_reliability])
        self._image_sub = self.create_subscription(
            self._image_type(), self.topics.image, lambda m: self._handle("image", m, self._on_image), qos
        )

    def _follow_camera_reliability(self) -> None:
        """Best effort receives any camera; a reliable publisher gets a reliable subscription (whole frames)."""
        infos = self.get_publishers_info_by_topic(self.resolve_topic_name(self.topics.image))
        kinds = ["best_effort" if i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT else "reliable"
                 for i in infos]  # fmt: skip
        wanted = subscription_reliability(kinds, self._image_reliability)
        if wanted != self._image_reliability:
            self._image_reliability = wanted
            self._subscribe_image()

    def _handle(self, kind: str, msg, log_it) -> None:
        self.received[kind] = self.received.get(kind, 0) + 1
        try:
            with self._lock:
                if self.log.closed:
                    return
                log_it(msg)
        except (ValueError, TypeError) as exc:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            allowed, held = self._throttle.allow(kind)
            if allowed:
                more = f" ({held} more like this held back)" if held else ""
                self.get_logger().warning(f"dropped a {kind} message: {exc}{more}")

    def _at(self, header) -> None:
        ns = stamp_ns(header)
        self._last_stamp_ns = ns if self._last_stamp_ns is None else max(self._last_stamp_ns, ns)
        self.log.set_time_ns(ns)

    # -- per message --------------------------------------------------------------------------------------------
    def _on_image(self, msg) -> None:
        rgb = compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else image_to_rgb(msg)
        self._at(msg.header)
        self.log.image(rgb)

    def _on_info(self, msg: CameraInfo) -> None:
        k = intrinsics_from_camera_info(msg)
        info = (np.asarray(k, dtype=np.float64), int(msg.width), int(msg.height))
        if self._depth_info is None or not (
            np.array_equal(info[0], self._depth_info[0]) and info[1:] == self._depth_info[1:]
        ):
            self._depth_info = info
            self._at(msg.header)
            self.log.pinhole(*info)

    def _on_depth(self, msg: Image) -> None:
        depth = depth_array(msg)
        self._at(msg.header)
        self.log.depth(depth)

    def _on_points(self, msg: PointCloud2) -> None:
        xyz, rgb = pointcloud2_to_xyzrgb(msg)
        self._at(msg.header)
        self.log.points(xyz, rgb)

    def _on_pose(self, msg: PoseStamped) -> None:
        p, q = msg.pose.position, msg.pose.orientation
        self._at(msg.header)
        self.log.pose([p.x, p.y, p.z], [q.x, q.y, q.z, q.w])

    def _on_instruction(self, msg: String) -> None:
        if self._last_stamp_ns is not None:
            self.log.set_time_ns(self._last_stamp_ns)
        else:  # nothing stamped yet: the node's clock (the same clock the stack stamps with)
            self.log.set_time_ns(self.get_clock().now().nanoseconds)
        self.log.instruction(msg.data)

    def _on_action(self, msg) -> None:
        t, r = msg.translation, msg.rotation
        self._at(msg.header)
        self.log.action([t.x, t.y, t.z, r.x, r.y, r.z, msg.gripper], stop=bool(msg.stop))

    def summary(self) -> str:
        parts = [f"{k} {n}" + (f" ({self.errors[k]} dropped)" if self.errors.get(k) else "")
                 for k, n in sorted(self.received.items())]  # fmt: skip
        return "received " + (", ".join(parts) if parts else "nothing")
