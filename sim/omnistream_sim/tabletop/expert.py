"""The scripted expert: solves every tabletop task from privileged state (TCP pose and block positions).

It is a small phase machine that moves the TCP towards a way-point with a proportional, clipped relative action
(so its actions are exactly in the environment's convention) and always steers the orientation back to
"gripper down", the way a teleoperator would. It recovers from a grasp that went wrong (the gripper closed away
from the block, or the block stayed on the table while the TCP rose): it opens and approaches again. The task comes from the environment (``env.task``), not from the
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
# A grasp has failed when the TCP has risen this far since closing while the block stayed on the table.
FAILED_GRASP_RISE = 0.02
# A descent has stalled (a finger came down on the block) after this many steps without sinking while still above it.
STALL_STEPS = 4


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


class ScriptedExpert:
    """``Policy`` for the tabletop; reads the env's privileged state, the observation only for the TCP pose."""

    name = "scripted"
    needs_images = False  # the rollout loop may skip rendering for it

    def __init__(self, env: TabletopEnv | None = None, target_offset: np.ndarray | None = None):
        """``target_offset``: aim this far (metres, xyz) from the block; used to act out a missed grasp while the
        recorded labels come from an unbiased expert (see ``record_expert_episode``)."""
        self.env = env
        self.target_offset = np.zeros(3) if target_offset is None else np.asarray(target_offset, dtype=np.float64)
        self.reset()

    def bind(self, env: TabletopEnv) -> None:
        """Attach the environment whose privileged state the expert reads (the rollout loop calls this)."""
        self.env = env

    def reset(self) -> None:
        self.phase = "approach"
        self.misses = 0  # grasps found to have failed in this episode
        self._counter = 0
        self._stalled = 0
        self._anchor: np.ndarray | None = None
        self._last_z: float | None = None

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
        block = self.env.block_positions()[self.env.task.colour] + self.target_offset
        if self.env.task.kind == "lift":
            return self._lift(tcp, euler, block, gripper_closed=state[-1] < 0)
        return self._push_left(tcp, euler, block)

    def _lift(self, tcp, euler, block, gripper_closed: bool) -> np.ndarray:
        if self.phase == "descend" and gripper_closed:
            self.phase = "approach"  # closed before reaching the block: open, rise and come again
        if self.phase == "lift" and tcp[2] - self._anchor[2] > FAILED_GRASP_RISE and block[2] < self._rest_z + 0.01:
            self.phase = "approach"  # the block stayed behind
            self.misses += 1
            self._counter = 0
        if self.phase == "approach":
            goal = block + [0, 0, APPROACH_HEIGHT]
            if np.linalg.norm((goal - tcp)[:2]) < 0.006 and abs(goal[2] - tcp[2]) < 0.02:
                self.phase = "descend"
            return self._towards(goal, tcp, euler, 1.0)
        if self.phase == "descend":
            goal = block.copy()
            sinking = self._last_z is None or tcp[2] < self._last_z - 0.002
            self._stalled = 0 if sinking or tcp[2] < goal[2] + 0.015 else self._stalled + 1
            self._last_z = tcp[2]
            if self._stalled >= STALL_STEPS:  # resting on the block: rise and come again
                self.phase, self._stalled, self._last_z = "approach", 0, None
                self.misses += 1
                return self._towards(block + [0, 0, APPROACH_HEIGHT], tcp, euler, 1.0)
            if np.linalg.norm(goal - tcp) < 0.006:
                self.phase = "close"
            return self._towards(goal, tcp, euler, 1.0)
        if self.phase == "close":
            self._counter += 1
            if self._counter >= CLOSE_STEPS:
                self.phase = "lift"
                self._anchor = tcp.copy()
                self._rest_z = block[2]
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
