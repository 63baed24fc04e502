"""VLA finetuning (paper C.4, VLM4VLA recipe): ``omnistream train vla``.

The backbone is frozen, so without augmentation each frame's pooled patch tokens are computed ONCE (progress
bar) and training runs on cached features: the same gradients as running the frozen backbone every step, for a
fraction of the cost. With ``random_shift`` (the recipe's augmentation, on in ``paper``) the frames of every
batch are shifted and go through the backbone at each step. Trained: the projector (its own group, lr 1e-4),
the LLM with its text embeddings, the action query and the action head (lr 2e-5); Adam, warm-up then cosine
(``lr_schedule="constant"``: the recipe's constant rate after the warm-up), gradient clip 1.0, bf16 autocast
where the device supports it. ``batch_size`` is the GLOBAL batch: each rank's micro-batch is
``batch_size / (processes x grad_accum)``. The ranks run on ``distributed.ParallelEngine``: replicated (one
all-reduce per step), or FSDP2 (``fsdp``; the default for multi-process GPU runs): each decoder layer of the LLM
is a unit, the rest of the trained policy (text embeddings, projector, action query, head) the root unit, an
untied LM head (never used by the action query) its own unit; the frozen backbone stays whole on every rank
(features are computed outside the training forward, each rank its own). Sharded runs write sharded checkpoints
and gather the policy into the usual ``policy/`` export. ``data="streamed"`` (the ``paper`` preset) reads frames on demand
and caches the features on disk (``omnistream_train.vla_data``) instead of holding every frame in memory, in
the same batch order. Action statistics are computed from the dataset and saved with the policy
(``normalization.safetensors``) and as ``<out>/action_stats.json``. ``init_vlm`` (``--init-vlm``) starts the
projector and LLM from the VLM stage (``omnistream_train.vlm``) instead of the preset's random LLM.

Datasets (detected from the directory):
* LeRobot v3 (``meta/info.json``), read with ``omnistream_train.lerobot_dataset``;
* CALVIN splits (``lang_annotations/auto_lang_ann.npy`` or ``ep_start_end_ids.npy`` + ``episode_XXXXXXX.npz``;
  cameras ``static`` / ``gripper`` as in ``omnistream_sim.calvin.cameras``); a LeRobot dataset converted from one
  (``calvin_to_lerobot``) gets the same action bounds and units;
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

from .config import apply_overrides, warmup_cosine
from .data import sample_indices
from .distributed import (
    DistributedContext,
    ParallelEngine,
    ParallelOptions,
    gather_strings,
    init_distributed,
    local_state_bytes,
    mean_across_ranks,
    shutdown_distributed,
    state_digest,
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
    # Say loudly (a WARNING block, ``summary.json`` "recipe_warnings") when started without ``init_vlm``.
    require_vlm: bool = False
    # Opt-in to train on a random backbone of a published size (no ``backbone``): refused otherwise, since the
    # run would look like a real one but learn from random features. The debug backbone needs no opt-in.
    random_backbone: bool = False
    # Micro-batches accumulated per optimiser step (``batch_size`` stays the global batch).
    grad_accum: int = 1
    # FSDP2 over the ranks (``--fsdp``): None = on for multi-process GPU runs, off otherwise (replicated).
    fsdp: bool | None = None
    activation_checkpointing: bool = False  # with fsdp: each decoder layer recomputed in the backward pass
    # "cosine": linear warm-up, then cosine down to min_lr_ratio; "constant": linear warm-up, then constant.
    lr_schedule: str = "cosine"
    warmup_epochs: float | None = None  # warm-up in epochs of the dataset (replaces warmup_steps when set)
    # "default": PyTorch's Linear initialisation; "xavier": Xavier-uniform weights and zero biases in the head.
    head_init: str = "default"
    # Random-shift augmentation: pad in pixels of the resized frames, one int for every camera or {camera: pad};
    # 0 = off. On, the frames of each batch are shifted and encoded at every step (no feature cache for training).
    random_shift: Any = 0
    # "memory": every frame's images and features in every process (debug, demo); "streamed": an index in memory,
    # images read on demand by ``loader_workers`` worker processes, features cached on disk in float16 and
    # memory-mapped (omnistream_train.vla_data): host memory that does not grow with the dataset.
    data: str = "memory"
    loader_workers: int = 2
    feature_cache: str | None = None  # streamed features directory (default <out>/feature_cache; reused if valid)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VLATrainConfig:
        presets: dict[str, dict[str, Any]] = {
            # The recipe (paper C.4 Table 13, ../shared/specs/simulators.md, VLM4VLA public code's CALVIN config);
            # Adam lr 2e-5, projector 1e-4, clip 1.0, min_max bounds +-0.65 and chunk 10 are the class defaults
            # and the qwen2.5 policy presets. Not the recipe: FSDP2 on GPUs (fp32 master weights sharded, bf16
            # gathers with fp32 reductions, bf16 autocast) where the paper used DeepSpeed ZeRO-2, see training/README.md.
            "paper": dict(
                policy_preset="qwen2.5-7b", backbone_preset="large",
                batch_size=128, grad_accum=2,  # Table 13: 8 per GPU x 8 GPUs x accumulation 2
                max_steps=None, epochs=5,  # Table 13
                lr_schedule="constant", warmup_epochs=0.25,  # public code: constant after a 0.25-epoch warm-up
                head_init="xavier",  # public code: the action head's Linear layers Xavier-uniform, biases zero
                random_shift={"static": 10, "gripper": 4},  # public code: rgb_pad 10, gripper_pad 4
                data="streamed", loader_workers=4,  # CALVIN ABC's 1 M frames do not fit in host memory
                require_vlm=True,  # paper C.4: the VLA starts from the OmniStream VLM (C.3)
                policy_overrides={
                    # public code: the prompt ends with the instruction (no "?")
                    "prompt_template": "What action should the robotic arm take to {instruction}",
                    # paper C.3: the VLM's image input is unpooled (512 px -> 1024 tokens); 2x2 pooling is for
                    # video frames only, and the VLA sees one image per step
                    "pool": 1,
                },
            ),
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
        config = apply_overrides(cls(**presets[name]), overrides)
        config.validate()
        return config

    def validate(self) -> None:
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.head_init not in ("default", "xavier"):
            raise ValueError(f"head_init must be 'default' or 'xavier', got {self.head_init!r}")
        if self.data not in ("memory", "streamed"):
            raise ValueError(f"data must be 'memory' or 'streamed', got {self.data!r}")
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}")
        pads = self.shift_pads()
        if any(pads.values()) and self.features != "frame":
            raise ValueError(
                "random_shift needs features='frame' (features='stream' encodes each episode once, through the KV cache)"
            )

    def shift_pads(self) -> dict[str, int]:
        """Random-shift pad per training camera (0 = none); a clear error for a malformed ``random_shift``."""
        spec = self.random_shift or 0
        # a pad for a camera this run does not read (the recipe's gripper pad with the static camera) is unused
        pads = (
            {cam: spec.get(cam, 0) for cam in self.cameras}
            if isinstance(spec, dict)
            else dict.fromkeys(self.cameras, spec)
        )
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pads.values()):
            raise ValueError(f"random_shift must be a pad >= 0 in pixels or {{camera: pad}}, got {self.random_shift!r}")
        return pads

    def check_backbone(self) -> None:
        """No ``backbone`` and a published-size backbone preset: refuse unless ``random_backbone`` opts in."""
        if self.backbone or self.random_backbone or self.backbone_preset == "debug":
            return
        raise ValueError(
            f"no --backbone given: this preset would train on the features of a randomly initialised "
            f"'{self.backbone_preset}' ViT; pass --backbone DIR (an OmniStream checkpoint), or --random-backbone "
            "to train on random features on purpose"
        )


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
    from omnistream_sim.calvin.cameras import calvin_key

    from .calvin_to_lerobot import CalvinConversionConfig, calvin_windows

    keys = {cam: calvin_key(cam) for cam in cameras}  # the evaluation's camera names (static, gripper)
    use_language = (root / "lang_annotations" / "auto_lang_ann.npy").is_file()
    windows = calvin_windows(root, CalvinConversionConfig(use_language=use_language, default_task="do the task"))
    episodes = []
    for start, end, text in windows:
        frames = [np.load(root / f"episode_{i:07d}.npz") for i in range(start, end + 1)]
        images = {cam: np.stack([f[key] for f in frames]) for cam, key in keys.items()}
        actions = np.stack([f["rel_actions"].astype(np.float32) for f in frames])
        episodes.append(EpisodeData(images, actions, text))
    return episodes


def _tabletop_episodes(root: Path, cameras: list[str]) -> list[EpisodeData]:
    return [read_tabletop_episode(root / entry["file"], cameras) for entry in tabletop_index(root)]


def tabletop_index(root: Path) -> list[dict[str, Any]]:
    """The episode entries of tabletop demonstrations (``index.json``)."""
    index = json.loads((root / "index.json").read_text())
    if "episodes" not in index:
        raise ValueError(f"{root}/index.json lists no 'episodes' (geometry sequences are not demonstrations)")
    return index["episodes"]


def read_tabletop_episode(path: Path, cameras: list[str], images: bool = True) -> EpisodeData:
    """One tabletop demonstration; without ``images`` the frames are left on disk (the streamed data path)."""
    from omnistream_sim.tabletop.tasks import COLOURS, TASKS

    with np.load(path) as f:
        missing = [c for c in cameras if c not in f.files]
        if missing:
            raise ValueError(f"{path} has no camera {missing}")
        state = f["state"].astype(np.float32) if "state" in f.files else None
        target = None
        if "scene" in f.files:  # scene = red, green, blue block centres (x, y, z)
            colour = list(COLOURS).index(TASKS[str(f["task"])].colour)
            target = f["scene"][:, 3 * colour : 3 * colour + 2].astype(np.float32)
        frames = {c: f[c] for c in cameras} if images else {}
        return EpisodeData(frames, f["actions"].astype(np.float32), str(f["instruction"]), state, target)


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


def action_source(root: str | Path, kind: str) -> str:
    """The format whose actions a dataset holds (for the bounds and the action convention): a LeRobot dataset
    converted from CALVIN's relative actions (``calvin_to_lerobot`` records it in ``meta/info.json``) is
    ``calvin``, like the split it came from; otherwise ``kind``."""
    if kind != "lerobot":
        return kind
    import sys

    info = json.loads((Path(root) / "meta" / "info.json").read_text())
    source = info.get("omnistream") or {}
    if source.get("source") == "calvin":
        return "calvin" if source.get("action_key") == "rel_actions" else kind
    if info.get("robot_type") == "franka_calvin":  # converted before the source was recorded
        print(f"warning: {root} looks converted from CALVIN but does not record which actions; its actions get "
              "the dataset's statistics: convert it again, or --set 'action_bounds=[-0.65,0.65]'", file=sys.stderr)  # fmt: skip
    return kind


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
def _frame_tokens(policy, frames, batch: int) -> list[torch.Tensor]:
    """One camera's frames of one episode, each alone, ``batch`` at a time: float32 (b, n, D) pieces."""
    return [policy.encode_images(frames[s : s + batch]).float().cpu() for s in range(0, len(frames), batch)]


def _streamed_tokens(session, frames) -> list[torch.Tensor]:
    """One camera's frames of one episode through ``session`` (reset first), as perception_node streams them."""
    session.reset()
    out = []
    for frame in frames:
        rgb = np.asarray(frame)
        if rgb.dtype != np.uint8:  # (3, H, W) float in [0, 1]
            rgb = (np.clip(rgb.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
        tokens = session.process(rgb, want_depth=False, want_pose=False).patch_tokens
        out.append(torch.from_numpy(tokens.reshape(1, -1, tokens.shape[-1])))
    return out


def _stream_session(policy, backbone: str | None):
    from omnistream_perception.perception import PerceptionConfig, PerceptionSession

    if backbone is None or not Path(backbone).is_dir():
        raise ValueError("features='stream' needs the backbone as a checkpoint directory (--backbone DIR)")
    # the node's settings for this policy (see omnistream_cli.policies.RosPolicy): resize to the policy's image
    # size, its pooling, float32 tokens, the whole episode in the cache
    return PerceptionSession.from_config(PerceptionConfig(**policy.config.perception_settings(str(backbone))))


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
            out[cam] += _frame_tokens(policy, ep.images[cam], batch)
            bar.update(len(ep.images[cam]))
    bar.close()
    return {cam: torch.cat(v) for cam, v in out.items()}


def streamed_patch_tokens(
    policy, episodes: list[EpisodeData], cameras: list[str], backbone: str | None, progress: bool
) -> dict[str, torch.Tensor]:
    """Pooled patch tokens of every frame, per camera, streamed per episode as perception_node computes them."""
    from tqdm.auto import tqdm

    session = _stream_session(policy, backbone)
    total = sum(len(e.actions) for e in episodes)
    out: dict[str, list[torch.Tensor]] = {cam: [] for cam in cameras}
    bar = tqdm(total=total * len(cameras), desc="streamed features", unit="frame", disable=not progress)
    for ep in episodes:
        for cam in cameras:
            out[cam] += _streamed_tokens(session, ep.images[cam])
            bar.update(len(ep.images[cam]))
    bar.close()
    return {cam: torch.cat(v) for cam, v in out.items()}


def feature_session(policy, config):
    """The streaming session of ``features='stream'`` (None for ``frame``), for ``episode_tokens``."""
    return _stream_session(policy, config.backbone) if config.features == "stream" else None


def episode_tokens(policy, frames, config, session=None) -> torch.Tensor:
    """(T, n, D) float32 tokens of one camera's frames of one episode, as ``frozen_features`` computes them."""
    if session is not None:
        return torch.cat(_streamed_tokens(session, frames))
    return torch.cat(_frame_tokens(policy, frames, config.feature_batch))


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


@torch.no_grad()
def streamed_dataset_loss(policy, batches, device) -> float:
    """``dataset_loss`` over loader batches (the streamed path): every frame once, eval mode."""
    was_training = policy.training
    policy.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = len(batch["task"])
        loss, _ = policy({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        total += float(loss) * n
        count += n
    policy.train(was_training)
    return total / max(1, count)


# ------------------------------------------------------------------------------------------------------
# The recipe's pieces: schedule, head initialisation, random-shift augmentation
# ------------------------------------------------------------------------------------------------------
def lr_multiplier(schedule: str, step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate factor of optimiser step ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    ``cosine`` down to ``min_ratio`` at ``total`` or ``constant`` (the recipe's schedule, VLM4VLA public code)."""
    if schedule == "cosine":
        return warmup_cosine(step, warmup, total, min_ratio)
    if schedule == "constant":
        return (step + 1) / warmup if warmup > 0 and step < warmup else 1.0
    raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {schedule!r}")


def warmup_length(config: VLATrainConfig, frames: int) -> int:
    """Warm-up in optimiser steps: ``warmup_epochs`` of the dataset at the global batch, else ``warmup_steps``."""
    if config.warmup_epochs is None:
        return config.warmup_steps
    return max(1, round(config.warmup_epochs * frames / config.batch_size)) if config.warmup_epochs > 0 else 0


@torch.no_grad()
def xavier_init(module: torch.nn.Module) -> None:
    """Every Linear layer of ``module``: Xavier-uniform weights, zero biases (the recipe's action head init,
    VLM4VLA public code)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                m.bias.zero_()


@torch.no_grad()
def encode_pixels(policy, pixels: torch.Tensor) -> torch.Tensor:
    """Preprocessed frames (B, 3, S, S) -> pooled patch tokens (B, n, D): ``policy.encode_images`` after its
    preprocessing, so an augmentation can act on the resized frames in between."""
    backbone = policy.backbone
    parameter = next(backbone.parameters())
    out = backbone(pixels.unsqueeze(1).to(parameter.device, parameter.dtype), output_hidden_states=False)
    h, w = out.grid_size
    grid = out.last_hidden_state[:, 0].reshape(pixels.shape[0], h, w, -1)
    return policy.processor.pool_patch_tokens(grid)


def shifted_tokens(policy, frames, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Raw frames of one camera -> resized as the policy does, randomly shifted (``augment.random_shift``) and
    encoded by the frozen backbone: the features of an augmented batch, computed at its step."""
    from .augment import random_shift

    return encode_pixels(policy, random_shift(policy.processor.preprocess_images(frames), pad, gen))


class ShiftedFeatures:
    """``shifted_tokens`` of the frames of a batch of the in-memory path: frame ``i`` of the dataset is
    ``episodes[e].images[cam][t]`` for ``(e, t) = self.where[i]``."""

    def __init__(self, policy, episodes: list[EpisodeData], pads: dict[str, int]):
        self.policy, self.episodes, self.pads = policy, episodes, pads
        self.where = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep.actions))]

    def __call__(self, cam: str, idx: list[int], gen: torch.Generator) -> torch.Tensor:
        frames = [np.asarray(self.episodes[e].images[cam][t]) for e, t in (self.where[i] for i in idx)]
        return shifted_tokens(self.policy, np.stack(frames), self.pads[cam], gen)


def run_vla_training(
    config: VLATrainConfig,
    dataset: str | Path,
    out_dir: str | Path,
    resume: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    from tqdm.auto import tqdm

    config.validate()
    config.check_backbone()
    ctx = init_distributed(device)
    try:
        return _train(config, dataset, Path(out_dir), resume, ctx, progress, tqdm)
    finally:
        shutdown_distributed()


def parallel_options(config: VLATrainConfig, device: torch.device) -> ParallelOptions:
    """The engine's options of a VLA config: ``fsdp``, ``grad_accum``, activation checkpointing, and FSDP's
    parameter dtype following the autocast ``precision`` (bf16 gathers where autocast computes in bf16)."""
    precision = "fp32" if _precision(config, device) is None else "bf16"
    return ParallelOptions(config.fsdp, config.grad_accum, precision, config.activation_checkpointing)


def engine_dtype(engine: ParallelEngine, ctx: DistributedContext) -> str:
    """What ``summary.json`` reports as the dtype of the weights in the forward pass under FSDP (float32 else)."""
    return str(engine.options.param_dtype(ctx)).removeprefix("torch.") if engine.fsdp else "float32"


def _recipe_warnings(config: VLATrainConfig) -> list[str]:
    if config.require_vlm and not config.init_vlm:
        return [
            "no --init-vlm: the recipe (paper C.4) starts the VLA from the OmniStream VLM, whose projector and LLM "
            "already tie words to the visual tokens; this run starts from a random projector and a text-only LLM. "
            "Train one with `omnistream train vlm --preset paper ...` and pass --init-vlm <its --out>."
        ]
    return []


def _train(config, dataset, out: Path, resume, ctx: DistributedContext, progress: bool, tqdm) -> dict:
    import sys

    warnings_ = _recipe_warnings(config)
    if warnings_ and ctx.is_main:
        rule = "=" * 100
        print("\n".join([rule, *(f"WARNING: {w}" for w in warnings_), rule]), file=sys.stderr, flush=True)
    engine = ParallelEngine(ctx, parallel_options(config, ctx.device))
    micro = engine.micro_batch(config.batch_size)  # an error before any work if it does not divide
    slots = engine.slots()
    streamed = config.data == "streamed"
    reader = None
    if streamed:
        from . import vla_data

        episodes, reader = vla_data.index_episodes(dataset, config.cameras)  # no images: read on demand
    else:
        episodes = load_episodes(dataset, config.cameras)
    if not episodes:
        raise ValueError(f"{dataset} holds no episodes")
    all_actions = np.concatenate([e.actions for e in episodes])
    if all_actions.ndim != 2 or all_actions.shape[1] != 7:
        raise ValueError(f"actions must be 7-D (6 arm + gripper), got shape {all_actions.shape[1:]}")
    stats = action_statistics(all_actions)
    kind = detect_format(Path(dataset))
    actions_kind = action_source(dataset, kind)
    state_names, states = select_state(config, episodes, kind)
    bounds = resolve_bounds(config, actions_kind)

    def new_policy(device: torch.device):
        built = build_policy(config, stats, device, bounds, state_names, states)
        built.config.action_convention = convention_for_dataset(actions_kind).to_dict()  # the node acts in these
        return built

    policy = new_policy(ctx.device)
    if config.head_init == "xavier":
        xavier_init(policy.action_head)
    states_t = torch.from_numpy(states) if states is not None else None
    targets_t = auxiliary_targets(config, episodes)
    chunk = policy.config.chunk_size
    show = progress and ctx.is_main
    shift_pads = config.shift_pads()
    augment = any(shift_pads.values())
    if streamed:
        cache_dir = Path(config.feature_cache) if config.feature_cache else out / "feature_cache"
        features = vla_data.cache_features_on_disk(policy, episodes, reader, config, cache_dir, ctx, show)
        index = vla_data.FrameIndex.of(episodes, states, targets_t)
        frames = len(index)
        tasks = None
    else:
        features = frozen_features(policy, episodes, config, show)
        shifted = ShiftedFeatures(policy, episodes, shift_pads) if augment else None
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
        max_steps = max(1, int(config.epochs * frames / config.batch_size))
    if not max_steps:
        raise ValueError("set max_steps or epochs")
    warmup = warmup_length(config, frames)

    def whole_dataset_loss() -> float:
        # every rank runs every batch (the same calls: under FSDP each is a collective), then frees the gathers;
        # under FSDP with bf16 gathers in the training's autocast (full-precision inputs meet bf16 weights)
        dtype = _precision(config, ctx.device)
        with torch.autocast(ctx.device.type, dtype=dtype or torch.float32, enabled=engine.fsdp and dtype is not None):
            if not streamed:
                loss = dataset_loss(
                    policy, features, chunks_t, pads_t, tasks, config.cameras, ctx.device, states=states_t
                )
            else:
                every = vla_data.TrainFrames(index, list(config.cameras), chunk, features=features, targets=False)
                batches = vla_data.loader(every, vla_data.sequential_batches(frames, 64), config.loader_workers)
                loss = streamed_dataset_loss(policy, batches, ctx.device)
        engine.after_step(policy)
        return loss

    policy.train()
    # the frozen backbone stays whole on every rank: features are computed outside the training forward
    frozen = (policy.backbone,) if policy.backbone is not None else ()
    engine.prepare(policy, keep_whole=frozen, cast_inputs=False)  # rank 0's weights everywhere; FSDP2 shards
    groups = policy.parameter_groups()  # after prepare: the shards under FSDP
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    step = 0
    if resume:
        step = int(engine.load(resume, {"policy": policy}, optimizer)["step"])
    autocast_dtype = _precision(config, ctx.device)
    initial_loss = whole_dataset_loss()
    logger = MetricsLogger(out, enabled=ctx.is_main, resume_step=step if resume else None)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "vla_train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        stats_json = {k: np.asarray(v).tolist() for k, v in stats.items()}
        (out / "action_stats.json").write_text(json.dumps({"action": stats_json}, indent=2) + "\n")

    if streamed:  # loader workers read this rank's micro-batches, in step order, ahead of the training loop
        source = vla_data.TrainFrames(index, list(config.cameras), chunk, features=None if augment else features,
                                      reader=reader if augment else None)  # fmt: skip
        sampler = vla_data.StepBatches(frames, step, max_steps, ctx, config.grad_accum, micro, config.seed)
        loaded = iter(vla_data.loader(source, sampler, config.loader_workers))

    def micro_step_batch(idx: list[int], gen: torch.Generator | None) -> dict[str, Any]:
        if streamed:
            batch = next(loaded)
            for cam in config.cameras:
                raw = batch.pop(f"frame.{cam}", None)
                if raw is not None:
                    batch[batch_key(cam)] = shifted_tokens(policy, raw, shift_pads[cam], gen)
            return {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if shifted is not None:
            batch = {batch_key(cam): shifted(cam, idx, gen).to(ctx.device) for cam in config.cameras}
        else:
            batch = {batch_key(cam): features[cam][idx].to(ctx.device) for cam in config.cameras}
        batch.update(
            action=chunks_t[idx].to(ctx.device), action_is_pad=pads_t[idx].to(ctx.device), task=[tasks[i] for i in idx]
        )
        if states_t is not None:
            batch["observation.state"] = states_t[idx].to(ctx.device)
        if targets_t is not None:
            batch["observation.target"] = targets_t[idx].to(ctx.device)
        return batch

    bar = tqdm(total=max_steps, initial=step, desc="vla", disable=not show)
    began = time.perf_counter()
    first_loss, logs = None, {}
    while step < max_steps:
        scale = lr_multiplier(config.lr_schedule, step, warmup, max_steps, config.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * scale
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for m in range(config.grad_accum):
            # slices of the global batch, rank-major (distributed.data_slot): 1 process x accumulation 2 reads
            # what 2 processes read; one augmentation stream per (seed, step, slice)
            slot = engine.slot(m)
            idx = sample_indices(frames, step, slot, slots, micro, config.seed, 0) if not streamed else []
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1009 + slot) if augment else None
            batch = micro_step_batch(idx, gen)
            with torch.autocast(
                ctx.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            ):
                loss, info = policy(batch)
            engine.backward(loss / config.grad_accum if config.grad_accum > 1 else loss, policy)
            for key, value in {"loss": float(loss.detach()), **info}.items():
                sums[key] = sums.get(key, 0.0) + value / config.grad_accum
        grad_norm = engine.finish_gradients(params, config.grad_clip)  # mean over ranks, then the clip
        optimizer.step()
        engine.after_step(policy)
        step += 1
        logs = mean_across_ranks(sums, ctx)
        if grad_norm is not None:
            logs["grad_norm"] = grad_norm
        logs.update(lr=optimizer.param_groups[-1]["lr"], lr_projector=optimizer.param_groups[0]["lr"])
        first_loss = logs["loss"] if first_loss is None else first_loss
        logger.log(step, logs)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if config.save_every and step % config.save_every == 0:  # a collective under FSDP: every rank writes
            engine.save(out / "checkpoints" / f"step-{step:06d}", {"policy": policy}, optimizer,
                        {"step": step, "config": asdict(config)}, keep=config.keep_checkpoints)  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - began
    if streamed:
        loaded = None  # ends the training loader's workers before the loss pass starts its own
    final_loss = whole_dataset_loss()
    state = local_state_bytes([policy], optimizer, exclude=frozen)
    state_bytes = [json.loads(b) for b in gather_strings(json.dumps(state), ctx)]
    whole_bytes = sum(p.numel() * p.element_size() for m in frozen for p in m.parameters())
    if engine.fsdp:
        # the whole weights exist once gathered (a collective), on rank 0: its fingerprint stands for every rank
        gathered = engine.full_state_dict(policy)
        export = new_policy(torch.device("cpu")) if ctx.is_main else None
        if export is not None:
            export.load_state_dict(gathered)
        del gathered
        digests = [state_digest(export.state_dict())] if export is not None else []
    else:
        export = policy
        digests = gather_strings(weights_digest(policy), ctx)  # every replica's, to show they never drifted
    logger.close()
    result: dict[str, Any] = {"steps": step, "seconds": seconds, "final": logs, "first_loss": first_loss, "frames": frames,
                              "episodes": len(episodes), "rank_digests": digests, "policy": None,
                              "dataset_loss_before": initial_loss, "dataset_loss_after": final_loss,
                              "global_batch": config.batch_size, "micro_batch": micro, "grad_accum": config.grad_accum,
                              "warmup_steps": warmup, "lr_schedule": config.lr_schedule, "data": config.data,
                              "init_vlm": config.init_vlm, "recipe_warnings": warnings_, "world_size": ctx.world_size,
                              "fsdp": engine.fsdp, "param_dtype": engine_dtype(engine, ctx),
                              "per_rank_state_bytes": [b["total"] for b in state_bytes],
                              "per_rank_state_bytes_detail": state_bytes,
                              "frozen_backbone_bytes_per_rank": whole_bytes}  # fmt: skip
    if ctx.is_main:
        summary = {k: v for k, v in result.items() if k not in ("final", "policy")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "rank_weights_sha256.json").write_text(json.dumps(digests, indent=2) + "\n")
        policy_dir = out / "policy"
        export.save_pretrained(policy_dir)  # consolidated safetensors whatever the sharding
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
