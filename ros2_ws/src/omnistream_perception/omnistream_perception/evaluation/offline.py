"""Scoring predictions already on disk: depth directories and TUM trajectory files (`omnistream eval depth|pose`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .formats import Trajectory, associate_timestamps, list_depth_dir, read_tum_trajectory
from .metrics import aligned_depth, depth_metrics, pooled_depth_metrics, pooled_pose_metrics, pose_metrics
from .report import write_outputs


def _load_depth(path: Path) -> np.ndarray:
    try:
        depth = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npy depth map ({exc})") from exc
    depth = np.squeeze(depth)
    if depth.ndim != 2:
        raise ValueError(f"{path}: expected an (H, W) depth map, got shape {depth.shape}")
    return depth.astype(np.float32)


def _resize(depth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A prediction at another resolution is resized to the ground truth's (bilinear; the protocol's scripts do
    the same with cubic interpolation)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0))[None, None]
    return F.interpolate(x, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def depth_example(pred: np.ndarray, gt: np.ndarray, align: str, max_depth, frames=4, rgb=None, labels=None) -> dict:
    """Evenly spaced frames of one sequence for :func:`plot_depth_errors` (prediction aligned as scored)."""
    pick = np.unique(np.linspace(0, len(gt) - 1, min(frames, len(gt))).astype(int))
    aligned = aligned_depth(pred, gt, align, max_depth)
    example = {
        "gt": np.asarray(gt)[pick],
        "pred": aligned[pick],
        "frames": [labels[i] if labels else int(i) for i in pick],
    }
    if rgb is not None:
        example["rgb"] = np.asarray(rgb)[pick]
    return example


def evaluate_depth_dirs(
    pred_dir: str | Path,
    gt_dir: str | Path,
    align: str = "per-sequence-scale",
    max_depth: float | None = None,
    clip_max: float | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """Scores ``pred_dir/<sequence>/<frame>.npy`` against ``gt_dir/<sequence>/<frame>.npy`` (frames matched by
    file name). Every ground-truth frame needs a prediction; predicted sequences without ground truth are
    listed as ignored."""
    gt_seqs = list_depth_dir(gt_dir, "ground-truth")
    pred_seqs = list_depth_dir(pred_dir, "prediction")
    rows, example = [], None
    for name, gt_files in gt_seqs.items():
        if name not in pred_seqs:
            raise FileNotFoundError(f"no predictions for sequence {name}: expected {Path(pred_dir) / name}/<frame>.npy")
        by_stem = {p.stem: p for p in pred_seqs[name]}
        missing = [p.stem for p in gt_files if p.stem not in by_stem]
        if missing:
            raise FileNotFoundError(
                f"sequence {name}: {len(missing)} ground-truth frames have no prediction "
                f"(first: {Path(pred_dir) / name / (missing[0] + '.npy')})"
            )
        gt = np.stack([_load_depth(p) for p in gt_files])
        pred = []
        for p in gt_files:
            d = _load_depth(by_stem[p.stem])
            pred.append(d if d.shape == gt.shape[1:] else _resize(d, gt.shape[1:]))
        pred = np.stack(pred)
        try:
            row = depth_metrics(pred, gt, align=align, max_depth=max_depth, clip_max=clip_max)
        except ValueError as exc:
            raise ValueError(f"sequence {name}: {exc}") from exc
        rows.append({"sequence": name, "frames": len(gt_files), **row})
        if example is None:
            example = depth_example(pred, gt, align, max_depth, labels=[p.stem for p in gt_files])
            example["sequence"] = name
    results = {
        "title": "Video depth",
        "depth": {
            "settings": {"align": align, "max_depth": max_depth, "clip_max": clip_max},
            "overall": pooled_depth_metrics(rows),
            "sequences": rows,
            "ignored_predictions": sorted(set(pred_seqs) - set(gt_seqs)),
        },
        "example": example,
    }
    if out_dir is not None:
        write_outputs(out_dir, results)
    return results


def _trajectory_files(path: Path, what: str) -> dict[str, Path]:
    if path.is_file():
        return {path.stem: path}
    if path.is_dir():
        files = {p.stem: p for p in sorted(path.glob("*.txt"))}
        if files:
            return files
        raise FileNotFoundError(f"no <sequence>.txt TUM trajectories in {what} directory {path}")
    raise FileNotFoundError(f"{what} {path} does not exist")


def match_trajectories(
    pred: Trajectory, gt: Trajectory, max_difference: float, name: str
) -> tuple[Trajectory, Trajectory]:
    pairs = associate_timestamps(pred.timestamps, gt.timestamps, max_difference)
    if len(pairs) < 3:
        raise ValueError(
            f"sequence {name}: only {len(pairs)} of {len(gt)} ground-truth timestamps have a predicted pose within "
            f"{max_difference} s (need >= 3); write the ground truth's timestamps into the prediction "
            f"or raise --max-time-diff"
        )
    return pred.subset(pairs[:, 0]), gt.subset(pairs[:, 1])


def evaluate_pose_files(
    pred: str | Path,
    gt: str | Path,
    align: str = "sim3",
    max_difference: float = 0.02,
    out_dir: str | Path | None = None,
) -> dict:
    """Scores TUM trajectories: two files, or two directories of ``<sequence>.txt`` matched by name."""
    pred, gt = Path(pred), Path(gt)
    gt_files = _trajectory_files(gt, "ground truth")
    pred_files = _trajectory_files(pred, "prediction")
    if pred.is_file() and gt.is_file():
        pred_files = {next(iter(gt_files)): pred}
    rows, plots = [], []
    for name, gt_file in gt_files.items():
        if name not in pred_files:
            raise FileNotFoundError(f"no predicted trajectory for sequence {name}: expected {pred / (name + '.txt')}")
        p, g = match_trajectories(read_tum_trajectory(pred_files[name]), read_tum_trajectory(gt_file),
                                  max_difference, name)  # fmt: skip
        row = pose_metrics(p.poses, g.poses, align=align)
        row["unmatched_gt"] = len(read_tum_trajectory(gt_file)) - len(g)
        rows.append({"sequence": name, **row})
        plots.append((name, p.poses, g.poses))
    results = {
        "title": "Camera pose",
        "pose": {
            "settings": {"align": align, "max_time_difference": max_difference, "rpe_delta_frames": 1},
            "overall": pooled_pose_metrics(rows),
            "sequences": rows,
        },
        "trajectories": plots,
    }
    if out_dir is not None:
        write_outputs(out_dir, results)
    return results
