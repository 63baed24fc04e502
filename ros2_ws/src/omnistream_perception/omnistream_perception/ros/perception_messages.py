"""perception_node's output messages from one frame's result (message building only: no node, no rclpy).

What the geometry means (units, invalid pixels as NaN, the world frame, the camera's lens) is settled before, by the
pipeline (``depth_units.StreamGeometry``); this module only writes it into messages."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Path
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header

from omnistream_msgs.msg import StreamFeatures

from ..camera_model import CameraModel
from ..camera_pipeline import Wanted
from ..depth_units import FrameGeometry, depth_topic_name
from ..model.geometry import matrix_to_quaternion
from .image import camera_info_from_intrinsics, depth_to_msg
from .pointcloud import xyzrgb_to_pointcloud2


def stamp_ns(msg) -> int:
    """The header stamp of ``msg`` in nanoseconds."""
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


def features_message(result, header) -> StreamFeatures:
    from ..features_codec import fill_features_message

    return fill_features_message(
        StreamFeatures(), result.patch_tokens, result.cls_token, result.camera_token, result.frame_index, header
    )


def pose_message(pose: np.ndarray, stamp, frame_id: str) -> PoseStamped:
    """A 4x4 camera-to-world matrix as a PoseStamped in ``frame_id``."""
    msg = PoseStamped(header=Header(stamp=stamp, frame_id=frame_id))
    p = msg.pose
    p.position.x, p.position.y, p.position.z = (float(v) for v in pose[:3, 3])
    q = matrix_to_quaternion(torch.from_numpy(np.ascontiguousarray(pose[:3, :3]))).tolist()
    p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w = q
    return msg


def geometry_topics(scale_source: str) -> list[tuple[str, type, str]]:
    """(output key, message type, relative topic) of the geometry outputs: depth goes on ``depth`` when it is metres,
    on ``depth_scale_free`` otherwise (REP 118: 32FC1 depth is metres)."""
    depth = depth_topic_name(scale_source)
    return [("depth", Image, depth), ("depth_info", CameraInfo, depth + "/camera_info"), ("pose", PoseStamped, "pose"),
            ("path", Path, "path"), ("points", PointCloud2, "points")]  # fmt: skip


def depth_camera_info(camera: CameraModel | None, given: CameraInfo | None, header) -> CameraInfo | None:
    """The CameraInfo of the published depth (the input image's pixel grid): the camera's own CameraInfo when it was
    used (its lens distortion included), else the model's pinhole intrinsics; None without either."""
    if given is not None:
        info = CameraInfo(header=header, height=given.height, width=given.width, distortion_model=given.distortion_model,
                          d=list(given.d), k=list(given.k), r=list(given.r), p=list(given.p))  # fmt: skip
        info.binning_x, info.binning_y, info.roi = given.binning_x, given.binning_y, given.roi
        return info
    if camera is None:
        return None
    return camera_info_from_intrinsics(camera.k, camera.width, camera.height, header)


def frame_messages(
    result,
    frame: FrameGeometry,
    header,
    rgb: np.ndarray,
    wanted: Wanted,
    world_frame_id: str,
    points_stride: int,
    add_pose: Callable[[PoseStamped], list[Any]],
) -> Iterator[tuple[str, Any]]:
    """(output key, message) for every wanted output of one frame; each pose goes into the path via ``add_pose``.

    ``frame``: the pipeline's finished geometry (units, NaN for invalid pixels, poses relative to the stream's first
    camera, the camera's CameraInfo when it was used). The key ``depth`` is the node's publisher for the units
    (:func:`geometry_topics`)."""
    if wanted.features:
        yield "features", features_message(result, header)
    if frame.depth is not None and wanted.depth:
        yield "depth", depth_to_msg(frame.depth, header)
        info = depth_camera_info(frame.camera, frame.camera_info, header)
        if info is not None:
            yield "depth_info", info
    if frame.pose is not None:
        pose = pose_message(frame.pose, header.stamp, world_frame_id)
        if wanted.pose:
            yield "pose", pose
        poses = add_pose(pose)
        if wanted.path:
            yield "path", Path(header=pose.header, poses=list(poses))
    if wanted.points:
        points = frame.world_points(points_stride)
        if points is not None:
            colors = rgb[::points_stride, ::points_stride].reshape(-1, 3)
            world = Header(stamp=header.stamp, frame_id=world_frame_id)
            yield "points", xyzrgb_to_pointcloud2(points, colors, world)
