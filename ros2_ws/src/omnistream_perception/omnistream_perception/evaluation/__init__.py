"""Reconstruction evaluation (rclpy-free): the CUT3R video-depth and camera-pose protocols.

* :mod:`.metrics`: AbsRel / delta1 with per-sequence scale, scale-shift or metric alignment; ATE after
  Umeyama Sim(3)/SE(3) alignment, RPE translation / rotation;
* :mod:`.formats`: TUM trajectories, MPI-Sintel ``.dpt``/``.cam``, 16-bit depth PNGs, ``.npy`` depth folders;
* :mod:`.datasets`: Sintel, Bonn, KITTI, TUM RGB-D dynamic, ScanNet readers with the protocol's frame
  selection and depth caps, and the simulated tabletop;
* :mod:`.offline`: scoring predictions on disk (`omnistream eval depth|pose`);
* :mod:`.stream_eval`: streaming sequences through a PerceptionSession and scoring them (`omnistream eval
  stream`, the demo);
* :mod:`.report`: results.json, report.md, depth error maps and aligned trajectories.
"""

from .datasets import PROTOCOLS, EvalSequence, Protocol, load_dataset
from .metrics import (
    DEPTH_ALIGNMENTS,
    POSE_ALIGNMENTS,
    absolute_trajectory_error,
    align_trajectory,
    depth_metrics,
    pooled_depth_metrics,
    pooled_pose_metrics,
    pose_metrics,
    relative_pose_errors,
    relative_to_first,
    umeyama_alignment,
)
from .offline import evaluate_depth_dirs, evaluate_pose_files
from .stream_eval import evaluate_checkpoint, evaluate_sequences, evaluate_stream, session_config

__all__ = [
    "DEPTH_ALIGNMENTS",
    "POSE_ALIGNMENTS",
    "PROTOCOLS",
    "EvalSequence",
    "Protocol",
    "absolute_trajectory_error",
    "align_trajectory",
    "depth_metrics",
    "evaluate_checkpoint",
    "evaluate_depth_dirs",
    "evaluate_pose_files",
    "evaluate_sequences",
    "evaluate_stream",
    "load_dataset",
    "pooled_depth_metrics",
    "pooled_pose_metrics",
    "pose_metrics",
    "relative_pose_errors",
    "relative_to_first",
    "session_config",
    "umeyama_alignment",
]
