"""``perception_node``: the OmniStream streaming backbone on ROS 2 image topics.

Per camera (default: one camera on the relative, remappable topics ``image``, ``image/compressed`` and
``camera_info``; with ``cameras: [front, wrist]`` the inputs are ``front/image`` ... and the outputs
``~/front/features`` ...):

* ``~/features`` (omnistream_msgs/StreamFeatures, the image's header, frame_index since the last reset)
* ``~/depth`` (32FC1 metres, the image's header) and ``~/depth/camera_info``
* ``~/pose`` (PoseStamped in the stream's world frame = its first camera frame) and ``~/path`` (nav_msgs/Path)
* ``~/points`` (PointCloud2 xyz + rgb in the world frame; CameraInfo intrinsics when given, else predicted)
* ``/diagnostics`` (rate, latency, cache size, dropped frames, errors) and the ``~/reset`` service (Trigger).

Depth, pose and points need geometry heads in the checkpoint; without them the node publishes features only
and says so once.

Real-time design: image callbacks only store the latest message per camera (sensor-data QoS, depth 1); one
worker thread decodes and runs the model, so a slow model drops frames instead of building a backlog. Outputs
nobody subscribes to are not computed, and with no subscriber at all the model does not run. Time going
backwards (a looping bag) or a resolution change restarts that camera's stream with a warning. Bad input is
logged, counted in diagnostics and dropped; the node keeps serving.
"""

from __future__ import annotations

import array
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Path
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from omnistream_msgs.msg import StreamFeatures

from .diagnostics import DiagnosticsPublisher, StreamStats
from .model.geometry import matrix_to_quaternion
from .node_main import run_node
from .perception import CAMERA_TOKEN_CHOICES
from .ros_image import (
    camera_info_from_intrinsics,
    compressed_to_rgb,
    depth_to_msg,
    image_to_rgb,
    intrinsics_from_camera_info,
)
from .ros_pointcloud import xyzrgb_to_pointcloud2

NODE_NAME = "perception_node"

# Sensor data QoS with depth 1: the callback only ever sees the newest frame (never a backlog).
SENSOR_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=qos_profile_sensor_data.reliability,
    durability=qos_profile_sensor_data.durability,
)
# Outputs are reliable (both reliable and best-effort subscribers match) with a short queue.
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)

_CAMERA_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


@dataclass(frozen=True)
class ParamSpec:
    default: Any
    description: str
    read_only: bool = False  # read-only ones are fixed at start (model, sessions, topics)


PARAMETERS: dict[str, ParamSpec] = {
    "checkpoint": ParamSpec("", "backbone checkpoint: a directory (config.json + model.safetensors) or a hub id", True),
    "device": ParamSpec("cpu", "torch device: cpu | cuda | cuda:N | mps", True),
    "dtype": ParamSpec("float32", "model dtype: float32 | bfloat16 | float16", True),
    "max_side": ParamSpec(0, "resize (aspect kept) so the longer side is <= max_side px; 0 = input size", True),
    "window": ParamSpec(0, "bounded KV cache in frames (oldest dropped, sink kept); 0 = whole stream", True),
    "sink": ParamSpec(1, "first frames always kept in a bounded cache", True),
    "feature_pooling": ParamSpec(
        2, "average pooling of the patch grid per frame (2 = 2x2 as the paper's LLM input)", True
    ),
    "feature_dtype": ParamSpec("float16", "dtype of StreamFeatures.patch_tokens: float16 | float32", True),
    "camera_token": ParamSpec("auto", "run with the camera token: auto (when heads exist) | true | false", True),
    "cameras": ParamSpec(
        Parameter.Type.STRING_ARRAY,
        "camera names; each gets <name>/image inputs and ~/<name>/... outputs. Unset = one camera on `image`",
        True,
    ),
    "world_frame_id": ParamSpec(
        "omnistream_world", "frame_id of pose/path/points (suffixed _<camera> with several cameras)"
    ),
    "publish_features": ParamSpec(True, "publish ~/features"),
    "publish_depth": ParamSpec(True, "publish ~/depth and ~/depth/camera_info (needs heads)"),
    "publish_pose": ParamSpec(True, "publish ~/pose (needs heads)"),
    "publish_path": ParamSpec(True, "publish ~/path (needs heads)"),
    "publish_points": ParamSpec(True, "publish ~/points (needs heads)"),
    "points_stride": ParamSpec(4, "keep every N-th pixel in rows and columns for ~/points"),
    "max_path_length": ParamSpec(2000, "poses kept in ~/path"),
    "reset_on_time_jump": ParamSpec(True, "restart the stream when image time goes backwards (looping bag)"),
    "diagnostics_period": ParamSpec(1.0, "seconds between /diagnostics reports", True),
    "image_reliability": ParamSpec(
        "best_effort",
        "image QoS (depth 1 either way): best_effort (sensor data) | reliable. Across processes Fast DDS drops "
        "most best-effort images above ~0.5 MB unless FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA; reliable avoids it",
        True,
    ),
}


def validate_parameter(name: str, value: Any) -> str | None:
    """A reason why ``value`` is bad for parameter ``name``, or None when it is fine."""
    if name == "checkpoint" and not str(value).strip():
        return "checkpoint is required: a checkpoint directory or a hub id"
    if name == "device" and not _DEVICE.match(str(value)):
        return f"device must be cpu, cuda, cuda:N or mps, got {value!r}"
    if name == "dtype" and value not in ("float32", "bfloat16", "float16"):
        return f"dtype must be float32, bfloat16 or float16, got {value!r}"
    if name == "feature_dtype" and value not in ("float16", "float32"):
        return f"feature_dtype must be float16 or float32, got {value!r}"
    if name == "image_reliability" and value not in ("best_effort", "reliable"):
        return f"image_reliability must be best_effort or reliable, got {value!r}"
    if name == "camera_token" and value not in CAMERA_TOKEN_CHOICES:
        return f"camera_token must be auto, true or false, got {value!r}"
    if name == "max_side" and value != 0 and value < 16:
        return f"max_side must be 0 (input size) or >= 16, got {value}"
    if name in ("window", "sink") and value < 0:
        return f"{name} must be >= 0, got {value}"
    if name in ("feature_pooling", "points_stride", "max_path_length") and value < 1:
        return f"{name} must be >= 1, got {value}"
    if name == "diagnostics_period" and value <= 0:
        return f"diagnostics_period must be > 0 s, got {value}"
    if name == "cameras" and value is not None:
        names = list(value)
        bad = [n for n in names if not _CAMERA_NAME.match(n)]
        if bad:
            return f"camera names must be letters, digits and _ (starting with a letter), got {bad}"
        if len(set(names)) != len(names):
            return f"camera names must be unique, got {names}"
    return None


@dataclass
class CameraStream:
    """State of one camera: its session, pending frame, outputs and counters."""

    name: str
    session: Any
    stats: StreamStats
    world_frame_id: str
    publishers: dict[str, Any] = field(default_factory=dict)
    pending: tuple[Any, float] | None = None  # (message, receive time) of the newest unprocessed frame
    process_lock: threading.Lock = field(default_factory=threading.Lock)
    last_stamp_ns: int | None = None
    input_size: tuple[int, int] | None = None
    camera_info: CameraInfo | None = None
    path: Path = field(default_factory=Path)
    idle_skipped: int = 0  # frames not processed because no output had a subscriber

    def restart(self) -> None:
        """Reset the model stream and everything tied to it (call with process_lock held)."""
        self.session.reset()
        self.last_stamp_ns = None
        self.input_size = None
        self.path = Path()


def _stamp_ns(msg) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


def features_message(result, header) -> StreamFeatures:
    msg = StreamFeatures()
    msg.header = header
    msg.frame_index = int(result.frame_index)
    tokens = np.ascontiguousarray(result.patch_tokens)
    msg.grid_height, msg.grid_width, msg.dim = (int(v) for v in tokens.shape)
    msg.dtype = str(tokens.dtype)
    # bytes / float32 buffers, never numpy arrays: rosidl copies arrays element by element.
    msg.patch_tokens = tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes()
    msg.cls_token = array.array("f", np.asarray(result.cls_token, dtype=np.float32).tobytes())
    if result.camera_token is not None:
        msg.camera_token = array.array("f", np.asarray(result.camera_token, dtype=np.float32).tobytes())
    return msg


class PerceptionNode(Node):
    """The perception node; construct it in any process (``parameter_overrides`` for tests, bring-up)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        try:
            self._setup(node_name)
        except BaseException:
            Node.destroy_node(self)  # bad parameters or checkpoint: leave nothing behind in the context
            raise
        names = ", ".join(self.cameras)
        self.get_logger().info(
            f"perception on camera(s) {names}; checkpoint {self._param('checkpoint')} on {self._param('device')}"
            + ("" if self.has_heads else " (features only: no geometry heads)")
        )

    def _setup(self, node_name: str) -> None:
        for name, spec in PARAMETERS.items():
            descriptor = ParameterDescriptor(description=spec.description, read_only=spec.read_only)
            self.declare_parameter(name, spec.default, descriptor)
        problems = [p for name in PARAMETERS if (p := validate_parameter(name, self._param(name)))]
        if problems:
            raise ValueError("bad perception_node parameters: " + "; ".join(problems))
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._wake = threading.Condition()
        self._stop = False
        self.diagnostics = DiagnosticsPublisher(self, period_s=self._param("diagnostics_period"))
        self.cameras: dict[str, CameraStream] = {}
        self._build_sessions()
        self.create_service(Trigger, "~/reset", self._on_reset)
        self._worker = threading.Thread(target=self._work, name=f"{node_name}-worker", daemon=True)
        self._worker.start()

    # -- parameters -----------------------------------------------------------------------------------------------
    def _param(self, name: str) -> Any:
        # An unset STRING_ARRAY (``cameras``) has no value; rclpy raises for it instead of returning None.
        return self.get_parameter_or(name, Parameter(name, value=None)).value

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for p in params:
            if p.name not in PARAMETERS:
                continue
            reason = validate_parameter(p.name, p.value)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    # -- setup ----------------------------------------------------------------------------------------------------
    def _build_sessions(self) -> None:
        from .model import OmniStreamModel
        from .model.configuration_omnistream import CONFIG_NAME
        from .model.heads import GeometryHeads
        from .model.modeling_omnistream import WEIGHTS_NAME, resolve_pretrained_dir
        from .perception import PerceptionConfig, PerceptionSession

        camera_token = CAMERA_TOKEN_CHOICES[self._param("camera_token")]
        config = PerceptionConfig(
            checkpoint=self._param("checkpoint"),
            device=self._param("device"),
            dtype=self._param("dtype"),
            max_side=self._param("max_side") or None,
            window=self._param("window") or None,
            sink=self._param("sink"),
            feature_pooling=self._param("feature_pooling"),
            camera_token=camera_token,
            feature_dtype=self._param("feature_dtype"),
        )
        # One model (and heads) shared by all cameras; each camera has its own stream (KV cache).
        directory = resolve_pretrained_dir(config.checkpoint, [CONFIG_NAME, WEIGHTS_NAME])
        model = OmniStreamModel.from_pretrained(directory)
        heads = GeometryHeads.from_pretrained(directory) if GeometryHeads.present(directory) else None
        self.has_heads = heads is not None

        image_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE
            if self._param("image_reliability") == "reliable"
            else SENSOR_QOS.reliability,
            durability=SENSOR_QOS.durability,
        )
        names = list(self._param("cameras") or [])
        multi = bool(names)
        for name in names or ["camera"]:
            inputs = f"{name}/" if multi else ""
            outputs = f"~/{name}/" if multi else "~/"
            world = f"{self._param('world_frame_id')}_{name}" if multi else self._param("world_frame_id")
            cam = CameraStream(
                name=name,
                session=PerceptionSession(model, heads, config),
                stats=self.diagnostics.stats(name),
                world_frame_id=world,
            )
            pubs = cam.publishers
            pubs["features"] = self.create_publisher(StreamFeatures, outputs + "features", OUTPUT_QOS)
            if self.has_heads:
                pubs["depth"] = self.create_publisher(Image, outputs + "depth", OUTPUT_QOS)
                pubs["depth_info"] = self.create_publisher(CameraInfo, outputs + "depth/camera_info", OUTPUT_QOS)
                pubs["pose"] = self.create_publisher(PoseStamped, outputs + "pose", OUTPUT_QOS)
                pubs["path"] = self.create_publisher(Path, outputs + "path", OUTPUT_QOS)
                pubs["points"] = self.create_publisher(PointCloud2, outputs + "points", OUTPUT_QOS)
            else:
                cam.stats.set_level(DiagnosticStatus.OK, "features only: the checkpoint has no geometry heads")
            self.create_subscription(Image, inputs + "image", lambda m, c=cam: self._on_image(c, m), image_qos)
            self.create_subscription(
                CompressedImage, inputs + "image/compressed", lambda m, c=cam: self._on_image(c, m), image_qos
            )
            self.create_subscription(
                CameraInfo, inputs + "camera_info", lambda m, c=cam: setattr(c, "camera_info", m), SENSOR_QOS
            )
            self.cameras[name] = cam
        if not self.has_heads:
            self.get_logger().warning(
                "the checkpoint has no geometry heads: publishing features only (no depth, pose, path, points)"
            )

    # -- callbacks (cheap: store the newest frame) ----------------------------------------------------------------
    def _on_image(self, cam: CameraStream, msg) -> None:
        now = time.perf_counter()
        cam.stats.received()
        with self._wake:
            if cam.pending is not None:
                cam.stats.dropped()  # the model is still busy: the older frame is superseded
            cam.pending = (msg, now)
            self._wake.notify()

    def _on_reset(self, request, response):
        for cam in self.cameras.values():
            with cam.process_lock:
                cam.restart()
            with self._wake:
                cam.pending = None
        response.success = True
        response.message = f"restarted {len(self.cameras)} stream(s)"
        self.get_logger().info(response.message)
        return response

    # -- worker ---------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not any(c.pending for c in self.cameras.values()):
                    self._wake.wait(timeout=0.5)
                if self._stop:
                    return
                jobs = [(cam, cam.pending) for cam in self.cameras.values() if cam.pending is not None]
                for cam, _ in jobs:
                    cam.pending = None
            for cam, (msg, received_at) in jobs:
                try:
                    with cam.process_lock:
                        self._process(cam, msg, received_at)
                except ValueError as exc:  # bad input: report and drop, keep serving
                    cam.stats.error(str(exc))
                    self.get_logger().warning(f"[{cam.name}] dropped a bad image: {exc}", throttle_duration_sec=1.0)
                except Exception as exc:  # noqa: BLE001 - a model failure must not kill the node
                    cam.stats.error(f"{type(exc).__name__}: {exc}")
                    self.get_logger().error(f"[{cam.name}] processing failed: {type(exc).__name__}: {exc}")

    def _wanted(self, cam: CameraStream) -> dict[str, bool]:
        def listened(key: str, param: str) -> bool:
            pub = cam.publishers.get(key)
            return pub is not None and self._param(param) and pub.get_subscription_count() > 0

        return {
            "features": listened("features", "publish_features"),
            "depth": listened("depth", "publish_depth") or listened("depth_info", "publish_depth"),
            "pose": listened("pose", "publish_pose"),
            "path": listened("path", "publish_path"),
            "points": listened("points", "publish_points"),
        }

    def _process(self, cam: CameraStream, msg, received_at: float) -> None:
        wanted = self._wanted(cam)
        if not any(wanted.values()):
            cam.idle_skipped += 1  # nobody listens: the model does not run
            cam.stats.set_value("idle_skipped", cam.idle_skipped)
            return
        rgb = compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else image_to_rgb(msg)

        stamp = _stamp_ns(msg)
        if cam.last_stamp_ns is not None and stamp < cam.last_stamp_ns and self._param("reset_on_time_jump"):
            self.get_logger().warning(f"[{cam.name}] image time went backwards (looping bag?): restarting the stream")
            cam.restart()
        if cam.input_size is not None and cam.input_size != rgb.shape[:2]:
            self.get_logger().warning(
                f"[{cam.name}] resolution changed from {cam.input_size[1]}x{cam.input_size[0]} to "
                f"{rgb.shape[1]}x{rgb.shape[0]}: restarting the stream"
            )
            cam.restart()
        cam.last_stamp_ns, cam.input_size = stamp, rgb.shape[:2]

        intrinsics = self._given_intrinsics(cam, rgb.shape[:2])
        result = cam.session.process(
            rgb,
            want_depth=wanted["depth"] or wanted["points"],
            want_pose=wanted["pose"] or wanted["path"] or wanted["points"],
            want_points=wanted["points"],
            intrinsics=intrinsics,
        )
        header = msg.header
        pubs = cam.publishers
        if wanted["features"]:
            pubs["features"].publish(features_message(result, header))
        if result.depth is not None and wanted["depth"]:
            pubs["depth"].publish(depth_to_msg(result.depth, header))
            k = intrinsics if intrinsics is not None else result.intrinsics
            if k is not None:
                pubs["depth_info"].publish(camera_info_from_intrinsics(k, rgb.shape[1], rgb.shape[0], header))
        if result.pose is not None:
            pose = self._pose_message(cam, result.pose, header)
            if wanted["pose"]:
                pubs["pose"].publish(pose)
            cam.path.header = pose.header
            cam.path.poses.append(pose)
            del cam.path.poses[: max(0, len(cam.path.poses) - self._param("max_path_length"))]
            if wanted["path"]:
                pubs["path"].publish(cam.path)
        if result.points is not None and wanted["points"]:
            stride = self._param("points_stride")
            h, w = rgb.shape[:2]
            points = result.points.reshape(h, w, 3)[::stride, ::stride].reshape(-1, 3)
            colors = rgb[::stride, ::stride].reshape(-1, 3)
            header_world = Header(stamp=header.stamp, frame_id=cam.world_frame_id)
            pubs["points"].publish(xyzrgb_to_pointcloud2(points, colors, header_world))

        cam.stats.processed(latency_s=time.perf_counter() - received_at)
        cam.stats.set_value("frame_index", result.frame_index)
        cam.stats.set_value("cache_frames", cam.session.cached_frames)
        cam.stats.set_value("cache_mb", f"{cam.session.cache_bytes / 2**20:.1f}")
        for key, value in result.timings.items():
            cam.stats.set_value(key, f"{value:.2f}")

    def _given_intrinsics(self, cam: CameraStream, size: tuple[int, int]) -> np.ndarray | None:
        """K from the camera's CameraInfo scaled to the image size, or None (then the predicted FOV is used)."""
        info = cam.camera_info
        if info is None:
            return None
        try:
            k = intrinsics_from_camera_info(info).copy()
        except ValueError as exc:
            cam.stats.error(f"camera_info ignored: {exc}")
            return None
        if info.width and info.height and (info.width, info.height) != (size[1], size[0]):
            k[0] *= size[1] / info.width
            k[1] *= size[0] / info.height
        return k

    def _pose_message(self, cam: CameraStream, pose: np.ndarray, header) -> PoseStamped:
        msg = PoseStamped()
        msg.header.stamp = header.stamp
        msg.header.frame_id = cam.world_frame_id
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in pose[:3, 3])
        q = matrix_to_quaternion(torch.from_numpy(np.ascontiguousarray(pose[:3, :3]))).tolist()
        msg.pose.orientation.x, msg.pose.orientation.y, msg.pose.orientation.z, msg.pose.orientation.w = q
        return msg

    # -- shutdown -------------------------------------------------------------------------------------------------
    def destroy_node(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout=10.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    return run_node(PerceptionNode, NODE_NAME, args)


if __name__ == "__main__":
    raise SystemExit(main())
