"""Policies the harnesses can evaluate, chosen by a spec string (``--policy``):

* ``scripted``  the tabletop's privileged expert (:class:`omnistream_sim.tabletop.ScriptedExpert`);
* ``random``    uniform relative actions, gripper +-1 (a floor for success rates);
* ``ckpt:DIR``  a VLA checkpoint loaded in-process (``omnistream_vla``'s ``OmniStreamVLAPolicy``), adapted from
  the observation dict to the policy's LeRobot batch keys;
* ``ros``       closed loop through the real ``perception_node`` and ``vla_node`` (:mod:`omnistream_sim.ros_policy`).

All return actions in CALVIN's relative convention (what the tabletop and CALVIN consume); the rollout loop
applies any other conversion explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

POLICY_CHOICES = "scripted | random | ckpt:DIR | ros"


class RandomPolicy:
    """Uniform actions in [-1, 1] for the arm; the gripper flips with probability ``flip`` per step."""

    name = "random"
    needs_images = False

    def __init__(self, seed: int = 0, flip: float = 0.1):
        self._seed = seed
        self._episode = 0
        self.flip = flip
        self.reset()

    def set_episode_seed(self, episode_seed: int) -> None:
        """The rollout loop passes each episode's seed, so shards reproduce the same actions as one long run."""
        self._episode = episode_seed

    def reset(self) -> None:
        # A fresh, seeded stream per episode: results do not depend on how many steps earlier episodes took.
        self._rng = np.random.default_rng([self._seed, self._episode])
        self._episode += 1
        self._gripper = 1.0

    def select_action(self, observation: dict) -> np.ndarray:
        if self._rng.random() < self.flip:
            self._gripper = -self._gripper
        arm = self._rng.uniform(-1.0, 1.0, 6)
        return np.concatenate([arm, [self._gripper]]).astype(np.float32)


class VLACheckpointPolicy:
    """A VLA checkpoint in-process: observation dict -> LeRobot batch -> ``select_action`` (chunk queue inside)."""

    needs_images = True

    def __init__(self, directory: str | Path, device: str = "cpu"):
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no VLA checkpoint directory at {directory}")
        from omnistream_vla.policy import OmniStreamVLAPolicy

        self.model = OmniStreamVLAPolicy.from_pretrained(directory, device=device)
        self.model.eval()
        self.cameras = tuple(self.model.config.cameras)
        self.name = f"ckpt:{directory.name}"

    def reset(self) -> None:
        self.model.reset()

    def observation_to_batch(self, observation: dict) -> dict[str, Any]:
        images = observation.get("images") or {}
        missing = [c for c in self.cameras if c not in images]
        if missing:
            raise ValueError(f"the checkpoint wants cameras {list(self.cameras)}; the observation lacks {missing}")
        batch: dict[str, Any] = {f"observation.images.{c}": np.asarray(images[c])[None] for c in self.cameras}
        batch["task"] = [observation["instruction"]]
        if "state" in observation:
            batch["observation.state"] = np.asarray(observation["state"], dtype=np.float32)[None]
        return batch

    def select_action(self, observation: dict) -> np.ndarray:
        action = self.model.select_action(self.observation_to_batch(observation))
        return action[0].detach().cpu().numpy().astype(np.float32)


def make_policy(spec: str, *, seed: int = 0, env_name: str = "tabletop", **kwargs: Any):
    """A policy from its ``--policy`` spec; raises ValueError naming the choices on a bad spec."""
    if spec == "scripted":
        if env_name != "tabletop":
            raise ValueError(f"the scripted expert exists only for the tabletop, not {env_name!r}")
        from .tabletop import ScriptedExpert

        return ScriptedExpert()
    if spec == "random":
        return RandomPolicy(seed=seed)
    if spec.startswith("ckpt:"):
        directory = spec[len("ckpt:") :]
        if not directory:
            raise ValueError("--policy ckpt:DIR needs a checkpoint directory after 'ckpt:'")
        return VLACheckpointPolicy(directory, device=kwargs.get("device", "cpu"))
    if spec == "ros":
        from .ros_policy import RosPolicy

        return RosPolicy(**{k: v for k, v in kwargs.items() if k in RosPolicy.OPTIONS})
    raise ValueError(f"unknown policy {spec!r}; choose {POLICY_CHOICES}")
