"""``SyntheticTabletopStandIn``: analytic ray-cast scenes for fast tests when no rendered data is given.

A stand-in for the pybullet tabletop generator (``omnistream_sim.tabletop``), used by the ``debug`` preset
and the unit tests because it costs milliseconds: a checkered table plane (z = 0) with two coloured boxes,
seen by a camera orbiting and bobbing above it. Depth, intrinsics and camera poses are exact (ray-plane and
ray-box intersections), captions are templated from the scene ("a red box left of a blue box ..."), and
items have the same keys and conventions as ``data.GeometryFolder``.
"""

from __future__ import annotations

import math

import torch

COLOURS = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.7, 0.2),
    "blue": (0.15, 0.3, 0.85),
    "yellow": (0.9, 0.8, 0.15),
    "purple": (0.6, 0.2, 0.7),
    "orange": (0.95, 0.5, 0.1),
}


def look_at(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Camera-to-world 4x4 in OpenCV axes (x right, y down, z forward), world z up."""
    forward = torch.nn.functional.normalize(target - eye, dim=0)
    right = torch.nn.functional.normalize(
        torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype)), dim=0
    )
    down = torch.linalg.cross(forward, right)
    pose = torch.eye(4, dtype=eye.dtype)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye
    return pose


def _ray_box(origin, dirs, lo, hi):
    """Slab test: (t_hit, normal axis) for rays origin (3,), dirs (N, 3); t = inf where missed."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t1, t2 = (lo - origin) * inv, (hi - origin) * inv
    t_near, axis = torch.minimum(t1, t2).max(dim=1)
    t_far = torch.maximum(t1, t2).min(dim=1).values
    hit = (t_near <= t_far) & (t_near > 1e-4)
    return torch.where(hit, t_near, torch.full_like(t_near, math.inf)), axis


def render_scene(scene: dict, cam_to_world: torch.Tensor, size: int, focal: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb (3, S, S) in [0, 1], z-depth (S, S)) of the scene from one camera (OpenCV intrinsics)."""
    c = (size - 1) / 2
    v, u = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    cam_dirs = torch.stack([(u - c) / focal, (v - c) / focal, torch.ones_like(u)], -1).reshape(-1, 3)
    dirs = cam_dirs @ cam_to_world[:3, :3].T  # camera z = 1, so the ray parameter is the z-depth
    origin = cam_to_world[:3, 3]
    t_plane = torch.where(dirs[:, 2] < -1e-9, -origin[2] / dirs[:, 2], torch.full_like(dirs[:, 2], math.inf))
    hit = origin + t_plane[:, None] * dirs
    checker = ((torch.floor(hit[:, 0] / 0.1) + torch.floor(hit[:, 1] / 0.1)) % 2).abs()
    rgb = (0.45 + 0.25 * checker)[:, None].expand(-1, 3) * torch.tensor([1.0, 0.95, 0.85], dtype=torch.float64)
    depth = t_plane
    shade = torch.tensor([0.8, 0.65, 1.0], dtype=torch.float64)  # x faces, y faces, top
    for box in scene["boxes"]:
        lo, hi = box["centre"] - box["half"], box["centre"] + box["half"]
        t_box, axis = _ray_box(origin, dirs, lo, hi)
        closer = t_box < depth
        colour = torch.tensor(COLOURS[box["colour"]], dtype=torch.float64)[None] * shade[axis][:, None]
        rgb = torch.where(closer[:, None], colour, rgb)
        depth = torch.where(closer, t_box, depth)
    depth = torch.where(torch.isfinite(depth), depth, torch.zeros_like(depth))
    return rgb.T.reshape(3, size, size).float().clamp(0, 1), depth.reshape(size, size).float()


def caption_for(scene: dict) -> str:
    a, b = scene["boxes"]
    side = "left of" if a["centre"][1] > b["centre"][1] else "right of"
    size = "small" if a["half"][2] < b["half"][2] else "large"
    return f"a {size} {a['colour']} box {side} a {b['colour']} box on a checkered table"


class SyntheticTabletopStandIn:
    """``sequences`` scenes x clips of ``frames`` frames at ``size`` px (square), generated up front."""

    def __init__(self, sequences: int, frames: int, size: int, seed: int = 0, fov_deg: float = 40.0) -> None:
        if sequences < 1 or frames < 1 or size < 8:
            raise ValueError(f"need sequences >= 1, frames >= 1, size >= 8; got {sequences}, {frames}, {size}")
        gen = torch.Generator().manual_seed(seed)
        focal = (size / 2) / math.tan(math.radians(fov_deg) / 2)
        self.items = []
        names = list(COLOURS)

        def u(lo, hi):
            return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64)

        for _ in range(sequences):
            pick = torch.randperm(len(names), generator=gen)[:2]
            boxes = []
            for k, idx in enumerate(pick.tolist()):
                half = torch.stack([u(0.04, 0.09), u(0.04, 0.09), u(0.03, 0.1)])
                centre = torch.stack([u(-0.15, 0.15), u(0.05, 0.2) * (1 if k == 0 else -1), half[2]])
                boxes.append({"colour": names[idx], "centre": centre, "half": half})
            scene = {"boxes": boxes}
            radius, height = u(0.55, 0.8), u(0.85, 1.15)
            angle, speed, bob = u(0, 2 * math.pi), u(0.04, 0.12) * (1 if u(0, 1) > 0.5 else -1), u(0.0, 0.03)
            target = torch.stack([u(-0.05, 0.05), u(-0.05, 0.05), torch.zeros((), dtype=torch.float64)])
            rgbs, depths, poses = [], [], []
            for t in range(frames):
                a = angle + speed * t
                eye = torch.stack([radius * torch.cos(a), radius * torch.sin(a), height + bob * math.sin(t)])
                pose = look_at(eye, target)
                rgb, depth = render_scene(scene, pose, size, focal)
                rgbs.append(rgb)
                depths.append(depth)
                poses.append(pose.float())
            k = torch.tensor([[focal, 0, (size - 1) / 2], [0, focal, (size - 1) / 2], [0, 0, 1]], dtype=torch.float32)
            self.items.append(
                {
                    "rgb": torch.stack(rgbs),
                    "depth": torch.stack(depths),
                    "intrinsics": k.expand(frames, 3, 3).clone(),
                    "cam_to_world": torch.stack(poses),
                    "caption": caption_for(scene),
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return dict(self.items[i])
