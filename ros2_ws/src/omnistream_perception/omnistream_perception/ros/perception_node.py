"""``perception_node``: the OmniStream streaming backbone on ROS 2 image topics.

Per camera (default: one camera on the relative, remappable topics ``image``, ``image/compressed`` and
``camera_info``; with ``cameras: [front, wrist]`` the inputs are ``front/image`` ... and the outputs
``~/front/features`` ...): ``~/features`` (StreamFeatures, the image's header), ``~/depth`` (32FC1 metres) and
``~/depth/camera_info``, ``~/pose`` and ``~/path`` (world = the stream's first camera frame), ``~/points``
(PointCloud2 xyz + rgb), ``/diagnostics`` (rate, latency, cache, dropped frames, frames received vs expected,
errors) and the ``~/reset`` service (Trigger). Depth, pose and points need geometry heads in the checkpoint.

The ROS side only: parameters (table in ``perception_parameters``), topics, timers. What happens to a frame (newest
frame wins, stamp checks, restarts, output gating, transport notices) is ``camera_pipeline`` (rclpy-free); messages
are built in ``perception_messages``. With ``image_reliability: auto`` the image subscriptions follow the camera
publisher's reliability (reliable when it is: large images then arrive whole between processes).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Path
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_srvs.srv import Trigger

from omnistream_msgs.msg import StreamFeatures

from ..camera_pipeline import (
    OUTPUT_SWITCHES,
    CameraPipeline,
    CameraStream,
    LatestFrameWorker,
    LogThrottle,
    Wanted,
    subscription_reliability,
)
from ..image_codec import compressed_to_rgb, image_to_rgb
from ..transport import large_data_env
from .diagnostics import DiagnosticsPublisher
from .node_main import exit_process, run_node
from .node_params import declare_parameters, parameter_value
from .perception_messages import given_intrinsics, output_messages, stamp_ns
from .perception_parameters import PARAMETERS, validate_parameter  # noqa: F401 - the node's table, re-exported

NODE_NAME = "perception_node"
SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=qos_profile_sensor_data.reliability)
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)
# A few images of queue: a callback held up by a busy executor still gets them (each supersedes the one waiting
# for the worker, so the model never sees a backlog); depth 1 would lose them in the subscription's queue.
IMAGE_QUEUE_DEPTH = 5
RESET_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
_RELIABILITY = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT}
STOP_TIMEOUT_S = 60.0  # the frame in flight is finished before the node goes (bounded by the input limits)


class PerceptionNode(Node):
    """The perception node; construct it in any process (``parameter_overrides`` for tests, bring-up)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        try:
            self._setup(node_name)
        except BaseException:
            Node.destroy_node(self)  # bad parameters or checkpoint: leave nothing behind in the context
            raise
        self.get_logger().info(
            f"perception on camera(s) {', '.join(self.cameras)}; checkpoint {self._param('checkpoint')} on "
            f"{self._param('device')}" + ("" if self.has_heads else " (features only: no geometry heads)")
        )

    def _setup(self, node_name: str) -> None:
        cameras = dataclasses.replace(PARAMETERS["cameras"], default=Parameter.Type.STRING_ARRAY)
        declare_parameters(self, {**PARAMETERS, "cameras": cameras})  # ValueError naming every bad value
        self.log_throttle = LogThrottle(interval_s=5.0)
        self.diagnostics = DiagnosticsPublisher(self, period_s=self._param("diagnostics_period"))
        self.cameras: dict[str, CameraStream] = {}
        self._build_sessions()
        self.create_service(Trigger, "~/reset", self._on_reset, qos_profile=RESET_QOS)
        self._worker = LatestFrameWorker(self._process_safely, name=f"{node_name}-worker")
        self.create_timer(0.5, self._check_transport)

    def _param(self, name: str) -> Any:
        return parameter_value(self, name, PARAMETERS)

    def _build_sessions(self) -> None:
        from ..perception import PerceptionConfig, PerceptionSession, check_device, load_backbone_and_heads

        config = PerceptionConfig.from_node_parameters({name: self._param(name) for name in PARAMETERS})
        check_device(config.device)  # before loading the checkpoint for nothing
        model, heads = load_backbone_and_heads(config.checkpoint)  # one model for all cameras, a stream each
        self.has_heads = heads is not None
        names = list(self._param("cameras") or [])
        for name in names or ["camera"]:
            multi = bool(names)
            world = self._param("world_frame_id") + (f"_{name}" if multi else "")
            inputs, outputs = (f"{name}/", f"~/{name}/") if multi else ("", "~/")
            session = PerceptionSession(model, heads, config)
            cam = CameraStream(name, CameraPipeline(name, session, inputs + "image"), self.diagnostics.stats(name),
                               world, inputs)  # fmt: skip
            pubs = cam.publishers
            pubs["features"] = self.create_publisher(StreamFeatures, outputs + "features", OUTPUT_QOS)
            if self.has_heads:
                for key, msg_type, topic in [("depth", Image, "depth"), ("depth_info", CameraInfo, "depth/camera_info"),
                                             ("pose", PoseStamped, "pose"), ("path", Path, "path"),
                                             ("points", PointCloud2, "points")]:  # fmt: skip
                    pubs[key] = self.create_publisher(msg_type, outputs + topic, OUTPUT_QOS)
            else:
                cam.stats.set_level(DiagnosticStatus.OK, "features only: the checkpoint has no geometry heads")
            start = "reliable" if self._param("image_reliability") == "auto" else self._param("image_reliability")
            for key in ("image", "image/compressed"):
                self._subscribe(cam, key, start)
            self.create_subscription(CameraInfo, inputs + "camera_info",
                                     lambda m, c=cam: setattr(c, "camera_info", m), SENSOR_QOS)  # fmt: skip
            self.cameras[name] = cam
        if not self.has_heads:
            self.get_logger().warning("the checkpoint has no geometry heads: publishing features only")

    def _subscribe(self, cam: CameraStream, key: str, reliability: str) -> None:
        old = cam.subscriptions.pop(key, None)
        if old is not None:
            self.destroy_subscription(old[0])
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=IMAGE_QUEUE_DEPTH, reliability=_RELIABILITY[reliability]
        )
        msg_type = CompressedImage if key.endswith("compressed") else Image
        # samples the middleware saw go missing (sequence gaps): the exact transport loss of a best-effort camera
        lost = SubscriptionEventCallbacks(
            message_lost=lambda info, c=cam: c.pipeline.arrivals.add_lost(info.total_count_change)
        )
        sub = self.create_subscription(
            msg_type, cam.inputs + key, lambda m, c=cam: self._on_image(c, m), qos, event_callbacks=lost
        )
        cam.subscriptions[key] = (sub, reliability)

    def _warn(self, cam: CameraStream, kind: str, text: str, error: bool = False) -> None:
        allowed, held = self.log_throttle.allow(f"{cam.name}/{kind}")
        if allowed:
            more = f" ({held} more like this held back)" if held else ""
            (self.get_logger().error if error else self.get_logger().warning)(f"[{cam.name}] {text}{more}")

    # -- callbacks (cheap: count, check the stamp, store the newest frame) ---------------------------------------
    def _on_image(self, cam: CameraStream, msg) -> None:
        cam.stats.received()
        pipeline = cam.pipeline
        pipeline.max_stamp_ahead_s = self._param("max_stamp_ahead")
        drop = pipeline.check_arrival(stamp_ns(msg), self.get_clock().now().nanoseconds, len(msg.data))
        if drop is not None:
            cam.stats.error(drop)
            self._warn(cam, "stamp", drop)
        elif self._worker.put(cam.name, (msg, time.perf_counter())):
            cam.stats.dropped()  # the model is still busy: the older frame is superseded

    def _on_reset(self, request, response):
        deferred = [cam.name for cam in self.cameras.values() if not cam.pipeline.request_restart()]
        for name in self.cameras:
            self._worker.discard(name)
        response.success = True
        response.message = f"restarted {len(self.cameras)} stream(s)"
        if deferred:
            response.message += f" ({', '.join(deferred)}: after the frame in flight)"
        self.get_logger().info(response.message, throttle_duration_sec=1.0)
        return response

    def _check_transport(self) -> None:
        """Follows the camera publishers' reliability (auto) and reports lost frames once per camera."""
        auto = self._param("image_reliability") == "auto"
        for cam in self.cameras.values():
            found = []
            for key, (sub, current) in list(cam.subscriptions.items()):
                infos = self.get_publishers_info_by_topic(sub.topic_name)
                rels = ["best_effort" if i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT else "reliable"
                        for i in infos]  # fmt: skip
                found += rels
                wanted = subscription_reliability(rels, current) if auto else current
                if wanted != current:
                    self.get_logger().info(f"[{cam.name}] {sub.topic_name}: {wanted} subscription (publisher's QoS)")
                    self._subscribe(cam, key, wanted)
            cam.pipeline.observe_publishers(found, cam.subscriptions["image"][1])
            notice = cam.pipeline.transport_notice()
            if notice is not None:
                self.get_logger().warning(f"[{cam.name}] {notice}")
                cam.stats.set_level(DiagnosticStatus.WARN, notice)
            for k, v in cam.pipeline.diagnostics_values().items():
                cam.stats.set_value(k, v)

    # -- worker ---------------------------------------------------------------------------------------------------
    def _process_safely(self, name: str, item) -> None:
        cam = self.cameras[name]
        try:
            with cam.pipeline.lock:
                self._process(cam, *item)
        except ValueError as exc:  # bad input: report and drop, keep serving
            cam.stats.error(str(exc))
            self._warn(cam, "bad_image", f"dropped a bad image: {exc}")
        except Exception as exc:  # noqa: BLE001 - a model failure must not kill the node
            if not self.context.ok():  # shut down while the frame was in flight: nothing left to publish to
                return
            cam.stats.error(f"{type(exc).__name__}: {exc}")
            self._warn(cam, "failure", f"processing failed: {type(exc).__name__}: {exc}", error=True)

    def _listened(self, cam: CameraStream) -> dict[str, bool]:
        pubs = cam.publishers
        return {
            k: k in pubs and self._param(p) and pubs[k].get_subscription_count() > 0 for k, p in OUTPUT_SWITCHES.items()
        }

    def _process(self, cam: CameraStream, msg, received_at: float) -> None:
        wanted, pipeline = Wanted.from_listened(self._listened(cam)), cam.pipeline
        if not wanted.any():
            pipeline.idle_skipped += 1  # nobody listens: the model does not run
            return
        limit = self._param("max_input_pixels")
        rgb = compressed_to_rgb(msg, limit) if isinstance(msg, CompressedImage) else image_to_rgb(msg, limit)
        pipeline.reset_on_time_jump = self._param("reset_on_time_jump")
        pipeline.max_path_length = self._param("max_path_length")
        for reason in pipeline.prepare(stamp_ns(msg), rgb.shape[:2]):
            self._warn(cam, "restart", reason)
        try:
            intrinsics = given_intrinsics(cam.camera_info, rgb.shape[:2])
        except ValueError as exc:
            cam.stats.error(f"camera_info ignored: {exc}")
            intrinsics = None
        result = pipeline.run(rgb, wanted, intrinsics)
        stride = self._param("points_stride")
        outputs = output_messages(
            result, msg.header, rgb, wanted, intrinsics, cam.world_frame_id, stride, pipeline.add_pose
        )
        for key, out in outputs:
            cam.publishers[key].publish(out)
        cam.stats.processed(latency_s=time.perf_counter() - received_at)
        for key, value in pipeline.frame_values(result).items():
            cam.stats.set_value(key, value)

    def destroy_node(self) -> None:
        if not self._worker.stop(timeout=STOP_TIMEOUT_S):
            self.get_logger().error(f"the frame in flight did not finish within {STOP_TIMEOUT_S:g} s")
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    os.environ.update(large_data_env())  # this process's side of the large-image settings (a user's profile wins)
    exit_process(run_node(PerceptionNode, NODE_NAME, args))


if __name__ == "__main__":
    main()
