"""The simulator-side policies (``omnistream_cli.policies.make_policy`` builds them from ``--policy`` specs):

* ``scripted``  the tabletop's privileged expert (:class:`omnistream_sim.tabletop.ScriptedExpert`);
* ``random``    uniform relative actions, gripper +-1 (a floor for success rates);
* ``ckpt:DIR``  a VLA checkpoint loaded in-process (``omnistream_vla``'s ``OmniStreamVLAPolicy``), adapted from
  the observation dict to the policy's LeRobot batch keys;
(``ros:DIR``, the closed loop through the real ROS nodes, is ``omnistream_cli.policies.RosPolicy``.)

All return actions in CALVIN's relative convention (what the tabletop and CALVIN consume); the rollout loop
applies any other conversion explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


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


def state_columns(names) -> list[int]:
    """Where a policy's ``state_names`` sit in the simulators' 15-D state (CALVIN robot_obs layout, named by
    ``omnistream_sim.tabletop.env.STATE_NAMES``)."""
    from .tabletop.env import STATE_NAMES

    unknown = [n for n in names if n not in STATE_NAMES]
    if unknown:
        raise ValueError(f"the policy reads state {unknown} that the simulator does not provide ({list(STATE_NAMES)})")
    return [STATE_NAMES.index(n) for n in names]


def state_for_policy(observation: dict, columns: list[int]) -> np.ndarray:
    if "state" not in observation:
        raise ValueError("the policy reads the robot state, but the observation has no 'state'")
    return np.asarray(observation["state"], dtype=np.float32).reshape(-1)[columns]


def policy_backbone_dir(policy_dir: Path, config) -> Path:
    """The backbone directory a VLA policy directory names (relative paths are inside the policy directory)."""
    if config.backbone is None:
        raise ValueError(f"{policy_dir} is a features-only policy: pass the perception backbone explicitly")
    path = Path(config.backbone)
    return path if path.is_absolute() else policy_dir / path


class VLACheckpointPolicy:
    """A VLA checkpoint in-process: observation dict -> LeRobot batch -> ``select_action`` (chunk queue inside).

    A policy trained on streamed features (``config.features == "stream"``) gets them the way perception_node
    computes them: one streaming session per camera (the backbone's KV cache over the episode, reset with it).
    ``backbone`` overrides the backbone directory the policy names (as ``RosPolicy``'s does).
    """

    needs_images = True

    def __init__(self, directory: str | Path, device: str = "cpu", backbone: str | Path | None = None):
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"no VLA checkpoint directory at {directory}")
        from omnistream_vla.policy import OmniStreamVLAPolicy

        self.model = OmniStreamVLAPolicy.from_pretrained(directory, device=device)
        self.model.eval()
        config = self.model.config
        self.cameras = tuple(config.cameras)
        self.state_columns = state_columns(config.state_names)
        self.name = f"ckpt:{directory.name}"
        self.sessions: dict[str, Any] = {}
        if config.features == "stream":
            from omnistream_perception.perception import PerceptionConfig, PerceptionSession

            checkpoint = Path(backbone) if backbone is not None else policy_backbone_dir(directory, config)
            settings = PerceptionConfig(**config.perception_settings(str(checkpoint)), device=device)
            first = PerceptionSession.from_config(settings)  # loads the backbone (and heads) once
            self.sessions = {
                cam: first if i == 0 else PerceptionSession(first.model, first.heads, settings)
                for i, cam in enumerate(self.cameras)
            }  # one stream (KV cache) per camera, one model, as perception_node does

    def reset(self) -> None:
        self.model.reset()
        for session in self.sessions.values():
            session.reset()

    def observation_to_batch(self, observation: dict) -> dict[str, Any]:
        images = observation.get("images") or {}
        missing = [c for c in self.cameras if c not in images]
        if missing:
            raise ValueError(f"the checkpoint wants cameras {list(self.cameras)}; the observation lacks {missing}")
        if self.sessions:  # streamed, like perception_node: every frame enters the cache, chunk queued or not
            from omnistream_perception.features_codec import batch_entry, batch_key

            batch: dict[str, Any] = {}
            for cam, session in self.sessions.items():
                tokens = session.process(np.asarray(images[cam]), want_depth=False, want_pose=False).patch_tokens
                batch[batch_key(cam)] = batch_entry(tokens)
        else:
            batch = {f"observation.images.{c}": np.asarray(images[c])[None] for c in self.cameras}
        batch["task"] = [observation["instruction"]]
        if self.state_columns:
            batch["observation.state"] = state_for_policy(observation, self.state_columns)[None]
        return batch

    def select_action(self, observation: dict) -> np.ndarray:
        action = self.model.select_action(self.observation_to_batch(observation))
        return action[0].detach().cpu().numpy().astype(np.float32)
