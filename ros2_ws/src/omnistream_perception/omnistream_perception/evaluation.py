"""Perception metrics against ground truth (rclpy-free): video depth and camera trajectories.

* Depth: AbsRel = mean(|d - d*| / d*) and delta1 = fraction with max(d/d*, d*/d) < 1.25, over valid pixels
  (finite, d* > 0). ``align="median"`` first rescales each sequence by median(d*) / median(d) (the usual
  protocol for depth from monocular video, whose scale is ambiguous); ``align="none"`` scores metric depth.
* Trajectories: ATE = RMSE of camera centres after a similarity (Umeyama) alignment of the estimate onto the
  ground truth, as in the TUM/ETH benchmarks.
"""

from __future__ import annotations

import numpy as np


def depth_metrics(pred: np.ndarray, gt: np.ndarray, align: str = "median") -> dict[str, float]:
    """``pred``/``gt``: (..., H, W) depth of one sequence (or frame) in metres."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    valid = np.isfinite(gt) & (gt > 0) & np.isfinite(pred) & (pred > 0)
    if not valid.any():
        raise ValueError("no valid ground-truth pixels")
    p, g = pred[valid], gt[valid]
    scale = 1.0
    if align == "median":
        scale = float(np.median(g) / np.median(p))
    elif align != "none":
        raise ValueError(f"align must be 'median' or 'none', got {align!r}")
    p = p * scale
    ratio = np.maximum(p / g, g / p)
    return {
        "abs_rel": float(np.mean(np.abs(p - g) / g)),
        "delta1": float(np.mean(ratio < 1.25)),
        "scale": scale,
        "pixels": int(valid.sum()),
    }


def umeyama_alignment(
    src: np.ndarray, dst: np.ndarray, with_scale: bool = True
) -> tuple[float, np.ndarray, np.ndarray]:
    """(s, R, t) minimising ||dst - (s R src + t)||^2 for (N, 3) point sets."""
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


def absolute_trajectory_error(pred_poses: np.ndarray, gt_poses: np.ndarray, with_scale: bool = True) -> float:
    """RMSE (metres of the ground truth) of camera centres of (N, 4, 4) camera-to-world poses after alignment."""
    pred_c = np.asarray(pred_poses)[:, :3, 3]
    gt_c = np.asarray(gt_poses)[:, :3, 3]
    if len(pred_c) != len(gt_c) or len(gt_c) < 2:
        raise ValueError("need two equally long trajectories of at least 2 poses")
    s, rot, t = umeyama_alignment(pred_c, gt_c, with_scale)
    aligned = (s * (rot @ pred_c.T)).T + t
    return float(np.sqrt(np.mean(np.sum((aligned - gt_c) ** 2, axis=1))))


def relative_to_first(cam_to_world: np.ndarray) -> np.ndarray:
    """Re-expresses (N, 4, 4) poses in the first camera's frame (the world of a stream)."""
    poses = np.asarray(cam_to_world, np.float64)
    return np.linalg.inv(poses[0]) @ poses


def evaluate_sequences(session, sequences, *, align: str = "median", progress: bool = True) -> dict:
    """Streams each held-out sequence through a :class:`~omnistream_perception.perception.PerceptionSession`
    (reset per sequence) and scores depth against ground truth and the trajectory against true poses.

    ``sequences``: objects with ``rgb (F,H,W,3) uint8``, ``depth (F,H,W)`` metres and ``cam_to_world (F,4,4)``.
    Returns the mean metrics, per-sequence rows, the mean per-frame latency, and the first sequence's
    predictions (for pictures).
    """
    from tqdm import tqdm

    rows, times, first = [], [], None
    for index, seq in enumerate(tqdm(sequences, desc="perception eval", unit="seq", disable=not progress)):
        session.reset()
        depths, poses = [], []
        for rgb in seq.rgb:
            result = session.process(rgb, want_depth=True, want_pose=True)
            if result.depth is None or result.pose is None:
                raise ValueError("perception evaluation needs geometry heads and the camera token in the checkpoint")
            depths.append(result.depth)
            poses.append(result.pose)
            times.append(sum(result.timings.values()))
        depths, poses = np.stack(depths), np.stack(poses)
        gt_poses = relative_to_first(seq.cam_to_world)
        row = depth_metrics(depths, seq.depth, align=align)
        row["ate"] = absolute_trajectory_error(poses, gt_poses)
        row["sequence"] = index
        rows.append(row)
        if first is None:
            first = {
                "depth": depths,
                "gt_depth": np.asarray(seq.depth),
                "poses": poses,
                "gt_poses": gt_poses,
                "rgb": np.asarray(seq.rgb),
            }
    return {
        "depth_abs_rel": float(np.mean([r["abs_rel"] for r in rows])),
        "depth_delta1": float(np.mean([r["delta1"] for r in rows])),
        "pose_ate": float(np.mean([r["ate"] for r in rows])),
        "ms_per_frame": float(np.mean(times)) if times else float("nan"),
        "sequences": rows,
        "example": first,
    }
