"""What every evaluation writes: ``results.json``, ``report.md`` and pictures (depth error maps, aligned
trajectories), so `omnistream eval depth|pose|stream` and the demo share one presentation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .metrics import align_trajectory


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_depth_errors(example: dict, path: str | Path, title: str = "") -> Path:
    """Rows: (RGB,) ground truth, aligned prediction, AbsRel error; columns: frames.

    ``example``: ``gt`` and ``pred`` (K, H, W) metres (pred already aligned, NaN where invalid), optional ``rgb``
    (K, H, W, 3) and ``frames`` (K,) frame labels.
    """
    plt = _pyplot()
    gt, pred = np.asarray(example["gt"], np.float64), np.asarray(example["pred"], np.float64)
    rgb = example.get("rgb")
    labels = example.get("frames", list(range(len(gt))))
    valid = np.isfinite(gt) & (gt > 0)
    vmin, vmax = np.percentile(gt[valid], [1, 99]) if valid.any() else (0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(valid & np.isfinite(pred), np.abs(pred - gt) / gt, np.nan)
    rows = [("ground truth", gt, "turbo", vmin, vmax), ("prediction (aligned)", pred, "turbo", vmin, vmax),
            ("AbsRel error", err, "magma", 0.0, 0.5)]  # fmt: skip
    if rgb is not None:
        rows.insert(0, ("RGB", np.asarray(rgb), None, None, None))
    cols = len(gt)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.2 * len(rows)), squeeze=False)
    for r, (name, images, cmap, lo, hi) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            im = ax.imshow(images[c], cmap=cmap, vmin=lo, vmax=hi)
            ax.set_axis_off()
            ax.set_title(f"{name}, frame {labels[c]}", fontsize=7)
        if cmap is not None:
            fig.colorbar(im, ax=axes[r, :].tolist(), fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_trajectories(items: list[tuple[str, np.ndarray, np.ndarray]], path: str | Path, align: str = "sim3") -> Path:
    """Camera centres of each (name, predicted poses, ground-truth poses), the prediction aligned as scored;
    drawn on the two axes along which the ground truth moves most."""
    plt = _pyplot()
    items = items[:6]
    cols = min(3, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(items) :]:
        ax.set_axis_off()
    for ax, (name, pred, gt) in zip(axes.ravel(), items):
        aligned, _ = align_trajectory(pred, gt, align)
        g, p = np.asarray(gt)[:, :3, 3], aligned[:, :3, 3]
        i, j = np.sort(np.argsort(np.ptp(g, axis=0))[-2:])
        ax.plot(g[:, i], g[:, j], "o-", color="black", ms=2, label="ground truth")
        ax.plot(p[:, i], p[:, j], "s--", color="tab:orange", ms=2, label=f"estimate ({align}-aligned)")
        ax.set_xlabel("xyz"[i] + " (m)")
        ax.set_ylabel("xyz"[j] + " (m)")
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def markdown_report(results: dict, pictures: dict[str, str]) -> str:
    lines = [f"# {results.get('title', 'Evaluation')}", ""]
    for key in ("dataset", "checkpoint", "protocol_note"):
        if results.get(key):
            lines.append(f"- {key.replace('_', ' ')}: {results[key]}")
    depth, pose = results.get("depth"), results.get("pose")
    if depth:
        o = depth["overall"]
        cap = depth["settings"].get("max_depth")
        lines += [
            "",
            f"## Video depth (alignment `{depth['settings']['align']}`, depth cap {cap if cap else 'none'})",
            "",
            "| sequence | frames | valid pixels | AbsRel | delta < 1.25 | RMSE (m) | scale |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['sequence']} | {r['frames']} | {r['pixels']} | {_fmt(r['abs_rel'])} | {_fmt(r['delta1'])} | "
            f"{_fmt(r['rmse'])} | {_fmt(r['scale'], 4)} |"
            for r in depth["sequences"]
        ]
        lines.append(
            f"| **overall** (every valid pixel weighted equally) | {sum(r['frames'] for r in depth['sequences'])} | "
            f"{o['pixels']} | **{_fmt(o['abs_rel'])}** | **{_fmt(o['delta1'])}** | {_fmt(o['rmse'])} | |"
        )
    if pose:
        o = pose["overall"]
        lines += [
            "",
            f"## Camera pose (alignment `{pose['settings']['align']}`, RPE over consecutive frames)",
            "",
            "| sequence | frames | ATE (m) | RPE trans (m) | RPE rot (deg) | scale |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['sequence']} | {r['frames']} | {_fmt(r['ate'], 4)} | {_fmt(r['rpe_trans'], 4)} | "
            f"{_fmt(r['rpe_rot'])} | {_fmt(r['scale'], 4)} |"
            for r in pose["sequences"]
        ]
        lines.append(
            f"| **overall** (mean over sequences) | {o['frames']} | **{_fmt(o['ate'], 4)}** | "
            f"**{_fmt(o['rpe_trans'], 4)}** | **{_fmt(o['rpe_rot'])}** | |"
        )
    if results.get("ms_per_frame") is not None:
        lines += ["", f"Streaming: {_fmt(results['ms_per_frame'], 1)} ms per frame (backbone + heads, in-process)."]
    lines.append("")
    for name, file in pictures.items():
        lines += [f"![{name}]({file})", ""]
    return "\n".join(lines)


ARRAY_KEYS = ("example", "trajectories")  # pictures' inputs, not results


def write_outputs(out_dir: str | Path, results: dict, pictures: dict[str, str] | None = None) -> Path:
    """Pictures (``depth_errors.png`` from ``results["example"]``, ``trajectories.png`` from
    ``results["trajectories"]`` = [(name, predicted poses, ground-truth poses)]), ``results.json`` and
    ``report.md`` into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pictures = dict(pictures or {})
    example = results.get("example")
    if example is not None:
        plot_depth_errors(example, out / "depth_errors.png", title=f"{example.get('sequence', '')} (metres)")
        pictures["depth error maps"] = "depth_errors.png"
    if results.get("trajectories"):
        plot_trajectories(results["trajectories"], out / "trajectories.png", results["pose"]["settings"]["align"])
        pictures["aligned trajectories"] = "trajectories.png"
    return write_results(out, results, pictures)


def write_results(out_dir: str | Path, results: dict, pictures: dict[str, str] | None = None) -> Path:
    """``results.json`` (everything but arrays) and ``report.md`` into ``out_dir``; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in results.items() if k not in ARRAY_KEYS}
    (out / "results.json").write_text(json.dumps(clean, indent=2, default=_jsonable) + "\n")
    report = out / "report.md"
    report.write_text(markdown_report(results, pictures or {}))
    return report


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
