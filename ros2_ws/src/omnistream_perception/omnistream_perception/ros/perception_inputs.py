"""perception_node's image inputs (a ROS helper of the node): each camera's subscriptions and their QoS.

The subscriptions are the node's lifecycle inputs (created at activate, destroyed at deactivate). With
``image_reliability: auto`` the image subscriptions follow the camera publisher's reliability (reliable when it is:
large images then arrive whole between processes); samples the middleware saw go missing feed the pipeline's
arrival counts, and the pipeline's transport notice (a best-effort camera losing frames) is logged once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from ..camera_pipeline import CameraStream, subscription_reliability
from .perception_messages import stamp_ns

SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=qos_profile_sensor_data.reliability)
# A few images of queue: a callback held up by a busy executor still gets them (each supersedes the one waiting
# for the worker, so the model never sees a backlog); depth 1 would lose them in the subscription's queue.
IMAGE_QUEUE_DEPTH = 5
IMAGE_KEYS = ("image", "image/compressed")
_RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}


class CameraInputs:
    """Opens and re-opens the input subscriptions of the cameras on ``node`` (a ``ManagedNode``)."""

    def __init__(self, node, on_image: Callable[[CameraStream, Any], None]) -> None:
        self._node, self._on_image = node, on_image

    def open(self, cam: CameraStream, setting: str) -> None:
        """Subscribes the camera's images (``setting``: auto | reliable | best_effort), CameraInfo and, with
        ``scale_source: depth_topic``, the depth sensor (``depth_sensor``)."""
        for key in IMAGE_KEYS:
            self._subscribe(cam, key, "reliable" if setting == "auto" else setting)
        info = self._node.create_subscription(
            CameraInfo, cam.inputs + "camera_info", lambda m, c=cam: setattr(c, "camera_info", m), SENSOR_QOS
        )
        self._node.keep_input(info)
        geometry = cam.pipeline.geometry
        if geometry.config.scale_source == "depth_topic":  # a registered depth sensor gives the metric scale
            self._node.keep_input(self._node.create_subscription(
                Image, cam.inputs + "depth_sensor", lambda m, g=geometry: g.sensor.add(stamp_ns(m), m), SENSOR_QOS
            ))  # fmt: skip

    def follow_all(self, cameras: Mapping[str, CameraStream], param: Callable[[str], Any]) -> None:
        """The periodic check while active: every camera's ``follow_publishers`` (``param`` reads a parameter)."""
        auto = param("image_reliability") == "auto"
        for cam in list(cameras.values()):
            self.follow_publishers(cam, auto)

    def follow_publishers(self, cam: CameraStream, auto: bool) -> None:
        """Matches the image subscriptions to the publishers' reliability (``auto``) and reports transport loss."""
        node, found = self._node, []
        for key, (sub, current) in list(cam.subscriptions.items()):
            infos = node.get_publishers_info_by_topic(sub.topic_name)
            rels = ["best_effort" if i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT else "reliable"
                    for i in infos]  # fmt: skip
            found += rels
            wanted = subscription_reliability(rels, current) if auto else current
            if wanted != current:
                node.get_logger().info(f"[{cam.name}] {sub.topic_name}: {wanted} subscription (publisher's QoS)")
                self._subscribe(cam, key, wanted)
        if "image" not in cam.subscriptions:
            return
        cam.pipeline.observe_publishers(found, cam.subscriptions["image"][1])
        notice = cam.pipeline.transport_notice()
        if notice is not None:
            node.get_logger().warning(f"[{cam.name}] {notice}")
            cam.stats.set_level(DiagnosticStatus.WARN, notice)
        for k, v in cam.pipeline.diagnostics_values().items():
            cam.stats.set_value(k, v)

    def _subscribe(self, cam: CameraStream, key: str, reliability: str) -> None:
        old = cam.subscriptions.pop(key, None)
        if old is not None:
            self._node.drop_input(old[0])
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=IMAGE_QUEUE_DEPTH, reliability=_RELIABILITY[reliability]
        )
        msg_type = CompressedImage if key.endswith("compressed") else Image
        # samples the middleware saw go missing (sequence gaps): the exact transport loss of a best-effort camera
        lost = SubscriptionEventCallbacks(
            message_lost=lambda info, c=cam: c.pipeline.arrivals.add_lost(info.total_count_change)
        )
        sub = self._node.create_subscription(
            msg_type, cam.inputs + key, lambda m, c=cam: self._on_image(c, m), qos, event_callbacks=lost
        )
        cam.subscriptions[key] = (self._node.keep_input(sub), reliability)
