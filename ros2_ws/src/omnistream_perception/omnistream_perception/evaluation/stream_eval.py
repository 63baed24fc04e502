"""Streaming evaluation: each sequence goes frame by frame through a
:class:`~omnistream_perception.perception.PerceptionSession` (the object perception_node runs per camera: same
preprocessing, same KV-cache window, same heads), then depth and camera pose are scored with the protocol's
settings. `omnistream eval stream` and the demo's perception stage both run :func:`evaluate_stream`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .datasets import PROTOCOLS, EvalSequence, Protocol, load_dataset
from .formats import write_depth_dir, write_tum_trajectory
from .metrics import depth_metrics, pooled_depth_metrics, pooled_pose_metrics, pose_metrics, relative_to_first
from .offline import depth_example


def session_config(checkpoint: str, *, max_side: int | None = None, window: int | None = None, sink: int = 1,
                   device: str = "cpu", dtype: str = "float32"):  # fmt: skip
    """The perception_node's session settings (its defaults for everything not given), float32 features."""
    from ..perception import PerceptionConfig

    return PerceptionConfig(checkpoint=checkpoint, device=device, dtype=dtype, max_side=max_side, window=window,
                            sink=sink, feature_dtype="float32")  # fmt: skip


def stream_sequence(session, seq: EvalSequence, want_depth: bool, want_pose: bool, bar=None) -> dict:
    """Streams one sequence from a fresh cache; returns its depths (F, H, W), poses (F, 4, 4) and ms per frame."""
    session.reset()
    depths, poses, times = [], [], []
    for i in range(len(seq)):
        began = time.perf_counter()
        result = session.process(seq.image(i), want_depth=want_depth, want_pose=want_pose)
        times.append((time.perf_counter() - began) * 1e3)
        if want_depth:
            if result.depth is None:
                raise ValueError("depth evaluation needs geometry heads in the checkpoint (omnistream train heads)")
            depths.append(result.depth)
        if want_pose:
            if result.pose is None:
                raise ValueError(
                    "pose evaluation needs the geometry heads and the camera token (train them with "
                    "`omnistream train heads`)"
                )
            poses.append(result.pose)
        if bar is not None:
            bar.update(1)
    return {
        "depth": np.stack(depths) if depths else None,
        "poses": np.stack(poses) if poses else None,
        "ms": times,
    }


def evaluate_stream(
    session,
    sequences: list[EvalSequence],
    dataset: str | Protocol = "tabletop",
    *,
    depth_align: str | None = None,
    pose_align: str | None = None,
    max_depth: float | None = None,
    predictions_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Streams and scores ``sequences`` with ``dataset``'s protocol (overrides: ``depth_align``, ``pose_align``,
    ``max_depth``). Depth is scored where the sequences have ground-truth depth and pose where they have
    ground-truth cameras. ``predictions_dir`` receives ``depth/<seq>/<frame>.npy`` and ``poses/<seq>.txt``
    (TUM) for `omnistream eval depth|pose`."""
    from tqdm import tqdm

    protocol = dataset if isinstance(dataset, Protocol) else PROTOCOLS[dataset]
    depth_align = depth_align or protocol.depth_align
    pose_align = pose_align or protocol.pose_align
    cap = max_depth if max_depth is not None else protocol.max_depth
    clip = protocol.clip_max
    if clip is not None and max_depth is not None:  # a protocol that clips predictions clips at the chosen cap
        clip = max_depth
    if not sequences:
        raise ValueError("no sequences to evaluate")
    if all(s.depth is None and s.cam_to_world is None for s in sequences):
        raise ValueError("the sequences have neither ground-truth depth nor ground-truth cameras to score against")
    depth_rows, pose_rows, times, trajectories, example = [], [], [], [], None
    total = sum(len(s) for s in sequences)
    with tqdm(total=total, desc=f"eval {protocol.name}", unit="frame", disable=not progress) as bar:
        for seq in sequences:
            want_depth = seq.depth is not None
            gt_poses = None
            if seq.cam_to_world is not None:
                gt_poses = np.asarray(seq.cam_to_world, np.float64)
            out = stream_sequence(session, seq, want_depth, gt_poses is not None, bar)
            times += out["ms"]
            if want_depth:
                gt = np.stack([seq.gt_depth(i) for i in range(len(seq))])
                try:
                    row = depth_metrics(out["depth"], gt, align=depth_align, max_depth=cap, clip_max=clip)
                except ValueError as exc:
                    raise ValueError(f"sequence {seq.name}: {exc}") from exc
                depth_rows.append({"sequence": seq.name, "frames": len(seq), **row})
                if example is None:
                    example = depth_example(out["depth"], gt, depth_align, cap)
                    example["rgb"] = np.stack([seq.image(f) for f in example["frames"]])
                    example["sequence"] = seq.name
                if predictions_dir is not None:
                    write_depth_dir(Path(predictions_dir) / "depth", seq.name, out["depth"])
            if gt_poses is not None:
                # ScanNet marks frames without tracking by non-finite poses: those frames are not scored
                keep = np.isfinite(gt_poses).all(axis=(1, 2))
                pred, gt_kept = out["poses"][keep], relative_to_first(gt_poses[keep])
                try:
                    row = pose_metrics(pred, gt_kept, align=pose_align)
                except ValueError as exc:
                    raise ValueError(f"sequence {seq.name}: {exc}") from exc
                pose_rows.append({"sequence": seq.name, **row})
                trajectories.append((seq.name, pred, gt_kept))
                if predictions_dir is not None:
                    write_tum_trajectory(
                        Path(predictions_dir) / "poses" / f"{seq.name}.txt", seq.timestamps, out["poses"]
                    )
    results: dict = {
        "title": f"Streaming evaluation on {protocol.name}",
        "dataset": protocol.name,
        "protocol_note": f"{protocol.selection} (source: {protocol.source})",
        "ms_per_frame": float(np.mean(times)),
        "frames": total,
    }
    if depth_rows:
        results["depth"] = {
            "settings": {"align": depth_align, "max_depth": cap, "clip_max": clip},
            "overall": pooled_depth_metrics(depth_rows),
            "sequences": depth_rows,
        }
        results["example"] = example
    if pose_rows:
        results["pose"] = {
            "settings": {"align": pose_align, "rpe_delta_frames": 1},
            "overall": pooled_pose_metrics(pose_rows),
            "sequences": pose_rows,
        }
        results["trajectories"] = trajectories
    results.update(headline(results))
    return results


def headline(results: dict) -> dict:
    """The flat figures the demo's report and the README table quote."""
    out = {}
    if "depth" in results:
        out["depth_abs_rel"] = results["depth"]["overall"]["abs_rel"]
        out["depth_delta1"] = results["depth"]["overall"]["delta1"]
    if "pose" in results:
        for key in ("ate", "rpe_trans", "rpe_rot"):
            out[f"pose_{key}"] = results["pose"]["overall"][key]
    return out


def evaluate_checkpoint(
    checkpoint: str,
    dataset: str,
    root: str | Path | None = None,
    *,
    task: str = "both",
    max_side: int | None = None,
    window: int | None = None,
    sink: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    dataset_options: dict | None = None,
    sequences: list[EvalSequence] | None = None,
    out_dir: str | Path | None = None,
    save_predictions: bool = False,
    progress: bool = True,
    **score_options,
) -> dict:
    """Loads the checkpoint into a perception session and runs :func:`evaluate_stream` on the dataset's protocol
    sequences (read from ``root``, or ``sequences`` as given: the tabletop's are rendered by the caller); writes
    results.json, report.md and pictures into ``out_dir`` when given."""
    from ..perception import PerceptionSession
    from .report import write_outputs

    protocol = PROTOCOLS.get(dataset)
    if protocol is not None and task != "both" and task not in protocol.tasks:
        raise ValueError(f"the {dataset} protocol scores {' and '.join(protocol.tasks)} only, not {task}")
    if sequences is None:
        sequences = load_dataset(dataset, root, task, **(dataset_options or {}))
    if task != "both":
        for seq in sequences:
            if task == "depth":
                seq.cam_to_world = None
            else:
                seq.depth = None
    session = PerceptionSession.from_config(
        session_config(checkpoint, max_side=max_side, window=window, sink=sink, device=device, dtype=dtype)
    )
    if not session.has_heads:
        raise ValueError(
            f"{checkpoint} has no geometry heads (geometry_heads.safetensors): train them with "
            f"`omnistream train heads --checkpoint {checkpoint}`"
        )
    predictions = Path(out_dir) / "predictions" if (save_predictions and out_dir is not None) else None
    results = evaluate_stream(session, sequences, dataset, predictions_dir=predictions, progress=progress,
                              **score_options)  # fmt: skip
    results["checkpoint"] = str(checkpoint)
    results["session"] = {"max_side": max_side, "window": window, "sink": sink, "device": device, "dtype": dtype}
    if out_dir is not None:
        write_outputs(out_dir, results)
    return results


def evaluate_sequences(session, sequences, *, align: str = "median", progress: bool = True) -> dict:
    """Tabletop-style sequences (``rgb``, ``depth``, ``cam_to_world`` arrays) through :func:`evaluate_stream`;
    kept for callers of the earlier API. Returns the headline figures, per-sequence rows and ms per frame."""
    from .datasets import tabletop_eval_sequence

    wrapped = [s if isinstance(s, EvalSequence) else tabletop_eval_sequence(s, i) for i, s in enumerate(sequences)]
    results = evaluate_stream(session, wrapped, "tabletop", depth_align=align, progress=progress)
    return {**results, "sequences": results["depth"]["sequences"]}
