"""Pinhole cameras for pybullet with ground truth in computer-vision conventions.

pybullet thinks in OpenGL (camera looks down -z, y up, a non-linear depth buffer in [0, 1]). Everything this
module returns is in the convention the perception stack uses:

* ``rgb``: (H, W, 3) uint8;
* ``depth``: (H, W) float32, metres along the optical axis (planar z-depth, not ray length);
  pixels that hit nothing read ``far``;
* ``intrinsics``: 3x3 ``K`` for integer pixel coordinates (column u, row v), so ``x_cam = (u - cx) / fx * depth``;
  the principal point is TinyRenderer's actual one (see ``CameraSpec.intrinsics``);
* ``cam_to_world``: 4x4 camera-to-world pose in the OpenCV frame (x right, y down, z forward), metres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class CameraSpec:
    """Image size and lens of one camera; the pose is given per render."""

    width: int = 128
    height: int = 128
    fov_deg: float = 60.0  # vertical field of view, as pybullet defines it
    near: float = 0.02
    far: float = 3.0

    def intrinsics(self) -> np.ndarray:
        fy = (self.height / 2.0) / math.tan(math.radians(self.fov_deg) / 2.0)
        fx = fy  # square pixels: pybullet's horizontal fov follows from the aspect ratio
        # TinyRenderer samples rays at pixel corners and flips rows on output, so in integer pixel coordinates
        # the optical axis sits at (W/2, H/2 - 1), not at the geometric centre ((W-1)/2, (H-1)/2). Measured:
        # back-projected table depth is then exact to 1e-6 m at any size and camera roll (tests check it).
        return np.array(
            [[fx, 0.0, self.width / 2.0], [0.0, fy, self.height / 2.0 - 1.0], [0.0, 0.0, 1.0]],
            dtype=np.float32,
        )


@dataclass
class CameraFrame:
    rgb: np.ndarray
    depth: np.ndarray
    intrinsics: np.ndarray
    cam_to_world: np.ndarray


def look_at_view_matrix(eye, target, up) -> np.ndarray:
    """World-to-camera (OpenGL) 4x4 for a camera at ``eye`` looking at ``target``."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    norm = np.linalg.norm(right)
    if norm < 1e-8:
        raise ValueError("camera 'up' is parallel to the viewing direction; pick another up vector")
    right /= norm
    true_up = np.cross(right, forward)
    view = np.eye(4)
    view[0, :3], view[1, :3], view[2, :3] = right, true_up, -forward
    view[:3, 3] = -view[:3, :3] @ eye
    return view


def render(client, spec: CameraSpec, view: np.ndarray, renderer: int | None = None) -> CameraFrame:
    """Render one frame with ``client`` (a pybullet BulletClient) from the OpenGL world-to-camera ``view``."""
    import pybullet

    projection = client.computeProjectionMatrixFOV(spec.fov_deg, spec.width / spec.height, spec.near, spec.far)
    _, _, rgba, zbuffer, _ = client.getCameraImage(
        spec.width,
        spec.height,
        viewMatrix=view.T.reshape(-1).tolist(),  # pybullet wants column-major
        projectionMatrix=projection,
        renderer=pybullet.ER_TINY_RENDERER if renderer is None else renderer,
        flags=pybullet.ER_NO_SEGMENTATION_MASK,
    )
    rgba = np.asarray(rgba, dtype=np.uint8).reshape(spec.height, spec.width, 4)
    zbuffer = np.asarray(zbuffer, dtype=np.float64).reshape(spec.height, spec.width)
    # Invert OpenGL's depth buffer to metric z-depth.
    depth = spec.far * spec.near / (spec.far - (spec.far - spec.near) * zbuffer)
    cam_to_world = np.linalg.inv(view) @ OPENGL_TO_OPENCV
    return CameraFrame(
        rgb=np.ascontiguousarray(rgba[..., :3]),
        depth=depth.astype(np.float32),
        intrinsics=spec.intrinsics(),
        cam_to_world=cam_to_world.astype(np.float32),
    )


def backproject(depth: np.ndarray, intrinsics: np.ndarray, cam_to_world: np.ndarray) -> np.ndarray:
    """World points (H, W, 3) of every pixel: the inverse of :func:`render`'s conventions (used by tests and eval)."""
    import torch

    from omnistream_perception.model.geometry import depth_to_world_points

    as64 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    return depth_to_world_points(as64(depth), as64(intrinsics), as64(cam_to_world)).numpy()
