"""Video-depth and camera-trajectory metrics (rclpy-free, numpy), as the CUT3R protocol computes them.

Depth, per sequence (all its frames together):

* valid pixels: ground truth finite, > 0 and below the dataset's cap (``max_depth``), prediction finite and > 0;
* alignment: ``per-sequence-scale`` multiplies the prediction by median(gt) / median(pred) over the sequence's
  valid pixels; ``scale-shift`` fits ``s * pred + t`` to gt by least squares over them; ``metric`` leaves it;
* after alignment the prediction may be clipped to ``clip_max`` (the protocol does so on Sintel);
* AbsRel = mean(|d - d*| / d*), delta1 = fraction with max(d / d*, d* / d) < 1.25, RMSE in metres.

Across sequences every valid pixel weighs the same (the per-sequence figures averaged with the pixel counts
as weights, as the protocol's scoring script does).

Trajectories (camera-to-world 4x4, matched by timestamp beforehand):

* ATE: RMSE of camera centres after aligning the estimate onto the ground truth, Sim(3) (Umeyama, with scale,
  for up-to-scale estimates) or SE(3);
* RPE between consecutive frames (``delta`` = 1) of the aligned estimate: translation (RMSE of the norm of the
  relative-motion error, metres) and rotation (RMSE of its angle, degrees), as evo's ``rpe`` with
  ``delta_unit=frames`` reports them. Across sequences the protocol averages the per-sequence figures.
"""

from __future__ import annotations

import numpy as np

DEPTH_ALIGNMENTS = ("per-sequence-scale", "scale-shift", "metric")
POSE_ALIGNMENTS = ("sim3", "se3")
_DEPTH_ALIASES = {"median": "per-sequence-scale", "scale": "per-sequence-scale", "none": "metric"}


# ------------------------------------------------------------------------------------------------------
# depth
# ------------------------------------------------------------------------------------------------------
def _depth_align_name(align: str) -> str:
    name = _DEPTH_ALIASES.get(align, align)
    if name not in DEPTH_ALIGNMENTS:
        raise ValueError(f"align must be one of {', '.join(DEPTH_ALIGNMENTS)}, got {align!r}")
    return name


def valid_depth_mask(pred: np.ndarray, gt: np.ndarray, max_depth: float | None = None) -> np.ndarray:
    """Pixels that count: finite positive ground truth below ``max_depth`` and a finite positive prediction."""
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(gt) & (gt > 0) & np.isfinite(pred) & (pred > 0)
        if max_depth is not None:
            mask &= gt < max_depth
    return mask


def fit_depth_alignment(pred: np.ndarray, gt: np.ndarray, align: str) -> tuple[float, float]:
    """(scale, shift) mapping the valid prediction values ``pred`` onto ``gt`` (1-D arrays of the same pixels)."""
    align = _depth_align_name(align)
    if align == "metric":
        return 1.0, 0.0
    if align == "per-sequence-scale":
        return float(np.median(gt) / np.median(pred)), 0.0
    a = np.stack([pred, np.ones_like(pred)], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(a, gt, rcond=None)
    return float(scale), float(shift)


def depth_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    align: str = "per-sequence-scale",
    max_depth: float | None = None,
    clip_max: float | None = None,
) -> dict[str, float]:
    """Scores one sequence (or frame): ``pred``/``gt`` (..., H, W) depth in metres.

    Returns abs_rel, delta1, rmse, the fitted scale/shift and the number of valid pixels.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    valid = valid_depth_mask(pred, gt, max_depth)
    if not valid.any():
        raise ValueError("no valid pixels (ground truth > 0, below the depth cap, and a finite positive prediction)")
    # only the valid pixels are promoted to float64 (a KITTI sequence is ~50M pixels)
    p, g = pred[valid].astype(np.float64), gt[valid].astype(np.float64)
    scale, shift = fit_depth_alignment(p, g, align)
    p = scale * p + shift
    if clip_max is not None:
        p = np.minimum(p, clip_max)
    # a scale-shift fit may push a few values to <= 0: they are as wrong as can be, not skipped
    p = np.maximum(p, 1e-6)
    ratio = np.maximum(p / g, g / p)
    return {
        "abs_rel": float(np.mean(np.abs(p - g) / g)),
        "delta1": float(np.mean(ratio < 1.25)),
        "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
        "scale": scale,
        "shift": shift,
        "pixels": int(valid.sum()),
    }


def aligned_depth(pred: np.ndarray, gt: np.ndarray, align: str, max_depth: float | None = None) -> np.ndarray:
    """The whole prediction under the sequence's alignment (for pictures); invalid pixels become NaN."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    valid = valid_depth_mask(pred, gt, max_depth)
    scale, shift = fit_depth_alignment(pred[valid], gt[valid], align) if valid.any() else (1.0, 0.0)
    return np.where(np.isfinite(pred) & (pred > 0), scale * pred + shift, np.nan)


def pooled_depth_metrics(rows: list[dict]) -> dict[str, float]:
    """Overall figures of per-sequence rows: each sequence weighted by its valid pixels (= every pixel equally)."""
    if not rows:
        raise ValueError("no sequences to pool")
    weights = np.array([r["pixels"] for r in rows], dtype=np.float64)
    out = {k: float(np.average([r[k] for r in rows], weights=weights)) for k in ("abs_rel", "delta1")}
    # RMSE pools as the root of the pixel-weighted mean square
    out["rmse"] = float(np.sqrt(np.average([r["rmse"] ** 2 for r in rows], weights=weights)))
    out["pixels"] = int(weights.sum())
    out["sequences"] = len(rows)
    return out


# ------------------------------------------------------------------------------------------------------
# trajectories
# ------------------------------------------------------------------------------------------------------
def umeyama_alignment(
    src: np.ndarray, dst: np.ndarray, with_scale: bool = True
) -> tuple[float, np.ndarray, np.ndarray]:
    """(s, R, t) minimising ||dst - (s R src + t)||^2 for (N, 3) point sets (Umeyama 1991)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1
    rot = u @ sign @ vt
    var_s = (xs**2).sum() / len(src)
    scale = float(np.trace(np.diag(d) @ sign) / var_s) if with_scale and var_s > 0 else 1.0
    trans = mu_d - scale * rot @ mu_s
    return scale, rot, trans


def _check_poses(poses: np.ndarray, what: str) -> np.ndarray:
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"{what}: expected (N, 4, 4) camera-to-world poses, got shape {poses.shape}")
    if not np.isfinite(poses).all():
        raise ValueError(f"{what}: poses contain NaN or infinite values")
    return poses


def align_trajectory(pred_poses: np.ndarray, gt_poses: np.ndarray, align: str = "sim3") -> tuple[np.ndarray, float]:
    """The estimate mapped onto the ground truth by the Umeyama fit of its camera centres.

    Returns the aligned (N, 4, 4) poses (rotation ``R @ R_i``, centre ``s R c_i + t``) and the scale ``s``.
    """
    if align not in POSE_ALIGNMENTS:
        raise ValueError(f"align must be one of {', '.join(POSE_ALIGNMENTS)}, got {align!r}")
    pred = _check_poses(pred_poses, "prediction")
    gt = _check_poses(gt_poses, "ground truth")
    if len(pred) != len(gt) or len(gt) < 2:
        raise ValueError(f"need two equally long trajectories of at least 2 poses, got {len(pred)} and {len(gt)}")
    s, rot, t = umeyama_alignment(pred[:, :3, 3], gt[:, :3, 3], with_scale=align == "sim3")
    out = pred.copy()
    out[:, :3, :3] = rot @ pred[:, :3, :3]
    out[:, :3, 3] = s * pred[:, :3, 3] @ rot.T + t
    return out, s


def _rotation_angle_deg(rot: np.ndarray) -> np.ndarray:
    cos = (np.trace(rot, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def relative_pose_errors(
    aligned_pred: np.ndarray, gt_poses: np.ndarray, delta: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair (i, i + delta): translation error (m) and rotation error (deg) of the relative motion.

    E_i = (G_i^-1 G_{i+d})^-1 (P_i^-1 P_{i+d}); errors are ||trans(E_i)|| and the angle of rot(E_i).
    """
    p = np.asarray(aligned_pred, np.float64)
    g = np.asarray(gt_poses, np.float64)
    if delta < 1 or len(p) <= delta:
        raise ValueError(f"RPE needs more than delta={delta} poses, got {len(p)}")
    rel_p = np.linalg.inv(p[:-delta]) @ p[delta:]
    rel_g = np.linalg.inv(g[:-delta]) @ g[delta:]
    err = np.linalg.inv(rel_g) @ rel_p
    return np.linalg.norm(err[:, :3, 3], axis=1), _rotation_angle_deg(err[:, :3, :3])


def pose_metrics(pred_poses: np.ndarray, gt_poses: np.ndarray, align: str = "sim3", delta: int = 1) -> dict:
    """ATE (m), RPE translation (m) and rotation (deg) of one sequence; poses camera-to-world (N, 4, 4)."""
    aligned, scale = align_trajectory(pred_poses, gt_poses, align)
    gt = np.asarray(gt_poses, np.float64)
    ate = float(np.sqrt(np.mean(np.sum((aligned[:, :3, 3] - gt[:, :3, 3]) ** 2, axis=1))))
    rpe_t, rpe_r = relative_pose_errors(aligned, gt, delta)
    return {
        "ate": ate,
        "rpe_trans": float(np.sqrt(np.mean(rpe_t**2))),
        "rpe_rot": float(np.sqrt(np.mean(rpe_r**2))),
        "scale": scale,
        "frames": len(gt),
    }


def pooled_pose_metrics(rows: list[dict]) -> dict[str, float]:
    """Overall pose figures: the mean over sequences (the protocol's tables average per-sequence values)."""
    if not rows:
        raise ValueError("no sequences to pool")
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("ate", "rpe_trans", "rpe_rot")}
    out["frames"] = int(sum(r["frames"] for r in rows))
    out["sequences"] = len(rows)
    return out


def absolute_trajectory_error(pred_poses: np.ndarray, gt_poses: np.ndarray, with_scale: bool = True) -> float:
    """RMSE (metres of the ground truth) of camera centres of (N, 4, 4) camera-to-world poses after alignment."""
    aligned, _ = align_trajectory(pred_poses, gt_poses, "sim3" if with_scale else "se3")
    diff = aligned[:, :3, 3] - np.asarray(gt_poses, np.float64)[:, :3, 3]
    return float(np.sqrt(np.mean(np.sum(diff**2, axis=1))))


def relative_to_first(cam_to_world: np.ndarray) -> np.ndarray:
    """Re-expresses (N, 4, 4) poses in the first camera's frame (the world of a stream)."""
    poses = np.asarray(cam_to_world, np.float64)
    return np.linalg.inv(poses[0]) @ poses
