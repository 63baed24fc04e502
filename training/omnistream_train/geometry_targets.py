"""Normalised ground truth for the geometry losses (paper eq. 6-8, "following VGGT").

A clip's cameras are re-expressed in its first camera frame (the convention of
``omnistream_perception.model.geometry``), then every length (depth, translations, ray origins, points) is
divided by one scale per clip: the mean distance of the valid world points to the first camera. The heads
thus learn scale-free geometry, and the same clip seen at another metric scale gives the same targets.
"""

from __future__ import annotations

import torch

from omnistream_perception.model.geometry import depth_to_world_points, matrix_to_pose_encoding, pixel_rays


def normalised_geometry_targets(
    depth: torch.Tensor, intrinsics: torch.Tensor, cam_to_world: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """depth (B,T,H,W) metres (0 = unknown), intrinsics (B,T,3,3), cam_to_world (B,T,4,4) ->
    dict(depth, rays (B,T,H,W,6), points (B,T,H,W,3), pose_enc (B,T,9), valid (B,T,H,W), scale (B,))."""
    if depth.ndim != 4 or intrinsics.shape[:2] != depth.shape[:2] or cam_to_world.shape[:2] != depth.shape[:2]:
        raise ValueError(
            "expected depth (B,T,H,W), intrinsics (B,T,3,3), cam_to_world (B,T,4,4) with matching B,T; got "
            f"{tuple(depth.shape)}, {tuple(intrinsics.shape)}, {tuple(cam_to_world.shape)}"
        )
    depth, intrinsics, cam_to_world = depth.double(), intrinsics.double(), cam_to_world.double()
    if valid is None:
        valid = torch.isfinite(depth) & (depth > 0)
    valid = valid.bool()
    depth = torch.where(valid, depth, torch.zeros_like(depth))
    height, width = depth.shape[-2:]
    # the first camera becomes the world frame
    relative = torch.linalg.inv(cam_to_world[:, :1]) @ cam_to_world
    points = depth_to_world_points(depth, intrinsics, relative)
    distance = points.norm(dim=-1)
    count = valid.flatten(1).sum(1).clamp(min=1)
    scale = (distance * valid).flatten(1).sum(1) / count
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s = scale.view(-1, 1, 1, 1)
    rays = pixel_rays(intrinsics, relative, height, width)
    rays = torch.cat([rays[..., :3] / s[..., None], rays[..., 3:]], -1)
    pose_enc = matrix_to_pose_encoding(relative, intrinsics, height, width)
    pose_enc = torch.cat([pose_enc[..., :4], pose_enc[..., 4:7] / scale.view(-1, 1, 1), pose_enc[..., 7:]], -1)
    return {
        "depth": (depth / s).float(),
        "rays": rays.float(),
        "points": (points / s[..., None]).float(),
        "pose_enc": pose_enc.float(),
        "valid": valid,
        "scale": scale.float(),
    }
