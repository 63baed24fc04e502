"""VLA finetuning (paper C.4, VLM4VLA recipe): ``omnistream train vla``.

The backbone is frozen and nothing augments the images, so each frame's pooled patch tokens are computed
ONCE (progress bar) and training runs on cached features: the same gradients as running the frozen backbone
every step, for a fraction of the cost. Trained: the projector (its own group, lr 1e-4), the LLM with its text
embeddings, the action query and the action head (lr 2e-5); Adam, warm-up + cosine, gradient clip 1.0,
bf16 autocast where the device supports it. Action statistics are computed from the dataset and saved with
the policy (``normalization.safetensors``) and as ``<out>/action_stats.json``. ``init_vlm`` (``--init-vlm``) starts
the projector and LLM from the VLM stage (``omnistream_train.vlm``) instead of the preset's random LLM.

Datasets (detected from the directory):
* LeRobot v3 (``meta/info.json``), read with ``omnistream_train.lerobot_dataset``;
* CALVIN splits (``lang_annotations/auto_lang_ann.npy`` or ``ep_start_end_ids.npy`` + ``episode_XXXXXXX.npz``);
* tabletop demonstrations (``index.json`` + ``episode_XXXXXX.npz`` from ``omnistream_sim.tabletop``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnistream_perception.features_codec import batch_key
from omnistream_vla.action_convention import convention_for_dataset

from .checkpoint import resume_checkpoint, save_checkpoint
from .config import apply_overrides, warmup_cosine
from .data import sample_indices
from .distributed import (
    DistributedContext,
    average_gradients,
    broadcast_parameters,
    gather_strings,
    init_distributed,
    mean_across_ranks,
    shutdown_distributed,
    weights_digest,
)
from .metrics import MetricsLogger

# The robot state the demo preset's policy reads (names of omnistream_sim.tabletop.env.STATE_NAMES).
DEMO_STATE = ("tcp_x", "tcp_y", "tcp_z", "gripper_opening", "gripper_action")


@dataclass
class VLATrainConfig:
    policy_preset: str = "debug"  # OmniStreamVLAConfig preset: debug | qwen2.5-0.5b | ... | qwen2.5-7b
    policy_overrides: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = None  # backbone directory; None = a random backbone of ``backbone_preset``
    backbone_preset: str = "debug"
    cameras: list[str] = field(default_factory=lambda: ["static"])
    batch_size: int = 8
    max_steps: int | None = 1000
    epochs: float | None = None  # when set, max_steps = epochs * frames / (batch * world)
    lr: float = 2e-5
    projector_lr: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPUs that support it) | bf16 | fp32
    normalization_mode: str | None = None  # None = the policy preset's (used with dataset statistics)
    # Fixed arm bounds for min_max instead of the dataset's min/max: "auto" = the format's action range
    # (tabletop demonstrations +-1, CALVIN +-0.65 as in the recipe; LeRobot datasets use their statistics),
    # "stats" = always the statistics, or [low, high]. Statistics stretch near-constant dimensions (tiny
    # rotation corrections) to [-1, 1], which makes the policy chase noise; fixed bounds keep units honest.
    action_bounds: Any = "auto"
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_episodes: int = 0
    eval_tasks: str = "all"
    feature_batch: int = 32
    # How the frozen features are computed: "frame" = each frame alone (the recipe: no history); "stream" = each
    # episode streamed through the backbone's KV cache exactly as perception_node does on the robot (same
    # PerceptionSession code, reset per episode), so a policy deployed behind the node sees the features it
    # was trained on.
    features: str = "frame"
    # Auxiliary target (OmniStreamVLAConfig.target_dims): regress the xy of the block the instruction names from
    # the action query (tabletop demonstrations carry it); training-only help for a small LLM to ground language.
    target: bool = False
    # Robot state input (LeRobot's observation.state): names of the state entries the policy reads, or "all";
    # None = no state (the recipe). Tabletop demonstrations name theirs (omnistream_sim.tabletop.STATE_NAMES).
    state: Any = None
    # Start from a VLM (``omnistream train vlm`` output, the recipe's way): its LLM, tokenizer and projector
    # (+ visual positions) replace the preset's random ones; the policy architecture must match the VLM's.
    init_vlm: str | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VLATrainConfig:
        presets: dict[str, dict[str, Any]] = {
            "paper": dict(policy_preset="qwen2.5-7b", backbone_preset="large", batch_size=8, max_steps=None, epochs=5),
            # tiny models learn at larger rates than the recipe's 2e-5 / 1e-4 (which are for a 7B LLM)
            # 128 px frames (4x4 pooled tokens): at 64 px (2x2 tokens) the arm's phase is hard to tell apart
            "debug": dict(batch_size=32, max_steps=600, lr=2e-3, projector_lr=2e-3, warmup_steps=30, min_lr_ratio=0.01,
                          save_every=200, policy_overrides={"image_size": 128}),
            # make demo's closed loop: the static camera at 128 px with unpooled 16 px patches (a block's few pixels
            # survive), where each token sits in the image (visual_positions), the robot state (TCP position,
            # gripper opening and command) as one extra token, the instruction before the images and the named
            # block's position as an auxiliary target: the last two make a tiny LLM tie the colour word to the
            # block instead of following the arm's own progress (measured: without them the loss is the same with
            # the instruction's colour swapped, and the arm lifts the middle block whatever was asked)
            "demo": dict(batch_size=32, max_steps=5500, lr=1e-3, projector_lr=2e-3, warmup_steps=50, min_lr_ratio=0.01,
                         save_every=1000, cameras=["static"], state=list(DEMO_STATE), target=True,
                         policy_overrides={"image_size": 128, "pool": 1, "visual_positions": True,
                                           "instruction_first": True, "target_loss_weight": 3.0}),
        }  # fmt: skip
        if name not in presets:
            raise ValueError(f"unknown VLA preset {name!r}; choose one of {sorted(presets)}")
        return apply_overrides(cls(**presets[name]), overrides)


# ------------------------------------------------------------------------------------------------------
# Episodes from the three dataset formats
# ------------------------------------------------------------------------------------------------------
@dataclass
class EpisodeData:
    images: dict[str, Any]  # camera -> (T, H, W, 3) uint8 array, or (T, 3, H, W) float in [0, 1]
    actions: np.ndarray  # (T, 7)
    instruction: str
    state: np.ndarray | None = None  # (T, S) robot state, named by the dataset's state names
    target: np.ndarray | None = None  # (T, 2) xy of the block the instruction names (tabletop demonstrations)


def detect_format(root: Path) -> str:
    if (root / "meta" / "info.json").is_file():
        return "lerobot"
    if (root / "lang_annotations" / "auto_lang_ann.npy").is_file() or (root / "ep_start_end_ids.npy").is_file():
        return "calvin"
    if (root / "index.json").is_file():
        return "tabletop"
    raise ValueError(
        f"{root} is not a LeRobot v3 directory (meta/info.json), a CALVIN split (lang_annotations/) or tabletop "
        "demonstrations (index.json)"
    )


def load_episodes(root: str | Path, cameras: list[str]) -> list[EpisodeData]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist")
    kind = detect_format(root)
    if kind == "lerobot":
        return _lerobot_episodes(root, cameras)
    if kind == "calvin":
        return _calvin_episodes(root, cameras)
    return _tabletop_episodes(root, cameras)


def _lerobot_episodes(root: Path, cameras: list[str]) -> list[EpisodeData]:
    from .lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(root, image_format="uint8_hwc")
    keys = {cam: f"observation.images.{cam}" for cam in cameras}
    missing = [k for k in keys.values() if k not in ds.meta.camera_keys]
    if missing:
        raise ValueError(f"{root} has cameras {ds.meta.camera_keys}, not {missing}; set cameras accordingly")
    episodes = []
    for k in range(ds.num_episodes):
        start, stop = ds.episode_frames(k)
        items = [ds[i] for i in range(start, stop)]
        images = {cam: np.stack([np.asarray(it[key]) for it in items]) for cam, key in keys.items()}
        actions = np.stack([np.asarray(it["action"], dtype=np.float32) for it in items])
        episodes.append(EpisodeData(images, actions, str(items[0]["task"])))
    return episodes


def _calvin_episodes(root: Path, cameras: list[str]) -> list[EpisodeData]:
    from .calvin_to_lerobot import CalvinConversionConfig, calvin_windows

    use_language = (root / "lang_annotations" / "auto_lang_ann.npy").is_file()
    windows = calvin_windows(root, CalvinConversionConfig(use_language=use_language, default_task="do the task"))
    episodes = []
    for start, end, text in windows:
        frames = [np.load(root / f"episode_{i:07d}.npz") for i in range(start, end + 1)]
        images = {cam: np.stack([f[f"rgb_{cam}"] for f in frames]) for cam in cameras}
        actions = np.stack([f["rel_actions"].astype(np.float32) for f in frames])
        episodes.append(EpisodeData(images, actions, text))
    return episodes


def _tabletop_episodes(root: Path, cameras: list[str]) -> list[EpisodeData]:
    from omnistream_sim.tabletop.tasks import COLOURS, TASKS

    index = json.loads((root / "index.json").read_text())
    if "episodes" not in index:
        raise ValueError(f"{root}/index.json lists no 'episodes' (geometry sequences are not demonstrations)")
    episodes = []
    for entry in index["episodes"]:
        with np.load(root / entry["file"]) as f:
            missing = [c for c in cameras if c not in f.files]
            if missing:
                raise ValueError(f"{root / entry['file']} has no camera {missing}")
            state = f["state"].astype(np.float32) if "state" in f.files else None
            target = None
            if "scene" in f.files:  # scene = red, green, blue block centres (x, y, z)
                colour = list(COLOURS).index(TASKS[str(f["task"])].colour)
                target = f["scene"][:, 3 * colour : 3 * colour + 2].astype(np.float32)
            episodes.append(
                EpisodeData(
                    {c: f[c] for c in cameras}, f["actions"].astype(np.float32), str(f["instruction"]), state, target
                )  # fmt: skip
            )
    return episodes


def select_state(config: VLATrainConfig, episodes: list[EpisodeData], kind: str) -> tuple[list[str], np.ndarray | None]:
    """The state names the policy reads and the (N_frames, S) state of every frame (None without state)."""
    if config.state in (None, [], ()):
        return [], None
    if kind != "tabletop":
        raise ValueError(f"state input is supported for tabletop demonstrations, not {kind} datasets")
    from omnistream_sim.tabletop.env import STATE_NAMES

    names = list(STATE_NAMES) if config.state == "all" else [str(n) for n in config.state]
    unknown = [n for n in names if n not in STATE_NAMES]
    if unknown:
        raise ValueError(f"unknown state names {unknown}; the tabletop's are {list(STATE_NAMES)} (or 'all')")
    if any(e.state is None for e in episodes):
        raise ValueError("state input needs demonstrations that carry 'state' (regenerate them)")
    columns = [STATE_NAMES.index(n) for n in names]
    return names, np.concatenate([e.state[:, columns] for e in episodes]).astype(np.float32)


def auxiliary_targets(config: VLATrainConfig, episodes: list[EpisodeData]) -> torch.Tensor | None:
    """(N_frames, 2) standardised targets when ``config.target`` is on (None otherwise)."""
    if not config.target:
        return None
    if any(e.target is None for e in episodes):
        raise ValueError("target=true needs tabletop demonstrations that carry 'scene' (the block positions)")
    targets = np.concatenate([e.target for e in episodes])
    return torch.from_numpy((targets - targets.mean(0)) / (targets.std(0) + 1e-6)).float()


def action_chunks(actions: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per step t the actions t..t+chunk-1 (last action repeated past the end) and the pad mask (T, chunk)."""
    t = actions.shape[0]
    idx = np.arange(t)[:, None] + np.arange(chunk)[None]
    pad = idx >= t
    return actions[np.minimum(idx, t - 1)], pad


def action_statistics(actions: np.ndarray) -> dict[str, np.ndarray]:
    """LeRobot's per-dimension statistics of (N, A) actions."""
    return {
        "min": actions.min(0),
        "max": actions.max(0),
        "mean": actions.mean(0),
        "std": actions.std(0),
        "q01": np.quantile(actions, 0.01, axis=0),
        "q99": np.quantile(actions, 0.99, axis=0),
        "count": np.array([actions.shape[0]]),
    }


# ------------------------------------------------------------------------------------------------------
def _precision(config: VLATrainConfig, device: torch.device) -> torch.dtype | None:
    if config.precision == "fp32":
        return None
    if config.precision == "bf16":
        return torch.bfloat16
    if config.precision != "auto":
        raise ValueError(f"precision must be auto|bf16|fp32, got {config.precision!r}")
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


FORMAT_BOUNDS = {"tabletop": (-1.0, 1.0), "calvin": (-0.65, 0.65)}


def resolve_bounds(config: VLATrainConfig, kind: str) -> tuple[float, float] | None:
    if config.action_bounds == "auto":
        return FORMAT_BOUNDS.get(kind)
    if config.action_bounds in ("stats", None):
        return None
    low, high = (float(v) for v in config.action_bounds)
    if not low < high:
        raise ValueError(f"action_bounds must be [low, high] with low < high, got {config.action_bounds}")
    return low, high


def build_policy(
    config: VLATrainConfig,
    stats: dict[str, np.ndarray],
    device: torch.device,
    bounds: tuple[float, float] | None = None,
    state_names: list[str] | None = None,
    states: np.ndarray | None = None,
):
    from omnistream_perception.model import OmniStreamModel
    from omnistream_vla.normalization import ActionNormalizer
    from omnistream_vla.policy import OmniStreamVLAConfig, OmniStreamVLAPolicy

    torch.manual_seed(config.seed)
    if config.backbone:
        backbone = OmniStreamModel.from_pretrained(config.backbone)
    else:
        backbone = OmniStreamModel.from_preset(config.backbone_preset)
    overrides = dict(config.policy_overrides)
    overrides.update(
        vision_hidden_size=backbone.config.hidden_size, cameras=tuple(config.cameras), features=config.features
    )
    if state_names:
        overrides["state_names"] = tuple(state_names)
    if config.target:
        overrides["target_dims"] = 2
    if config.features == "stream" and config.backbone:
        from omnistream_perception.model.heads import GeometryHeads

        overrides["camera_token"] = GeometryHeads.present(config.backbone)  # as perception_node will stream
    overrides.setdefault("lr", config.lr)
    overrides.setdefault("projector_lr", config.projector_lr)
    overrides.setdefault("grad_clip", config.grad_clip)
    if config.normalization_mode:
        overrides["normalization_mode"] = config.normalization_mode
    policy_config = OmniStreamVLAConfig.preset(config.policy_preset, **overrides)
    vlm = None
    if config.init_vlm:
        from .vlm import VLMDirectory

        vlm = VLMDirectory(config.init_vlm)
        vlm.check_fits(policy_config)
        vlm.check_backbone(backbone)
        policy_config = OmniStreamVLAConfig.preset(config.policy_preset, **{**overrides, **vlm.llm_overrides()})
    arm = policy_config.arm_dims
    if bounds is not None:
        normalizer = ActionNormalizer.from_bounds(bounds[0], bounds[1], arm)
    else:
        normalizer = ActionNormalizer(
            policy_config.normalization_mode,
            arm,
            {k: torch.as_tensor(v[:arm]) for k, v in stats.items() if k != "count"},
        )
    policy = OmniStreamVLAPolicy(policy_config, normalizer=normalizer, backbone=backbone)
    if vlm is not None:
        vlm.load_into(policy)
    if policy.state_encoder is not None:
        if states is None:
            raise ValueError("state_names given without the dataset's states (for the statistics)")
        policy.state_encoder.set_statistics(states.mean(0), states.std(0))
    return policy.to(device)


@torch.no_grad()
def cache_features(
    policy, episodes: list[EpisodeData], cameras: list[str], batch: int, progress: bool
) -> dict[str, torch.Tensor]:
    """Pooled patch tokens of every frame, per camera: (N_frames, n, D) float32 (frozen backbone, run once)."""
    from tqdm.auto import tqdm

    total = sum(len(e.actions) for e in episodes)
    out: dict[str, list[torch.Tensor]] = {cam: [] for cam in cameras}
    bar = tqdm(total=total * len(cameras), desc="frozen features", unit="frame", disable=not progress)
    for ep in episodes:
        for cam in cameras:
            frames = ep.images[cam]
            for s in range(0, len(frames), batch):
                chunk = frames[s : s + batch]
                out[cam].append(policy.encode_images(chunk).float().cpu())
                bar.update(len(chunk))
    bar.close()
    return {cam: torch.cat(v) for cam, v in out.items()}


def streamed_patch_tokens(
    policy, episodes: list[EpisodeData], cameras: list[str], backbone: str | None, progress: bool
) -> dict[str, torch.Tensor]:
    """Pooled patch tokens of every frame, per camera, streamed per episode as perception_node computes them."""
    from tqdm.auto import tqdm

    from omnistream_perception.perception import PerceptionConfig, PerceptionSession

    if backbone is None or not Path(backbone).is_dir():
        raise ValueError("features='stream' needs the backbone as a checkpoint directory (--backbone DIR)")
    # the node's settings for this policy (see omnistream_cli.policies.RosPolicy): resize to the policy's image
    # size, its pooling, float32 tokens, the whole episode in the cache
    session = PerceptionSession.from_config(PerceptionConfig(**policy.config.perception_settings(str(backbone))))
    total = sum(len(e.actions) for e in episodes)
    out: dict[str, list[torch.Tensor]] = {cam: [] for cam in cameras}
    bar = tqdm(total=total * len(cameras), desc="streamed features", unit="frame", disable=not progress)
    for ep in episodes:
        for cam in cameras:
            session.reset()
            for frame in ep.images[cam]:
                rgb = np.asarray(frame)
                if rgb.dtype != np.uint8:  # (3, H, W) float in [0, 1]
                    rgb = (np.clip(rgb.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
                tokens = session.process(rgb, want_depth=False, want_pose=False).patch_tokens
                out[cam].append(torch.from_numpy(tokens.reshape(1, -1, tokens.shape[-1])))
                bar.update(1)
    bar.close()
    return {cam: torch.cat(v) for cam, v in out.items()}


def frozen_features(policy, episodes: list[EpisodeData], config, show: bool) -> dict[str, torch.Tensor]:
    """The frozen backbone's tokens of every frame as ``config.features`` says (VLA and VLM configs alike):
    ``frame`` (each frame alone, batched) or ``stream`` (per episode, as perception_node computes them)."""
    if config.features == "stream":
        return streamed_patch_tokens(policy, episodes, config.cameras, config.backbone, show)
    if config.features == "frame":
        return cache_features(policy, episodes, config.cameras, config.feature_batch, show)
    raise ValueError(f"features must be 'frame' or 'stream', got {config.features!r}")


@torch.no_grad()
def dataset_loss(policy, features, chunks, pads, tasks, cameras, device, batch: int = 64, states=None) -> float:
    """The training loss over every frame of the dataset (eval mode): the before/after number of a run."""
    was_training = policy.training
    policy.eval()
    total, count = 0.0, 0
    for s in range(0, len(tasks), batch):
        idx = list(range(s, min(len(tasks), s + batch)))
        data = {batch_key(cam): features[cam][idx].to(device) for cam in cameras}
        data.update(action=chunks[idx].to(device), action_is_pad=pads[idx].to(device), task=[tasks[i] for i in idx])
        if states is not None:
            data["observation.state"] = states[idx].to(device)
        loss, _ = policy(data)
        total += float(loss) * len(idx)
        count += len(idx)
    policy.train(was_training)
    return total / max(1, count)


def run_vla_training(
    config: VLATrainConfig,
    dataset: str | Path,
    out_dir: str | Path,
    resume: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    from tqdm.auto import tqdm

    ctx = init_distributed(device)
    try:
        return _train(config, dataset, Path(out_dir), resume, ctx, progress, tqdm)
    finally:
        shutdown_distributed()


def _train(config, dataset, out: Path, resume, ctx: DistributedContext, progress: bool, tqdm) -> dict:
    episodes = load_episodes(dataset, config.cameras)
    if not episodes:
        raise ValueError(f"{dataset} holds no episodes")
    all_actions = np.concatenate([e.actions for e in episodes])
    if all_actions.ndim != 2 or all_actions.shape[1] != 7:
        raise ValueError(f"actions must be 7-D (6 arm + gripper), got shape {all_actions.shape[1:]}")
    stats = action_statistics(all_actions)
    kind = detect_format(Path(dataset))
    state_names, states = select_state(config, episodes, kind)
    policy = build_policy(config, stats, ctx.device, resolve_bounds(config, kind), state_names, states)
    policy.config.action_convention = convention_for_dataset(kind).to_dict()  # the node acts in these units
    states_t = torch.from_numpy(states) if states is not None else None
    targets_t = auxiliary_targets(config, episodes)
    chunk = policy.config.chunk_size
    show = progress and ctx.is_main
    features = frozen_features(policy, episodes, config, show)
    chunks, pads, tasks = [], [], []
    for e in episodes:
        a, p = action_chunks(e.actions, chunk)
        chunks.append(torch.from_numpy(a))
        pads.append(torch.from_numpy(p))
        tasks += [e.instruction] * len(e.actions)
    chunks_t, pads_t = torch.cat(chunks), torch.cat(pads)
    frames = len(tasks)
    max_steps = config.max_steps
    if config.epochs is not None:
        max_steps = max(1, int(config.epochs * frames / (config.batch_size * ctx.world_size)))
    if not max_steps:
        raise ValueError("set max_steps or epochs")

    policy.train()
    broadcast_parameters(policy, ctx)
    groups = policy.parameter_groups()
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    step = 0
    if resume:
        step = resume_checkpoint(resume, {"policy": policy}, optimizer, ctx.world_size)
    autocast_dtype = _precision(config, ctx.device)
    initial_loss = dataset_loss(policy, features, chunks_t, pads_t, tasks, config.cameras, ctx.device, states=states_t)
    logger = MetricsLogger(out, enabled=ctx.is_main, resume_step=step if resume else None)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "vla_train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        stats_json = {k: np.asarray(v).tolist() for k, v in stats.items()}
        (out / "action_stats.json").write_text(json.dumps({"action": stats_json}, indent=2) + "\n")
    bar = tqdm(total=max_steps, initial=step, desc="vla", disable=not show)
    began = time.perf_counter()
    first_loss, logs = None, {}
    while step < max_steps:
        scale = warmup_cosine(step, config.warmup_steps, max_steps, config.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * scale
        idx = sample_indices(frames, step, ctx.rank, ctx.world_size, config.batch_size, config.seed, 0)
        batch = {batch_key(cam): features[cam][idx].to(ctx.device) for cam in config.cameras}
        batch.update(
            action=chunks_t[idx].to(ctx.device), action_is_pad=pads_t[idx].to(ctx.device), task=[tasks[i] for i in idx]
        )
        if states_t is not None:
            batch["observation.state"] = states_t[idx].to(ctx.device)
        if targets_t is not None:
            batch["observation.target"] = targets_t[idx].to(ctx.device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(ctx.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss, info = policy(batch)
        loss.backward()
        average_gradients(params, ctx)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        optimizer.step()
        step += 1
        logs = mean_across_ranks({"loss": float(loss.detach()), **info}, ctx)
        logs.update(
            grad_norm=grad_norm, lr=optimizer.param_groups[-1]["lr"], lr_projector=optimizer.param_groups[0]["lr"]
        )
        first_loss = logs["loss"] if first_loss is None else first_loss
        logger.log(step, logs)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if ctx.is_main and config.save_every and step % config.save_every == 0:
            save_checkpoint(out / "checkpoints" / f"step-{step:06d}", {"policy": policy}, optimizer,
                            {"step": step, "world_size": ctx.world_size, "config": asdict(config)}, keep=config.keep_checkpoints)  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - began
    final_loss = dataset_loss(policy, features, chunks_t, pads_t, tasks, config.cameras, ctx.device, states=states_t)
    digests = gather_strings(weights_digest(policy), ctx)
    logger.close()
    result: dict[str, Any] = {"steps": step, "seconds": seconds, "final": logs, "first_loss": first_loss, "frames": frames,
                              "episodes": len(episodes), "rank_digests": digests, "policy": None,
                              "dataset_loss_before": initial_loss, "dataset_loss_after": final_loss}  # fmt: skip
    if ctx.is_main:
        summary = {k: v for k, v in result.items() if k not in ("final", "policy")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "rank_weights_sha256.json").write_text(json.dumps(digests, indent=2) + "\n")
        policy_dir = out / "policy"
        policy.save_pretrained(policy_dir)
        result["policy"] = str(policy_dir)
        if config.eval_episodes > 0:
            result["eval"] = _evaluate(policy_dir, config, out, progress=show)
    return result


def _evaluate(policy_dir: Path, config: VLATrainConfig, out: Path, progress: bool) -> dict:
    """Closed-loop success on held-out tabletop episodes (seeds disjoint from the demonstrations)."""
    from omnistream_sim.policies import VLACheckpointPolicy
    from omnistream_sim.rollout import evaluate_tabletop

    policy = VLACheckpointPolicy(policy_dir)
    results = evaluate_tabletop(
        policy,
        episodes=config.eval_episodes,
        out_dir=out / "eval",
        tasks=config.eval_tasks,
        progress=progress,
        videos=0,
    )
    return {k: results[k] for k in ("success_rate", "episodes") if k in results}
