"""perception_node's output messages from one frame's result (message building only: no node, no rclpy)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Path
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Header

from omnistream_msgs.msg import StreamFeatures

from ..camera_pipeline import Wanted
from ..model.geometry import matrix_to_quaternion
from .image import camera_info_from_intrinsics, depth_to_msg, intrinsics_from_camera_info
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


def given_intrinsics(info: CameraInfo | None, size: tuple[int, int]) -> np.ndarray | None:
    """K of a CameraInfo scaled to an image of ``size`` (H, W); None without one. ValueError when K is unset."""
    if info is None:
        return None
    k = intrinsics_from_camera_info(info).copy()
    if info.width and info.height and (info.width, info.height) != (size[1], size[0]):
        k[0] *= size[1] / info.width
        k[1] *= size[0] / info.height
    return k


def output_messages(
    result,
    header,
    rgb: np.ndarray,
    wanted: Wanted,
    intrinsics: np.ndarray | None,
    world_frame_id: str,
    points_stride: int,
    add_pose: Callable[[PoseStamped], list[Any]],
) -> Iterator[tuple[str, Any]]:
    """(output key, message) for every wanted output of one frame; each pose goes into the path via ``add_pose``."""
    if wanted.features:
        yield "features", features_message(result, header)
    if result.depth is not None and wanted.depth:
        yield "depth", depth_to_msg(result.depth, header)
        k = intrinsics if intrinsics is not None else result.intrinsics
        if k is not None:
            yield "depth_info", camera_info_from_intrinsics(k, rgb.shape[1], rgb.shape[0], header)
    if result.pose is not None:
        pose = pose_message(result.pose, header.stamp, world_frame_id)
        if wanted.pose:
            yield "pose", pose
        poses = add_pose(pose)
        if wanted.path:
            yield "path", Path(header=pose.header, poses=list(poses))
    if result.points is not None and wanted.points:
        h, w = rgb.shape[:2]
        points = result.points.reshape(h, w, 3)[::points_stride, ::points_stride].reshape(-1, 3)
        colors = rgb[::points_stride, ::points_stride].reshape(-1, 3)
        world = Header(stamp=header.stamp, frame_id=world_frame_id)
        yield "points", xyzrgb_to_pointcloud2(points, colors, world)
