"""perception_node's camera pose on TF, sent as tf2's broadcasters send it (REP-105 frames, REP-103 optical axes).

Frames (README "Frames and units"):

* ``world_frame_id`` is the stream's world: the optical frame of the stream's first camera (x right, y down,
  z forward; not a REP-103 z-up frame). Each stream restart (``~/reset``, time going backwards, a new resolution)
  begins a new world at the camera's pose then.
* the camera frame is an optical frame: ``tf.camera_frame``, or the image header's ``frame_id`` when that is empty
  (so ``~/depth`` and its CameraInfo, which carry the image header, agree with TF). A frame has one parent in TF:
  when the robot's TF already holds the camera's frame, name another one here.
* ``/tf``: world -> camera, one transform per processed frame, stamped with the image's stamp; the same pose as
  ``~/pose`` (``perception_messages.pose_message`` does the matrix -> quaternion once, for both).
* ``/tf_static`` (transient local, depth 1, as tf2's static broadcaster): with ``tf.anchor_parent_frame`` set, the
  static transform anchor parent -> world, i.e. where the stream's first camera optical frame sits on the robot
  (e.g. ``base_link`` of a robot that stands still, ``odom`` of one that moves).

Several cameras: every camera has its own world (``world_frame_id`` + ``_<camera>``) and camera frame
(``tf.camera_frame`` + ``_<camera>`` when set); one anchor cannot hold for them all, so it is refused at start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from geometry_msgs.msg import TransformStamped
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from ..camera_pipeline import Wanted
from .perception_messages import pose_message

# tf2_ros's TransformBroadcaster and StaticTransformBroadcaster QoS, so tf2 listeners match them.
TF_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
TF_STATIC_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
TF_PARAMETER_NAMES = ("tf.publish", "tf.camera_frame", "tf.anchor_parent_frame", "tf.anchor_translation",
                      "tf.anchor_rotation")  # fmt: skip


@dataclass(frozen=True)
class TfSettings:
    """The ``tf.*`` parameters, checked (rclpy-free)."""

    publish: bool = True
    camera_frame: str = ""  # '' = the image header's frame_id
    anchor_parent_frame: str = ""  # '' = no anchor
    anchor_translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    anchor_rotation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)  # unit quaternion x, y, z, w

    @classmethod
    def from_node_parameters(cls, params: Mapping[str, Any]) -> TfSettings:
        q = np.asarray(list(params["tf.anchor_rotation"]), dtype=np.float64)
        return cls(
            publish=bool(params["tf.publish"]),
            camera_frame=str(params["tf.camera_frame"]),
            anchor_parent_frame=str(params["tf.anchor_parent_frame"]),
            anchor_translation=tuple(float(v) for v in params["tf.anchor_translation"]),
            anchor_rotation=tuple(float(v) for v in q / np.linalg.norm(q)),  # unit within 1e-3 (checked): exact
        )

    def camera_frames(self, cameras: Sequence[str], suffixed: bool) -> dict[str, str]:
        """Camera name -> configured camera frame ('' = the image header's), ``_<camera>`` added when ``suffixed``
        (the node's ``cameras`` list is set, as for ``world_frame_id``)."""
        if not self.camera_frame:
            return dict.fromkeys(cameras, "")
        return {c: self.camera_frame + (f"_{c}" if suffixed else "") for c in cameras}

    def check(self, world_frames: Mapping[str, str], suffixed: bool) -> None:
        """ValueError when the frames of ``world_frames`` (camera name -> world frame) cannot form a TF tree."""
        worlds = set(world_frames.values())
        anchor = self.anchor_parent_frame
        if anchor and len(world_frames) > 1:
            raise ValueError(
                f"tf.anchor_parent_frame {anchor!r} with several cameras: each stream has its own world frame "
                f"({', '.join(sorted(worlds))}); anchor them with static transforms of your own"
            )
        if anchor in worlds:
            raise ValueError(f"tf.anchor_parent_frame {anchor!r} is the stream's world frame: a transform to itself")
        for name, frame in self.camera_frames(list(world_frames), suffixed).items():
            if frame and frame in worlds | {anchor}:
                raise ValueError(f"tf.camera_frame {frame!r} of camera {name} is also a parent frame: a TF loop")


def camera_transform(pose: np.ndarray, stamp, world_frame: str, camera_frame: str) -> TransformStamped:
    """The 4x4 camera-to-world ``pose`` as the transform world -> camera (the pose of ``~/pose``)."""
    p = pose_message(pose, stamp, world_frame).pose
    t = TransformStamped(header=Header(stamp=stamp, frame_id=world_frame), child_frame_id=camera_frame)
    tr, q = t.transform.translation, t.transform.rotation
    tr.x, tr.y, tr.z = p.position.x, p.position.y, p.position.z
    q.x, q.y, q.z, q.w = p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w
    return t


def anchor_transform(settings: TfSettings, world_frame: str, stamp) -> TransformStamped:
    """The static transform anchor parent -> the stream's world."""
    t = TransformStamped(header=Header(stamp=stamp, frame_id=settings.anchor_parent_frame), child_frame_id=world_frame)
    tr, q = t.transform.translation, t.transform.rotation
    tr.x, tr.y, tr.z = settings.anchor_translation
    q.x, q.y, q.z, q.w = settings.anchor_rotation
    return t


class TransformPublisher:
    """A node's ``/tf`` and ``/tf_static`` outputs, created with its other outputs (``keep_output`` of a managed node).

    ``names``: the node's ``cameras`` list (empty: one camera, ``camera``). Reads ``world_frame_id`` and the
    ``tf.*`` parameters; ValueError (a start-up error, before any model is loaded) when the frames cannot form a
    TF tree."""

    def __init__(self, node, names: Sequence[str]) -> None:
        settings = TfSettings.from_node_parameters({n: node.get_parameter(n).value for n in TF_PARAMETER_NAMES})
        world = node.get_parameter("world_frame_id").value
        # the node's world frames: world_frame_id, suffixed _<camera> when the cameras are named
        self.world_frames = {name: world + (f"_{name}" if names else "") for name in names or ["camera"]}
        settings.check(self.world_frames, suffixed=bool(names))
        self._node, self.settings = node, settings
        self._camera_frames = settings.camera_frames(list(self.world_frames), suffixed=bool(names))
        keep = getattr(node, "keep_output", lambda entity: entity)
        self._tf = keep(node.create_publisher(TFMessage, "/tf", TF_QOS))
        self._static = keep(node.create_publisher(TFMessage, "/tf_static", TF_STATIC_QOS))

    def publish_enabled(self) -> bool:
        return bool(self._node.get_parameter("tf.publish").value)

    def with_pose(self, cam, wanted: Wanted) -> Wanted:
        """What the model must compute for ``cam``: ``wanted``, plus the pose when a transform is wanted
        (``tf.publish`` on, a ``/tf`` listener, a camera head: without one, /tf listeners must not make the model
        run). ``~/pose`` itself is published by ``wanted`` alone."""
        poses = cam.session.has_heads and cam.session.stream.camera_token
        if poses and self.publish_enabled() and self._tf.get_subscription_count() > 0:
            return dataclasses.replace(wanted, pose=True)
        return wanted

    def publish_static(self) -> None:
        """Sends the anchor (if any) once; transient local keeps it for every later listener."""
        if not self.settings.anchor_parent_frame:
            return
        stamp = self._node.get_clock().now().to_msg()
        transforms = [anchor_transform(self.settings, world, stamp) for world in self.world_frames.values()]
        self._static.publish(TFMessage(transforms=transforms))

    def publish_camera(self, cam, pose: np.ndarray | None, header, warn: Callable[[Any, str, str], None]) -> None:
        """Sends world -> camera for one frame of ``cam``; a frame it cannot send is counted as an error on
        ``/diagnostics`` and reported through ``warn(cam, kind, text)`` (the node's throttled log)."""
        if pose is None or not self.publish_enabled():
            return
        frame, world = self._camera_frames[cam.name] or header.frame_id, cam.world_frame_id
        problem = None
        if not frame or frame == world or frame.startswith("/"):
            problem = (
                f"no camera transform on /tf: the image's frame_id {header.frame_id!r} cannot be the camera frame "
                f"(empty, '/'-prefixed or the world frame {world!r}); set tf.camera_frame"
            )
        elif not np.isfinite(pose).all():
            problem = "no camera transform on /tf: the pose is not finite"
        if problem is not None:
            cam.stats.error(problem)
            warn(cam, "tf", problem)
            return
        self._tf.publish(TFMessage(transforms=[camera_transform(pose, header.stamp, world, frame)]))
