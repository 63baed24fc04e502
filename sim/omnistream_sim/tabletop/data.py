"""Training data from the tabletop: scripted demonstrations and moving-camera geometry sequences.

Demonstrations (for the VLA) — ``generate_demonstrations(n, seed, out_dir=None, config=None, tasks="all")``
returns a list of :class:`Episode`; episode ``i`` uses seed ``seed + i`` (so sets with different seeds do not
overlap when their ranges do not), and tasks cycle through the chosen set in order so every task gets the same
share. Only successful expert episodes are kept (a failed one is re-drawn with the next unused seed).
Arrays of one episode with T control steps (observation t is what the policy saw before action t)::

    static    (T, H, W, 3)  uint8   static camera RGB
    wrist     (T, Hw, Ww, 3) uint8  wrist camera RGB (absent when config.render_wrist is False)
    static_depth (T, H, W)  float32 metres; static_intrinsics (3, 3); static_cam_to_world (4, 4) (fixed camera)
    wrist_intrinsics (3, 3); wrist_cam_to_world (T, 4, 4) (moves with the hand; no wrist depth, to keep files small)
    state     (T, 15)       float32 robot state (see env.py)
    scene     (T, 9)        float32 block centres
    actions   (T, 7)        float32 relative actions in [-1, 1], gripper exactly +-1
    instruction str, task str, seed int, success bool

On disk (``out_dir``): ``episode_000000.npz`` per episode (the arrays plus ``instruction``/``task`` as 0-d
strings) and ``index.json`` (one entry per episode: file, task, instruction, seed, length, plus the env config).

Geometry sequences (for perception pre-training/eval) — ``generate_geometry_sequences(n, frames, seed)``:
a camera orbiting the table at a seeded radius, height and speed, always looking at a point on the table, over a
seeded block layout; the arm holds a seeded pose. The room's floor and walls bound every view, so every pixel
has valid depth (well inside the far plane). Each :class:`GeometrySequence` has ``rgb (F, H, W, 3) uint8``,
``depth (F, H, W) float32`` metres, ``intrinsics (3, 3)`` and ``cam_to_world (F, 4, 4)`` (OpenCV convention:
x right, y down, z forward). Saved as ``sequence_000000.npz`` with ``index.json`` when ``out_dir`` is given.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cameras import CameraSpec
from .env import TabletopConfig, TabletopEnv
from .expert import ScriptedExpert
from .tasks import resolve_tasks


@dataclass
class Episode:
    arrays: dict[str, np.ndarray]
    instruction: str
    task: str
    seed: int
    success: bool

    def __len__(self) -> int:
        return int(self.arrays["actions"].shape[0])

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, instruction=np.array(self.instruction), task=np.array(self.task), seed=self.seed,
                            success=self.success, **self.arrays)  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> Episode:
        with np.load(path) as f:
            meta = {"instruction", "task", "seed", "success"}
            arrays = {k: f[k] for k in f.files if k not in meta}
            return cls(arrays, str(f["instruction"]), str(f["task"]), int(f["seed"]), bool(f["success"]))


@dataclass
class GeometrySequence:
    rgb: np.ndarray
    depth: np.ndarray
    intrinsics: np.ndarray
    cam_to_world: np.ndarray
    seed: int
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, rgb=self.rgb, depth=self.depth, intrinsics=self.intrinsics,
                            cam_to_world=self.cam_to_world, seed=self.seed)  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> GeometrySequence:
        with np.load(path) as f:
            return cls(f["rgb"], f["depth"], f["intrinsics"], f["cam_to_world"], int(f["seed"]))


def record_expert_episode(
    env: TabletopEnv, seed: int, task: str, action_noise: float = 0.0, grasp_miss: float = 0.0
) -> Episode:
    """Run the scripted expert for one episode and keep every (observation, action) pair.

    ``action_noise`` > 0 injects noise into the *executed* motion (Gaussian, that standard deviation in action
    units on dx, dy, dz) while the recorded label stays the expert's clean action (DART-style): the closed-loop
    expert then shows how to recover from the small drifts a learned policy makes, which clean demonstrations
    never visit.

    ``grasp_miss``: the probability that a lift episode shows the recovery from a missed grasp, the learned
    policy's most common failure. An expert aiming 3-4.5 cm in front of or behind the block acts first: it closes
    the gripper there and rises until it notices the block stayed behind. The episode is recorded from that moment
    (gripper closed on nothing, the block on the table) with the unbiased expert's labels: open, go back above the
    block, grasp again. The off-target approach itself is not recorded: its labels (the unbiased expert's "go back
    up" a few centimetres from the block) taught a policy to abandon its own good descents. An episode whose
    off-target grasp happened to hold the block is reported as unsuccessful (it is discarded).
    """
    expert = ScriptedExpert(env)
    obs = env.reset(seed=seed, task=task)
    expert.reset()
    rng = np.random.default_rng([seed, 7])
    mistaken = None
    if grasp_miss > 0 and env.task.kind == "lift" and rng.random() < grasp_miss:
        # Off in x, along the static camera's line of sight where a block's distance is hardest to see, and across
        # the fingers' closing direction (y), so the gripper closes beside the block rather than on top of it.
        miss_x = rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.045)
        mistaken = ScriptedExpert(env, target_offset=[miss_x, rng.uniform(-0.01, 0.01), 0.0])
    frames: dict[str, list] = {}
    first = 0  # the first recorded frame
    success = False
    for _ in range(env.config.max_steps):
        action = expert.select_action(obs)
        _append(frames, obs, action)
        executed = action.copy()
        if mistaken is not None:
            executed = mistaken.select_action(obs)
            if mistaken.misses:  # noticed: record from here; the unbiased expert acts from the next step
                mistaken, first = None, len(frames["actions"]) - 1
        if action_noise > 0:
            executed[:3] = np.clip(executed[:3] + rng.normal(0.0, action_noise, 3), -1.0, 1.0)
        obs, success, done, _ = env.step(executed)
        if done:
            break
    if mistaken is not None:
        success = False  # the miss was never acted out (the off-target grasp held, or time ran out)
    arrays = {k: np.stack(v[first:]) for k, v in frames.items()}
    for name in ("static_intrinsics", "static_cam_to_world", "wrist_intrinsics"):  # constant: store once
        if name in arrays:
            arrays[name] = arrays[name][0]
    return Episode(arrays, env.instruction, env.task.name, seed, bool(success))


def _append(frames: dict[str, list], obs: dict, action: np.ndarray) -> None:
    for cam, rgb in obs["images"].items():
        frames.setdefault(cam, []).append(rgb)
    frames.setdefault("static_depth", []).append(obs["depth"]["static"])
    for cam in obs["images"]:
        frames.setdefault(f"{cam}_intrinsics", []).append(obs["intrinsics"][cam])
        frames.setdefault(f"{cam}_cam_to_world", []).append(obs["cam_to_world"][cam])
    frames.setdefault("state", []).append(obs["state"])
    frames.setdefault("scene", []).append(obs["scene"])
    frames.setdefault("actions", []).append(np.asarray(action, dtype=np.float32))


def generate_demonstrations(
    n: int,
    seed: int = 0,
    out_dir: str | Path | None = None,
    config: TabletopConfig | None = None,
    tasks: str | tuple[str, ...] = "all",
    progress: bool = True,
    action_noise: float = 0.0,
    grasp_miss: float = 0.0,
) -> list[Episode]:
    """``n`` successful expert episodes, tasks cycling through ``tasks``; saved under ``out_dir`` when given
    (``action_noise``, ``grasp_miss``: see :func:`record_expert_episode`)."""
    from tqdm import tqdm

    if n < 1:
        raise ValueError(f"number of demonstrations must be >= 1, got {n}")
    task_names = resolve_tasks(tasks)
    config = config or TabletopConfig()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    episodes: list[Episode] = []
    index = []
    next_seed = seed
    with TabletopEnv(config) as env, tqdm(total=n, desc="demonstrations", unit="ep", disable=not progress) as bar:
        while len(episodes) < n:
            task = task_names[len(episodes) % len(task_names)]
            episode = record_expert_episode(env, next_seed, task, action_noise, grasp_miss)
            next_seed += 1
            if not episode.success:
                if next_seed - seed > 2 * n + 20:
                    raise RuntimeError("the scripted expert keeps failing; the tabletop configuration is broken")
                continue
            if out is not None:
                name = f"episode_{len(episodes):06d}.npz"
                episode.save(out / name)
                index.append({"file": name, "task": episode.task, "instruction": episode.instruction,
                              "seed": episode.seed, "length": len(episode)})  # fmt: skip
            episodes.append(episode)
            bar.update(1)
    if out is not None:
        meta = {"config": asdict(config), "action_noise": action_noise, "grasp_miss": grasp_miss, "episodes": index}
        (out / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
    return episodes


def load_demonstrations(directory: str | Path) -> list[Episode]:
    """Episodes saved by :func:`generate_demonstrations`, in index order."""
    directory = Path(directory)
    index_path = directory / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"no index.json in {directory} (generate demonstrations there first)")
    index = json.loads(index_path.read_text())
    return [Episode.load(directory / e["file"]) for e in index["episodes"]]


def orbit_poses(rng: np.random.Generator, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Eyes and look-at targets of a seeded orbit around the table: (frames, 3) each."""
    radius = rng.uniform(0.45, 0.7)
    height = rng.uniform(0.35, 0.7)
    start = rng.uniform(-0.6, 0.6)  # around the +x side (the robot stands at -x)
    sweep = rng.uniform(0.4, 0.9) * rng.choice([-1.0, 1.0])
    bob = rng.uniform(0.0, 0.08)
    centre = np.array([0.5 + rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), 0.0])
    s = np.linspace(0.0, 1.0, frames)
    angle = start + sweep * s
    eyes = np.stack(
        [centre[0] + radius * np.cos(angle), centre[1] + radius * np.sin(angle), height + bob * np.sin(2 * np.pi * s)],
        axis=1,
    )
    targets = np.repeat(centre[None], frames, axis=0)
    return eyes, targets


def generate_geometry_sequences(
    n: int,
    frames: int = 16,
    seed: int = 0,
    out_dir: str | Path | None = None,
    image_size: int = 128,
    config: TabletopConfig | None = None,
    progress: bool = True,
) -> list[GeometrySequence]:
    """``n`` moving-camera sequences of ``frames`` frames each; sequence ``i`` is fully defined by ``seed + i``."""
    from tqdm import tqdm

    if n < 1 or frames < 2:
        raise ValueError(f"need n >= 1 sequences of frames >= 2, got n={n}, frames={frames}")
    config = config or TabletopConfig(render_wrist=False)
    spec = CameraSpec(image_size, image_size, config.fov_deg)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    sequences: list[GeometrySequence] = []
    with TabletopEnv(config) as env:
        for i in tqdm(range(n), desc="geometry sequences", unit="seq", disable=not progress):
            rng = np.random.default_rng(seed + i)
            env.reset(seed=seed + i)
            eyes, targets = orbit_poses(rng, frames)
            shots = [env.render_view(e, t, spec) for e, t in zip(eyes, targets)]
            sequences.append(
                GeometrySequence(
                    rgb=np.stack([s.rgb for s in shots]),
                    depth=np.stack([s.depth for s in shots]),
                    intrinsics=shots[0].intrinsics,
                    cam_to_world=np.stack([s.cam_to_world for s in shots]),
                    seed=seed + i,
                )
            )
            if out is not None:
                sequences[-1].save(out / f"sequence_{i:06d}.npz")
    if out is not None:
        index = [{"file": f"sequence_{i:06d}.npz", "seed": s.seed, "frames": frames} for i, s in enumerate(sequences)]
        meta = {"image_size": image_size, "fov_deg": config.fov_deg, "sequences": index}
        (out / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
    return sequences
