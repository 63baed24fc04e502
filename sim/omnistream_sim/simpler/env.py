"""SimplerEnv-Bridge environments behind one small interface for the rollout loop.

``reset(task, episode_id) -> observation``; ``step(action) -> (observation, success, done, info)`` with
``done`` always False: the protocol runs every episode for its full length and reads success at the last step.
Actions arriving here are already in SimplerEnv's convention (xyz delta in metres, axis-angle rotation delta,
gripper +1 open / -1 close); the harness converts Bridge policy outputs explicitly
(:func:`omnistream_sim.conventions.bridge_to_simpler_action`).

* :class:`SimplerBridgeEnv` wraps the real ``simpler_env`` (SAPIEN 2.2.2, needs an NVIDIA Vulkan GPU and its
  assets: it runs on a user's GPU machine, not here).
* :class:`SimplerStandIn` is a stand-in with the same observation/action shapes for tests and CI: NOT a
  simulator. A point "end effector" integrates the xyz deltas; an episode succeeds when, at the last step, the
  point sits within 2 cm of a target chosen by (task, episode_id) and the gripper is open (object released).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .tasks import BRIDGE_TASKS, BridgeTask

IMAGE_SHAPE = (480, 640, 3)  # SimplerEnv's 3rd-person camera for the WidowX tasks (H, W, 3)


def _check_action(action) -> np.ndarray:
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (7,) or not np.all(np.isfinite(a)):
        raise ValueError(f"a SimplerEnv action is 7 finite numbers (xyz, axis-angle, gripper), got {a}")
    if a[6] not in (-1.0, 1.0):
        raise ValueError(f"SimplerEnv's gripper must be exactly +1 (open) or -1 (close), got {a[6]}")
    if np.linalg.norm(a[3:6]) > np.pi + 1e-6:
        raise ValueError(f"axis-angle rotation longer than pi: {a[3:6]} (convert euler with euler_to_axis_angle)")
    return a


class SimplerStandIn:
    """Stand-in for SimplerEnv-Bridge (tests/CI): same shapes and protocol, trivially simple dynamics."""

    name = "SimplerStandIn"
    TOLERANCE = 0.02

    def __init__(self, render: bool = True):
        self.render = render
        self.task: BridgeTask | None = None

    def reset(self, task: str, episode_id: int) -> dict[str, Any]:
        if task not in BRIDGE_TASKS:
            raise ValueError(f"unknown task {task!r}")
        self.task = BRIDGE_TASKS[task]
        rng = np.random.default_rng([list(BRIDGE_TASKS).index(task), episode_id])
        self.ee = np.array([0.0, 0.0, 0.1])
        self.target = self.ee + rng.uniform(-0.1, 0.1, 3)
        self.gripper = 1.0
        self.steps = 0
        return self._observation()

    def _observation(self) -> dict[str, Any]:
        image = np.zeros(IMAGE_SHAPE, np.uint8)
        if self.render:  # two marks so frames change with the state (videos, image-based policies)
            for point, channel in ((self.ee, 0), (self.target, 1)):
                u = int(np.clip(320 + point[0] * 1000, 0, 639))
                v = int(np.clip(240 - point[1] * 1000, 0, 479))
                image[max(v - 4, 0) : v + 4, max(u - 4, 0) : u + 4, channel] = 255
        return {
            "images": {"static": image},
            "state": np.concatenate([self.ee, [0.0, 0.0, 0.0, 1.0], [self.gripper]]).astype(np.float32),
            "instruction": self.task.instruction,
            "target": self.target.copy(),  # privileged: only the stand-in's scripted test policy reads it
        }

    def step(self, action) -> tuple[dict[str, Any], bool, bool, dict]:
        a = _check_action(action)
        self.ee = self.ee + a[:3]
        self.gripper = float(a[6])
        self.steps += 1
        success = bool(np.linalg.norm(self.ee - self.target) < self.TOLERANCE and self.gripper > 0)
        return self._observation(), success, False, {"success": success}

    def close(self) -> None:
        pass


class SimplerBridgeEnv:
    """The real SimplerEnv (``simpler_env.make``) for the four WidowX tasks."""

    name = "simpler_env"

    def __init__(self):
        try:
            import simpler_env
            from simpler_env.utils.env.observation_utils import get_image_from_maniskill2_obs_dict
        except ImportError as exc:
            raise ValueError(
                f"SimplerEnv is not installed ({exc}): it needs SAPIEN 2.2.2 with an NVIDIA Vulkan GPU and the "
                "simpler_env package with its ManiSkill2_real2sim assets"
            ) from None
        self._make = simpler_env.make
        self._image = get_image_from_maniskill2_obs_dict
        self._envs: dict[str, Any] = {}
        self.env = None
        self.task: BridgeTask | None = None

    def reset(self, task: str, episode_id: int) -> dict[str, Any]:
        if task not in self._envs:
            self._envs[task] = self._make(task)
        self.env, self.task = self._envs[task], BRIDGE_TASKS[task]
        obs, _ = self.env.reset(options={"obj_init_options": {"episode_id": int(episode_id)}})
        return self._observation(obs)

    def _observation(self, obs) -> dict[str, Any]:
        agent = obs.get("agent", {}) if isinstance(obs, dict) else {}
        state = np.asarray(agent.get("eef_pos", np.zeros(8)), dtype=np.float32)
        return {
            "images": {"static": np.asarray(self._image(self.env, obs), dtype=np.uint8)},
            "state": state,
            "instruction": self.env.get_language_instruction(),
        }

    def step(self, action) -> tuple[dict[str, Any], bool, bool, dict]:
        obs, _, _, _, info = self.env.step(_check_action(action))
        return self._observation(obs), bool(info.get("success", False)), False, info

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
