"""``perception_node``: the OmniStream streaming backbone on ROS 2 image topics.

Per camera (default: one camera on the relative, remappable topics ``image``, ``image/compressed`` and
``camera_info``; with ``cameras: [front, wrist]`` the inputs are ``front/image`` ... and the outputs
``~/front/features`` ...): ``~/features`` (StreamFeatures, the image's header), ``~/depth`` (32FC1 metres, with a
``scale_source``; else ``~/depth_scale_free``) + ``camera_info``, ``~/pose``, ``~/path`` (world = the stream's first
camera frame; ``/tf`` too), ``~/points`` (xyz + rgb), ``/diagnostics``, ``~/reset`` (Trigger); units: ``depth_units``.

A managed (lifecycle) node (``~/change_state``, ``~/get_state``): configure loads the model and heads and creates
the outputs; activate subscribes to the cameras; deactivate ends output (the frame in flight finishes first);
cleanup frees the model. With ``autostart`` (default) it configures and activates itself at start. ``~/reset``
and ``/diagnostics`` (with the lifecycle state) exist in every state.

The ROS side only: parameters (table in ``perception_parameters``), topics, timers. What happens to a frame (newest
frame wins, stamp checks, restarts, output gating, transport notices) is ``camera_pipeline`` (rclpy-free); the
input subscriptions and their QoS are ``perception_inputs``; messages are built in ``perception_messages``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage
from std_srvs.srv import Trigger

from omnistream_msgs.msg import StreamFeatures

from ..camera_pipeline import (
    OUTPUT_SWITCHES,
    CameraPipeline,
    CameraStream,
    LatestFrameWorker,
    LogThrottle,
    Wanted,
    restart_streams,
)
from ..depth_units import UnitsConfig, units_notice
from ..image_codec import compressed_to_rgb, image_to_rgb
from ..transport import large_data_env
from .diagnostics import DiagnosticsPublisher
from .managed_node import ManagedNode
from .node_main import exit_process, run_node
from .node_params import declare_parameters, parameter_value
from .perception_inputs import CameraInputs
from .perception_messages import frame_messages, geometry_topics, stamp_ns
from .perception_parameters import PARAMETERS, validate_parameter  # noqa: F401 - the node's table, re-exported
from .transforms import TransformPublisher

NODE_NAME = "perception_node"
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)
RESET_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
STOP_TIMEOUT_S = 60.0  # the frame in flight is finished before the node goes (bounded by the input limits)


class PerceptionNode(ManagedNode):
    """The perception node; construct it in any process (``parameter_overrides`` for tests, bring-up)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        try:
            self._setup()
        except BaseException:
            self.destroy_node()  # bad parameters or checkpoint: leave nothing behind in the context
            raise

    def _setup(self) -> None:
        self._worker: LatestFrameWorker | None = None
        self._active, self.has_heads = False, False
        self.cameras: dict[str, CameraStream] = {}
        cameras = dataclasses.replace(PARAMETERS["cameras"], default=Parameter.Type.STRING_ARRAY)
        declare_parameters(self, {**PARAMETERS, "cameras": cameras})  # ValueError naming every bad value
        self.log_throttle = LogThrottle(interval_s=5.0)
        self.diagnostics = DiagnosticsPublisher(self, period_s=self._param("diagnostics_period"))
        self._names = list(self._param("cameras") or [])
        self._inputs_of = CameraInputs(self, self._on_image)
        self.state_changed("unconfigured")
        self.create_service(Trigger, "~/reset", self._on_reset, qos_profile=RESET_QOS)
        if self._param("autostart"):
            self.autostart()

    def _param(self, name: str) -> Any:
        return parameter_value(self, name, PARAMETERS)

    # -- lifecycle (managed_node does the bookkeeping) -----------------------------------------------------------
    def configure(self) -> None:
        self._tf = TransformPublisher(self, self._names)  # /tf, /tf_static; ValueError: frames that make no tree
        self._build_sessions()
        self._worker = LatestFrameWorker(self._process_safely, name=f"{self.get_name()}-worker")
        self.get_logger().info(
            f"perception on camera(s) {', '.join(self.cameras)}; checkpoint {self._param('checkpoint')} on "
            f"{self._param('device')} ({self._backend.describe()})"
            + (f"; {units_notice(self._param('scale_source'))}" if self.has_heads else " (features only: no heads)")
        )

    def activate(self) -> None:
        for cam in self.cameras.values():
            self._inputs_of.open(cam, self._param("image_reliability"))
        self.keep_input(self.create_timer(0.5, lambda: self._inputs_of.follow_all(self.cameras, self._param)))
        self._tf.publish_static()
        self._active = True

    def deactivate(self) -> None:
        self._active = False  # from here no frame is published
        for cam in self.cameras.values():
            cam.subscriptions.clear()  # destroyed with the other inputs
            if self._worker is not None:
                self._worker.discard(cam.name)
            with cam.pipeline.lock:  # the frame in flight, if any, has finished
                pass

    def release(self) -> None:
        self._active = False
        self._stop_worker()
        self.cameras, self.has_heads = {}, False

    def state_changed(self, label: str) -> None:
        for name in self._names or ["camera"]:
            stats = self.diagnostics.stats(name)
            stats.set_value("lifecycle_state", label)
            if label != "active":
                stats.set_level(DiagnosticStatus.OK, f"{label}: no output")
            elif not self.has_heads:
                stats.set_level(DiagnosticStatus.OK, "features only: the checkpoint has no geometry heads")
            else:
                stats.set_level(DiagnosticStatus.OK)

    def _build_sessions(self) -> None:
        from ..deploy.stream_backend import StreamBackend
        from ..perception import PerceptionConfig, PerceptionSession, check_device, load_backbone_and_heads

        config = PerceptionConfig.from_node_parameters(params := {n: self._param(n) for n in PARAMETERS})
        check_device(config.device)  # before loading the checkpoint for nothing
        self._backend = StreamBackend.from_node_parameters(params, config)  # onnxruntime: the file fits the settings
        model, heads = load_backbone_and_heads(config.checkpoint)  # one model for all cameras, a stream each
        self.has_heads = heads is not None
        multi = bool(self._names)
        for name in self._names or ["camera"]:
            world = self._param("world_frame_id") + (f"_{name}" if multi else "")
            inputs, outputs = (f"{name}/", f"~/{name}/") if multi else ("", "~/")
            session = self._backend.attach(PerceptionSession(model, heads, config))
            pipeline = CameraPipeline(name, session, inputs + "image", units=UnitsConfig.from_node_parameters(params))
            cam = CameraStream(name, pipeline, self.diagnostics.stats(name), world, inputs)
            pubs = cam.publishers
            pubs["features"] = self.create_publisher(StreamFeatures, outputs + "features", OUTPUT_QOS)
            if self.has_heads:
                for key, msg_type, topic in geometry_topics(self._param("scale_source")):
                    pubs[key] = self.create_publisher(msg_type, outputs + topic, OUTPUT_QOS)
            for pub in pubs.values():
                self.keep_output(pub)
            self.cameras[name] = cam
        if not self.has_heads:
            self.get_logger().warning("the checkpoint has no geometry heads: publishing features only")

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
        elif self._worker is not None and self._worker.put(cam.name, (msg, time.perf_counter())):
            cam.stats.dropped()  # the model is still busy: the older frame is superseded

    def _on_reset(self, request, response):
        response.success, response.message = True, restart_streams(list(self.cameras.values()), self._worker)
        self.get_logger().info(response.message, throttle_duration_sec=1.0)
        return response

    # -- worker ---------------------------------------------------------------------------------------------------
    def _process_safely(self, name: str, item) -> None:
        cam = self.cameras.get(name)
        if cam is None:
            return
        try:
            with cam.pipeline.lock:
                if self._active:  # else deactivated while the frame waited: no output
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
        if not (run := self._tf.with_pose(cam, wanted)).any():  # run: plus the pose when /tf wants it
            pipeline.idle_skipped += 1  # nobody listens: the model does not run
            return
        limit = self._param("max_input_pixels")
        rgb = compressed_to_rgb(msg, limit) if isinstance(msg, CompressedImage) else image_to_rgb(msg, limit)
        pipeline.reset_on_time_jump = self._param("reset_on_time_jump")
        pipeline.max_path_length = self._param("max_path_length")
        for reason in pipeline.prepare(stamp_ns(msg), rgb.shape[:2]):
            self._warn(cam, "restart", reason)
        result = pipeline.run(rgb, run)
        frame = pipeline.finish(result, cam.camera_info, rgb.shape[:2], stamp_ns(msg))
        for kind, text in frame.notices:  # CameraInfo ignored, no scale yet, a bad depth sensor image
            self._warn(cam, kind, text)
        stride = self._param("points_stride")
        outputs = frame_messages(result, frame, msg.header, rgb, wanted, cam.world_frame_id, stride, pipeline.add_pose)
        for key, out in outputs:
            cam.publishers[key].publish(out)
        self._tf.publish_camera(cam, frame.pose, msg.header, self._warn)
        cam.stats.processed(latency_s=time.perf_counter() - received_at)
        for key, value in pipeline.frame_values(result).items():
            cam.stats.set_value(key, value)

    def _stop_worker(self) -> None:
        worker, self._worker = getattr(self, "_worker", None), None
        if worker is not None and not worker.stop(timeout=STOP_TIMEOUT_S):
            self.get_logger().error(f"the frame in flight did not finish within {STOP_TIMEOUT_S:g} s")

    def destroy_node(self) -> None:
        self._stop_worker()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    os.environ.update(large_data_env())  # this process's side of the large-image settings (a user's profile wins)
    exit_process(run_node(PerceptionNode, NODE_NAME, args))


if __name__ == "__main__":
    main()
