"""The policy interface every environment's rollout loop talks to (LeRobot's shape).

An observation is a plain dict:
    "images":      {camera_name: HxWx3 uint8 RGB}      e.g. "static", "wrist"
    "state":       float32 vector (robot proprioception; environment-specific)
    "instruction": str
An action is a float32 vector of 7: (dx, dy, dz, droll, dpitch, dyaw, gripper) in the environment's own
convention, gripper exactly +1 (open) or -1 (close). Converters between conventions live in
``omnistream_sim.conventions``; the rollout loop applies them explicitly, never the model.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

Observation = dict[str, Any]


@runtime_checkable
class Policy(Protocol):
    def reset(self) -> None:
        """Called at the start of every episode/subtask: clears action queues and streaming state."""

    def select_action(self, observation: Observation) -> np.ndarray:
        """One 7-D action for this control step (pops from an internal chunk queue when the policy predicts chunks)."""
