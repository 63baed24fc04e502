"""Camera geometry used by the heads, their losses and the perception node.

Conventions (one set, everywhere):
* poses are camera-to-world 4x4 matrices; the world of a stream is its first camera frame;
* camera axes are OpenCV's (x right, y down, z forward) and so are pixel coordinates: the centre of pixel
  (column u, row v) is at (u, v), as in ROS ``CameraInfo``; "the image centre" is ((W - 1) / 2, (H - 1) / 2);
* quaternions are (x, y, z, w), real part last;
* the pose encoding is ``[quaternion (4), translation (3), field of view (fov_y, fov_x) (2)]`` in radians,
  with the principal point at the image centre (paper section 3.3);
* ray maps are ``[origin (3), direction (3)]`` in the world frame, the direction scaled so that its
  camera-frame z is 1: then ``points = origin + depth * direction`` with depth the usual z-depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quaternion_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyzw (normalised here) -> (..., 3, 3) rotation."""
    x, y, z, w = F.normalize(quat, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*quat.shape[:-1], 3, 3)  # fmt: skip


def matrix_to_quaternion(rot: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation -> (..., 4) xyzw with w >= 0 (numerically safe branch per element)."""
    m = rot
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    candidates = torch.stack(
        [
            torch.stack(
                [m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1], 1 + trace], -1
            ),
            torch.stack(
                [
                    1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                    m[..., 0, 1] + m[..., 1, 0],
                    m[..., 0, 2] + m[..., 2, 0],
                    m[..., 2, 1] - m[..., 1, 2],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 0, 1] + m[..., 1, 0],
                    1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2],
                    m[..., 1, 2] + m[..., 2, 1],
                    m[..., 0, 2] - m[..., 2, 0],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 0, 2] + m[..., 2, 0],
                    m[..., 1, 2] + m[..., 2, 1],
                    1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2],
                    m[..., 1, 0] - m[..., 0, 1],
                ],
                -1,
            ),
        ],
        dim=-2,
    )  # (..., 4 candidates, 4)
    diag = torch.stack([trace, m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]], -1)
    best = diag.argmax(-1, keepdim=True)
    quat = torch.gather(candidates, -2, best[..., None].expand(*best.shape, 4)).squeeze(-2)
    quat = F.normalize(quat, dim=-1)
    return torch.where(quat[..., 3:] < 0, -quat, quat)


def intrinsics_from_fov(fov: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., 2) (fov_y, fov_x) radians -> (..., 3, 3) pinhole intrinsics, principal point at the image centre."""
    fy = (height / 2) / torch.tan(fov[..., 0] / 2)
    fx = (width / 2) / torch.tan(fov[..., 1] / 2)
    k = torch.zeros(*fov.shape[:-1], 3, 3, dtype=fov.dtype, device=fov.device)
    k[..., 0, 0], k[..., 1, 1] = fx, fy
    k[..., 0, 2], k[..., 1, 2], k[..., 2, 2] = (width - 1) / 2, (height - 1) / 2, 1.0
    return k


def fov_from_intrinsics(k: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., 3, 3) -> (..., 2) (fov_y, fov_x)."""
    return torch.stack([2 * torch.atan((height / 2) / k[..., 1, 1]), 2 * torch.atan((width / 2) / k[..., 0, 0])], -1)


def pose_encoding_to_matrix(pose_enc: torch.Tensor) -> torch.Tensor:
    """(..., 9) -> (..., 4, 4) camera-to-world."""
    mat = torch.zeros(*pose_enc.shape[:-1], 4, 4, dtype=pose_enc.dtype, device=pose_enc.device)
    mat[..., :3, :3] = quaternion_to_matrix(pose_enc[..., :4])
    mat[..., :3, 3] = pose_enc[..., 4:7]
    mat[..., 3, 3] = 1.0
    return mat


def matrix_to_pose_encoding(
    cam_to_world: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """(..., 4, 4) and (..., 3, 3) -> (..., 9) ground-truth pose encoding."""
    quat = matrix_to_quaternion(cam_to_world[..., :3, :3])
    return torch.cat([quat, cam_to_world[..., :3, 3], fov_from_intrinsics(intrinsics, height, width)], -1)


def pixel_rays(intrinsics: torch.Tensor, cam_to_world: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Ground-truth ray map (..., H, W, 6): origin and direction (camera-frame z = 1) in the world frame."""
    dtype, device = intrinsics.dtype, intrinsics.device
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device),
        torch.arange(width, dtype=dtype, device=device),
        indexing="ij",
    )
    pix = torch.stack([u, v, torch.ones_like(u)], -1)  # (H, W, 3)
    k_inv = torch.linalg.inv(intrinsics)
    cam_dirs = torch.einsum("...ij,hwj->...hwi", k_inv, pix)
    rot, trans = cam_to_world[..., :3, :3], cam_to_world[..., :3, 3]
    dirs = torch.einsum("...ij,...hwj->...hwi", rot, cam_dirs)
    origins = trans[..., None, None, :].expand_as(dirs)
    return torch.cat([origins, dirs], -1)


def depth_to_world_points(depth: torch.Tensor, intrinsics: torch.Tensor, cam_to_world: torch.Tensor) -> torch.Tensor:
    """(..., H, W) z-depth -> (..., H, W, 3) world points."""
    rays = pixel_rays(intrinsics, cam_to_world, depth.shape[-2], depth.shape[-1])
    return rays[..., :3] + depth[..., None] * rays[..., 3:]
