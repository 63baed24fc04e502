"""The scripted expert: solves every tabletop task from privileged state (TCP pose and block positions).

It is a small phase machine that moves the TCP towards a way-point with a proportional, clipped relative action
(so its actions are exactly in the environment's convention) and always steers the orientation back to
"gripper down", the way a teleoperator would. The task comes from the environment (``env.task``), not from the
instruction, so swapped-instruction evaluations cannot fool it.
"""

from __future__ import annotations

import numpy as np

from .env import TabletopEnv

APPROACH_HEIGHT = 0.10
LIFT_TO = 0.20
PUSH_OFFSET = 0.085  # start this far on the +y side of the block
PUSH_TRAVEL = 0.16
CLOSE_STEPS = 6


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


class ScriptedExpert:
    """``Policy`` for the tabletop; reads the env's privileged state, the observation only for the TCP pose."""

    name = "scripted"
    needs_images = False  # the rollout loop may skip rendering for it

    def __init__(self, env: TabletopEnv | None = None):
        self.env = env
        self.reset()

    def bind(self, env: TabletopEnv) -> None:
        """Attach the environment whose privileged state the expert reads (the rollout loop calls this)."""
        self.env = env

    def reset(self) -> None:
        self.phase = "approach"
        self._counter = 0
        self._anchor: np.ndarray | None = None

    def _towards(self, goal: np.ndarray, tcp: np.ndarray, euler: np.ndarray, gripper: float) -> np.ndarray:
        cfg = self.env.config
        motion = np.clip((goal - tcp) / cfg.pos_step, -1.0, 1.0)
        rotation = np.clip(_wrap(self.env.down_euler - euler) / cfg.rot_step, -1.0, 1.0)
        return np.concatenate([motion, rotation, [gripper]]).astype(np.float32)

    def select_action(self, observation: dict) -> np.ndarray:
        if self.env is None:
            raise RuntimeError("the scripted expert is not bound to a tabletop env (call bind(env))")
        state = np.asarray(observation["state"], dtype=np.float64)
        tcp, euler = state[:3], state[3:6]
        block = self.env.block_positions()[self.env.task.colour]
        if self.env.task.kind == "lift":
            return self._lift(tcp, euler, block)
        return self._push_left(tcp, euler, block)

    def _lift(self, tcp, euler, block) -> np.ndarray:
        if self.phase == "approach":
            goal = block + [0, 0, APPROACH_HEIGHT]
            if np.linalg.norm((goal - tcp)[:2]) < 0.006 and abs(goal[2] - tcp[2]) < 0.02:
                self.phase = "descend"
            return self._towards(goal, tcp, euler, 1.0)
        if self.phase == "descend":
            goal = block.copy()
            if np.linalg.norm(goal - tcp) < 0.006:
                self.phase = "close"
            return self._towards(goal, tcp, euler, 1.0)
        if self.phase == "close":
            self._counter += 1
            if self._counter >= CLOSE_STEPS:
                self.phase = "lift"
                self._anchor = tcp.copy()
            return self._towards(tcp, tcp, euler, -1.0)
        goal = np.array([self._anchor[0], self._anchor[1], LIFT_TO])
        return self._towards(goal, tcp, euler, -1.0)

    def _push_left(self, tcp, euler, block) -> np.ndarray:
        side = block + [0, PUSH_OFFSET, 0]
        if self.phase == "approach":
            goal = side + [0, 0, APPROACH_HEIGHT]
            if np.linalg.norm((goal - tcp)[:2]) < 0.008 and abs(goal[2] - tcp[2]) < 0.02:
                self.phase = "descend"
            return self._towards(goal, tcp, euler, -1.0)
        if self.phase == "descend":
            goal = side.copy()
            if np.linalg.norm(goal - tcp) < 0.008:
                self.phase = "push"
                self._anchor = tcp.copy()
            return self._towards(goal, tcp, euler, -1.0)
        # Push along -y, following the block's x so it does not slip off the fingers.
        goal = np.array([block[0], self._anchor[1] - PUSH_TRAVEL, self._anchor[2]])
        return self._towards(goal, tcp, euler, -1.0)
