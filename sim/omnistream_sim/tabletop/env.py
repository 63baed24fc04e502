"""The built-in tabletop: pybullet (DIRECT, TinyRenderer), a Franka Panda, a table and three coloured blocks.

Frames: world = robot base frame, z up, the table top at z = 0; the robot faces +x; the static camera stands in
front of the table looking back at the robot, so world -y is the image's left.

Action (CALVIN's relative convention, see ``../shared/specs/simulators.md``): a float vector of 7,
``(dx, dy, dz, droll, dpitch, dyaw, gripper)``; the first six in [-1, 1] (clipped) are scaled by
``config.pos_step`` metres / ``config.rot_step`` radians and added to the *current* tool-centre-point (TCP) pose
(euler angles added, as calvin_env does); ``gripper`` is +1 open, -1 close (its sign is what counts).
One action lasts ``physics_hz / control_hz`` physics steps (30 Hz control on 240 Hz physics).

Observation (the ``omnistream_sim.policy_protocol`` dict) plus ground truth::

    images:      {"static": (H, W, 3) uint8, "wrist": (Hw, Ww, 3) uint8}
    depth:       {"static": (H, W) float32 metres, "wrist": ...}
    intrinsics:  {"static": (3, 3) float32, "wrist": ...}
    cam_to_world:{"static": (4, 4) float32 OpenCV camera-to-world, "wrist": ...}
    state:       (15,) float32 = TCP xyz, TCP euler (3), gripper opening (m), 7 arm joints, last gripper action
                 (CALVIN's robot_obs layout)
    scene:       (9,) float32 = red, green, blue block centre xyz
    instruction: str

Deterministic: ``reset(seed)`` fully defines the episode (layout, task when not given, robot start).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .cameras import CameraFrame, CameraSpec, look_at_view_matrix, render
from .tasks import COLOURS, TASKS, Task, resolve_tasks

ARM_JOINTS = tuple(range(7))
FINGER_JOINTS = (9, 10)
TCP_LINK = 11  # panda_grasptarget: between the fingertips
HAND_LINK = 8
HOME_JOINTS = (0.0, -0.25, 0.0, -2.3, 0.0, 2.05, math.pi / 4)
FINGER_OPEN = 0.04
# Names of the entries of ``observation["state"]`` (CALVIN's robot_obs layout), e.g. for a policy's state_names and
# for the sensor_msgs/JointState the ROS harness publishes (name[i] labels position[i]).
STATE_NAMES = (
    "tcp_x", "tcp_y", "tcp_z", "tcp_roll", "tcp_pitch", "tcp_yaw", "gripper_opening",
    *(f"panda_joint{i}" for i in range(1, 8)), "gripper_action",
)  # fmt: skip
# The room (metres, world frame): every view of the table ends on a wall or the floor well inside the far plane.
ROOM_X = (-0.8, 1.8)
ROOM_Y = (-1.2, 1.2)
ROOM_FLOOR_Z = -0.76
ROOM_WALL_HEIGHT = 2.2


@dataclass(frozen=True)
class TabletopConfig:
    image_size: int = 128  # static camera, square
    wrist_image_size: int = 96
    render_wrist: bool = True
    tasks: tuple[str, ...] = ("all",)  # task set names or task names (see tasks.TASK_SETS)
    max_steps: int = 100  # control steps per episode
    control_hz: int = 30
    physics_hz: int = 240
    pos_step: float = 0.02  # metres per unit action (CALVIN)
    rot_step: float = 0.05  # radians per unit action (CALVIN)
    block_size: float = 0.05
    workspace_x: tuple[float, float] = (0.42, 0.62)
    workspace_y: tuple[float, float] = (-0.16, 0.16)
    min_block_distance: float = 0.12
    # Keep the spot beside each block (+y, where a push starts) free of the other blocks, so pushes never begin by
    # landing the fingers on a neighbour; the expert's PUSH_OFFSET is 0.085.
    push_side_offset: float = 0.085
    push_side_clearance: float = 0.075
    # "random": each block anywhere in the workspace (the policy must localise it); "slots": the blocks stand in
    # three fixed slots (each jittered by up to ``slot_jitter``), their colours shuffled per episode, so the
    # instruction still decides which slot to go to (make demo's 2-core setting: a few minutes of training
    # learn "which slot holds the named colour" far sooner than continuous localisation).
    layout: str = "random"
    slots: tuple[tuple[float, float], ...] = ((0.52, -0.13), (0.52, 0.0), (0.52, 0.13))
    slot_jitter: float = 0.015
    # Metres of random TCP offset at reset (one value, or x, y, z), so no two episodes start alike. A wide y spread
    # matters for learning: when every episode starts in the middle, the first few centimetres of motion already
    # tell a policy which block it is heading for, and it can fit the demonstrations without reading the
    # instruction (then, in closed loop, it drifts to whichever block it happens to face).
    start_noise: float | tuple[float, float, float] = 0.03
    paraphrase: bool = False  # draw one of several instruction templates per episode
    static_eye: tuple[float, float, float] = (0.95, 0.0, 0.55)
    static_target: tuple[float, float, float] = (0.45, 0.0, 0.1)
    fov_deg: float = 48.0
    wrist_fov_deg: float = 75.0

    @classmethod
    def debug(cls, **overrides) -> TabletopConfig:
        """Tiny images and short episodes for tests."""
        return replace(cls(image_size=64, wrist_image_size=48), **overrides)

    def __post_init__(self) -> None:
        if self.layout not in ("random", "slots"):
            raise ValueError(f"layout must be 'random' or 'slots', got {self.layout!r}")
        if self.layout == "slots" and len(self.slots) != len(COLOURS):
            raise ValueError(f"layout 'slots' needs {len(COLOURS)} slots (one per block), got {len(self.slots)}")

    @property
    def substeps(self) -> int:
        return self.physics_hz // self.control_hz


@dataclass
class StepInfo:
    task: str
    instruction: str
    success: bool
    step: int
    blocks: dict[str, np.ndarray] = field(default_factory=dict)


class DirectClient:
    """A headless pybullet client: ``client.fn(...)`` calls ``pybullet.fn(..., physicsClientId=id)``.

    pybullet_utils' BulletClient does the same but connects with ``options=""``, which makes pybullet print
    ``argv[0]=`` on every connection (noise in every CLI run and test log).
    """

    # Pure maths functions take no client id.
    _STATELESS = frozenset({
        "invertTransform", "multiplyTransforms", "getMatrixFromQuaternion", "getEulerFromQuaternion",
        "computeViewMatrix", "computeViewMatrixFromYawPitchRoll", "computeProjectionMatrixFOV",
        "getQuaternionFromEuler", "getAxisAngleFromQuaternion", "getDifferenceQuaternion",
    })  # fmt: skip

    def __init__(self):
        import pybullet

        self._pybullet = pybullet
        self._id = pybullet.connect(pybullet.DIRECT)
        if self._id < 0:
            raise RuntimeError("pybullet could not start a DIRECT (headless) simulation")

    def __getattr__(self, name: str):
        attr = getattr(self._pybullet, name)
        if callable(attr) and name not in self._STATELESS:
            return functools.partial(attr, physicsClientId=self._id)
        return attr

    def disconnect(self) -> None:
        self._pybullet.disconnect(physicsClientId=self._id)


def light_panda_urdf() -> Path:
    """pybullet_data's Panda with its low-poly collision meshes also used as visuals.

    TinyRenderer spends ~55 ms per frame on the detailed visual meshes and ~5 ms on the collision ones; the
    arm looks the same at 128 px. The variant is derived at run time from the installed pybullet_data (mesh paths
    made absolute) and cached in the temp directory.
    """
    import pybullet_data

    data = Path(pybullet_data.getDataPath()) / "franka_panda"
    text = (data / "panda.urdf").read_text()
    text = text.replace("package://meshes/visual/", "package://meshes/collision/")
    text = text.replace("package://meshes/", f"{(data / 'meshes').as_posix()}/")
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"omnistream_panda_light_{digest}.urdf"
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)  # atomic: parallel test workers may race here
    return path


class TabletopEnv:
    """One pybullet client reused across episodes; every reset rebuilds the world, so episodes are independent."""

    def __init__(self, config: TabletopConfig | None = None):
        import pybullet_data

        self.config = config or TabletopConfig()
        self.task_names = resolve_tasks(self.config.tasks)
        self._p = DirectClient()
        p = self._p
        p.setAdditionalSearchPath(pybullet_data.getDataPath())
        self._build_world()
        self._static_spec = CameraSpec(self.config.image_size, self.config.image_size, self.config.fov_deg)
        self._wrist_spec = CameraSpec(
            self.config.wrist_image_size, self.config.wrist_image_size, self.config.wrist_fov_deg, near=0.01
        )
        self._static_view = look_at_view_matrix(self.config.static_eye, self.config.static_target, (0, 0, 1))
        self.task: Task = TASKS[self.task_names[0]]
        self.instruction = self.task.instruction()
        self.steps = 0
        # Rendering is most of a step's cost; a policy that reads only state (the scripted expert) can skip it.
        self.render_images = True
        self._start_blocks: dict[str, np.ndarray] = {}
        self._gripper_action = 1.0
        self._down_euler = np.zeros(3)

    # ----- world -----
    def _build_world(self) -> None:
        p = self._p
        # A fresh world per episode: restoreState leaves solver caches behind (renders then differ by a grey
        # level after other episodes); rebuilding costs ~50 ms and makes an episode a function of its seed only.
        p.resetSimulation()
        p.setTimeStep(1.0 / self.config.physics_hz)
        p.setGravity(0, 0, -9.81)
        half = self.config.block_size / 2
        table_col = p.createCollisionShape(p.GEOM_BOX, halfExtents=[0.6, 0.6, 0.02])
        table_vis = p.createVisualShape(p.GEOM_BOX, halfExtents=[0.6, 0.6, 0.02], rgbaColor=[0.72, 0.6, 0.45, 1])
        self.table = p.createMultiBody(0, table_col, table_vis, basePosition=[0.45, 0, -0.02])
        p.changeDynamics(self.table, -1, lateralFriction=0.6)
        self._build_room()
        self.robot = p.loadURDF(str(light_panda_urdf()), [0, 0, 0], useFixedBase=True)
        for link in range(-1, p.getNumJoints(self.robot)):
            grey = 0.35 if link >= HAND_LINK else 0.85  # dark hand and fingers, light arm
            p.changeVisualShape(self.robot, link, rgbaColor=[grey, grey, grey, 1])
        for j in FINGER_JOINTS:
            p.changeDynamics(self.robot, j, lateralFriction=1.5, spinningFriction=0.01)
        self.blocks: dict[str, int] = {}
        for i, (colour, rgba) in enumerate(COLOURS.items()):
            col = p.createCollisionShape(p.GEOM_BOX, halfExtents=[half] * 3)
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=[half] * 3, rgbaColor=list(rgba))
            body = p.createMultiBody(0.08, col, vis, basePosition=[0.5, -0.2 + 0.2 * i, half])
            p.changeDynamics(body, -1, lateralFriction=1.0, spinningFriction=0.005)
            self.blocks[colour] = body
        lower, upper = [], []
        for j in ARM_JOINTS:
            info = p.getJointInfo(self.robot, j)
            lower.append(info[8])
            upper.append(info[9])
        self._ik_lower = lower + [0.0, 0.0]
        self._ik_upper = upper + [FINGER_OPEN, FINGER_OPEN]
        self._ik_ranges = [u - lo for u, lo in zip(self._ik_upper, self._ik_lower)]

    def _build_room(self) -> None:
        """Floor and walls around the table, so every camera pixel sees geometry (no "sky" at the far plane):
        depth ground truth is then valid everywhere, for the static and the moving cameras."""
        p = self._p
        (x0, x1), (y0, y1), floor, height = ROOM_X, ROOM_Y, ROOM_FLOOR_Z, ROOM_WALL_HEIGHT
        cx, cy, zc = (x0 + x1) / 2, (y0 + y1) / 2, floor + height / 2
        slabs = [  # (half extents, centre, colour)
            ([(x1 - x0) / 2, (y1 - y0) / 2, 0.01], [cx, cy, floor - 0.01], [0.45, 0.45, 0.47, 1]),
            ([0.01, (y1 - y0) / 2, height / 2], [x0 - 0.01, cy, zc], [0.78, 0.8, 0.84, 1]),
            ([0.01, (y1 - y0) / 2, height / 2], [x1 + 0.01, cy, zc], [0.78, 0.8, 0.84, 1]),
            ([(x1 - x0) / 2, 0.01, height / 2], [cx, y0 - 0.01, zc], [0.7, 0.74, 0.8, 1]),
            ([(x1 - x0) / 2, 0.01, height / 2], [cx, y1 + 0.01, zc], [0.7, 0.74, 0.8, 1]),
        ]
        for half, centre, rgba in slabs:
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=rgba)
            p.createMultiBody(0, -1, vis, basePosition=centre)  # visual only: nothing touches the room

    def close(self) -> None:
        if self._p is not None:
            self._p.disconnect()
            self._p = None

    def __enter__(self) -> TabletopEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- episode -----
    def reset(self, seed: int, task: str | None = None, instruction: str | None = None) -> dict:
        """Start an episode. ``task`` defaults to a seeded draw from the configured tasks; ``instruction`` overrides
        the instruction shown to the policy (success is still judged by ``task``: instruction-swap evaluation)."""
        p = self._p
        rng = np.random.default_rng(seed)
        task_name = task if task is not None else self.task_names[int(rng.integers(len(self.task_names)))]
        if task_name not in TASKS:
            raise ValueError(f"unknown tabletop task {task_name!r}; choose from {sorted(TASKS)}")
        self.task = TASKS[task_name]
        template = int(rng.integers(3)) if self.config.paraphrase else 0
        self.instruction = instruction if instruction is not None else self.task.instruction(template)
        self._build_world()
        for colour, xy in zip(self.blocks, self._sample_layout(rng)):
            p.resetBasePositionAndOrientation(
                self.blocks[colour], [xy[0], xy[1], self.config.block_size / 2], [0, 0, 0, 1]
            )
            p.resetBaseVelocity(self.blocks[colour], [0, 0, 0], [0, 0, 0])
        for j, q in zip(ARM_JOINTS, HOME_JOINTS):
            p.resetJointState(self.robot, j, q)
        for j in FINGER_JOINTS:
            p.resetJointState(self.robot, j, FINGER_OPEN)
        self._gripper_action = 1.0
        self._down_euler = np.array(p.getEulerFromQuaternion(p.getLinkState(self.robot, TCP_LINK)[5]))
        # Move the TCP to a seeded start point near home, so no two demonstrations start identically.
        home = np.array(p.getLinkState(self.robot, TCP_LINK, computeForwardKinematics=True)[4])
        start = home + rng.uniform(-1, 1, 3) * np.asarray(self.config.start_noise, dtype=np.float64)
        q = self._ik(start, self._down_euler)
        for j, qj in zip(ARM_JOINTS, q):
            p.resetJointState(self.robot, j, qj)
        self._command_arm(q)
        self._command_gripper(1.0)
        for _ in range(self.config.substeps):  # let blocks settle
            p.stepSimulation()
        self.steps = 0
        self._start_blocks = self.block_positions()
        return self.observation()

    def _sample_layout(self, rng: np.random.Generator) -> list[np.ndarray]:
        cfg = self.config
        if cfg.layout == "slots":
            slots = np.asarray(cfg.slots, dtype=np.float64)[rng.permutation(len(self.blocks))]
            return list(slots + rng.uniform(-cfg.slot_jitter, cfg.slot_jitter, slots.shape))
        for _ in range(1000):
            xy = np.stack(
                [
                    rng.uniform(*cfg.workspace_x, size=len(self.blocks)),
                    rng.uniform(*cfg.workspace_y, size=len(self.blocks)),
                ],
                axis=1,
            )
            far = np.eye(len(xy)) * 1e9
            d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + far
            side = xy + [0.0, cfg.push_side_offset]
            d_side = np.linalg.norm(side[:, None] - xy[None], axis=-1) + far
            if d.min() >= cfg.min_block_distance and d_side.min() >= cfg.push_side_clearance:
                return list(xy)
        raise RuntimeError("could not place the blocks; enlarge the workspace or lower min_block_distance")

    def step(self, action) -> tuple[dict, bool, bool, StepInfo]:
        """Apply one 7-D relative action; returns (observation, success, done, info). ``done`` when the task
        succeeded or ``max_steps`` was reached."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (7,) or not np.all(np.isfinite(a)):
            raise ValueError(
                f"tabletop action must be 7 finite numbers (dx,dy,dz,droll,dpitch,dyaw,gripper), got {action!r}"
            )
        p = self._p
        pos, orn = self.tcp_pose()
        motion = np.clip(a[:6], -1.0, 1.0)
        target_pos = pos + motion[:3] * self.config.pos_step
        target_euler = orn + motion[3:] * self.config.rot_step
        target_pos[2] = max(target_pos[2], 0.005)  # never drive the fingers into the table
        self._command_arm(self._ik(target_pos, target_euler))
        self._gripper_action = 1.0 if a[6] >= 0 else -1.0
        self._command_gripper(self._gripper_action)
        for _ in range(self.config.substeps):
            p.stepSimulation()
        self.steps += 1
        success = self.check_success()
        done = success or self.steps >= self.config.max_steps
        info = StepInfo(self.task.name, self.instruction, success, self.steps, self.block_positions())
        return self.observation(), success, done, info

    def check_success(self) -> bool:
        return self.task.success(self._start_blocks, self.block_positions())

    # ----- robot -----
    def _ik(self, pos, euler) -> list[float]:
        p = self._p
        q = p.calculateInverseKinematics(
            self.robot,
            TCP_LINK,
            list(pos),
            p.getQuaternionFromEuler(list(euler)),
            lowerLimits=self._ik_lower,
            upperLimits=self._ik_upper,
            jointRanges=self._ik_ranges,
            restPoses=list(HOME_JOINTS) + [FINGER_OPEN, FINGER_OPEN],
            maxNumIterations=50,
            residualThreshold=1e-5,
        )
        return list(q[:7])

    def _command_arm(self, q) -> None:
        # Gain 0.3: the TCP covers ~90% of a full 0.02 m step within one 30 Hz control period without overshoot
        # (pybullet's default 0.1 covers ~55%, 0.6 overshoots vertically).
        self._p.setJointMotorControlArray(
            self.robot, ARM_JOINTS, self._p.POSITION_CONTROL, targetPositions=q, forces=[200.0] * 7,
            positionGains=[0.3] * 7,
        )  # fmt: skip

    def _command_gripper(self, gripper: float) -> None:
        target = FINGER_OPEN if gripper > 0 else 0.0
        self._p.setJointMotorControlArray(
            self.robot, FINGER_JOINTS, self._p.POSITION_CONTROL, targetPositions=[target] * 2, forces=[40.0] * 2
        )

    def tcp_pose(self) -> tuple[np.ndarray, np.ndarray]:
        state = self._p.getLinkState(self.robot, TCP_LINK, computeForwardKinematics=True)
        return np.array(state[4]), np.array(self._p.getEulerFromQuaternion(state[5]))

    def block_positions(self) -> dict[str, np.ndarray]:
        return {c: np.array(self._p.getBasePositionAndOrientation(b)[0]) for c, b in self.blocks.items()}

    @property
    def down_euler(self) -> np.ndarray:
        """The TCP orientation (euler) at reset: gripper pointing down; the expert holds it."""
        return self._down_euler.copy()

    def robot_state(self) -> np.ndarray:
        pos, euler = self.tcp_pose()
        joints = [s[0] for s in self._p.getJointStates(self.robot, list(ARM_JOINTS) + list(FINGER_JOINTS))]
        opening = joints[7] + joints[8]
        return np.concatenate([pos, euler, [opening], joints[:7], [self._gripper_action]]).astype(np.float32)

    # ----- cameras -----
    def wrist_view(self) -> np.ndarray:
        state = self._p.getLinkState(self.robot, HAND_LINK, computeForwardKinematics=True)
        rot = np.array(self._p.getMatrixFromQuaternion(state[5])).reshape(3, 3)
        origin = np.array(state[4])
        eye = origin + rot @ np.array([0.06, 0.0, 0.02])  # beside the hand, clear of the fingers
        target = origin + rot @ np.array([0.0, 0.0, 0.2])  # just past the fingertips
        return look_at_view_matrix(eye, target, rot @ np.array([1.0, 0.0, 0.0]))

    def render_camera(self, name: str) -> CameraFrame:
        if name == "static":
            return render(self._p, self._static_spec, self._static_view)
        if name == "wrist":
            return render(self._p, self._wrist_spec, self.wrist_view())
        raise ValueError(f"unknown camera {name!r}; the tabletop has 'static' and 'wrist'")

    def render_view(self, eye, target, spec: CameraSpec | None = None) -> CameraFrame:
        """A frame from an arbitrary camera (the moving camera of geometry sequences)."""
        return render(self._p, spec or self._static_spec, look_at_view_matrix(eye, target, (0, 0, 1)))

    def observation(self) -> dict:
        """The observation dict (module docstring); without the camera keys when ``render_images`` is False."""
        blocks = self.block_positions()
        obs = {
            "state": self.robot_state(),
            "scene": np.concatenate([blocks[c] for c in COLOURS]).astype(np.float32),
            "instruction": self.instruction,
        }
        if self.render_images:
            cams = ["static", "wrist"] if self.config.render_wrist else ["static"]
            frames = {name: self.render_camera(name) for name in cams}
            obs["images"] = {n: f.rgb for n, f in frames.items()}
            obs["depth"] = {n: f.depth for n, f in frames.items()}
            obs["intrinsics"] = {n: f.intrinsics for n, f in frames.items()}
            obs["cam_to_world"] = {n: f.cam_to_world for n, f in frames.items()}
        return obs
