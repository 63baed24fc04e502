"""The OmniStream VLA policy (VLM4VLA recipe), rclpy-free, in LeRobot's policy shape.

    frozen OmniStream backbone -> per frame 2x2 average-pooled patch tokens -> MLP projector -> visual embeddings
    prompt ids -> Qwen2 text embeddings;  [prompt | visual | prompt with instruction | action query] -> Qwen2 (base
    model, no LM head) -> last hidden state at the action query -> MLP action head -> arm (tanh, 6) + gripper
    logit (1) for a chunk of N steps.

Observation / batch keys (one frame per sample, no history, as in the recipe). For each camera ``cam`` of
``config.cameras`` exactly one of (checked in this order):

* ``observation.features.<cam>``:     (B, n, D_v) float, already pooled patch tokens (n = config.tokens_per_camera
                                        for the configured image size; any n works)
* ``observation.patch_tokens.<cam>``: (B, h, w, D_v) float, the backbone's patch grid of the frame (what
                                        StreamFeatures carries); pooled here
* ``observation.images.<cam>``:       (B, 3, H, W) float in [0, 1] or uint8 (B, H, W, 3); the policy runs the
                                        frozen backbone itself (loaded from ``config.backbone``)

and ``task`` (list of B strings; ``instruction`` is accepted too); a policy with ``config.state_names`` also
needs ``observation.state``: (B, len(state_names)) float in raw units (normalised inside with saved statistics). Training batches (``forward``) add
``action``: (B, chunk_size, 7) float in the DATASET's units (arm dims normalised here with the saved statistics;
gripper +1 open / -1 close) and optionally ``action_is_pad``: (B, chunk_size) bool (steps past an episode's end,
left out of the loss). Optimiser groups for finetuning: ``policy.parameter_groups()`` (projector lr 1e-4, the
rest 2e-5; the backbone is frozen and not in any group).

Outputs (``predict_action_chunk``/``select_action``) are in the dataset's units: arm unnormalised with the saved
statistics, gripper exactly +1 or -1. Environment conventions are converted by the caller
(``omnistream_sim.conventions``), never here.
"""

from __future__ import annotations

import collections
import contextlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from omnistream_perception.features_codec import batch_key

from ..normalization import ActionNormalizer
from .configuration_omnistream_vla import OmniStreamVLAConfig
from .processor_omnistream_vla import OmniStreamVLAProcessor, load_tokenizer

WEIGHTS_FILE = "policy.safetensors"
LLM_DIR = "llm"
BACKBONE_DIR = "backbone"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ActionHead(nn.Module):
    """Linear(D, D/2), ReLU, Linear(D/2, trunk) -> arm branch (tanh) and gripper branch (logits)."""

    def __init__(self, config: OmniStreamVLAConfig, llm_hidden: int) -> None:
        super().__init__()
        self.chunk_size = config.chunk_size
        self.arm_dims = config.arm_dims
        self.gripper_dims = config.gripper_dims
        self.trunk = nn.Sequential(
            nn.Linear(llm_hidden, llm_hidden // 2), nn.ReLU(), nn.Linear(llm_hidden // 2, config.head_trunk_dim)
        )
        branch = [config.head_trunk_dim, *config.head_branch_dims]
        self.arm = _mlp([*branch, config.chunk_size * config.arm_dims])
        self.gripper = _mlp([*branch, config.chunk_size * config.gripper_dims])

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.trunk(hidden)
        arm = torch.tanh(self.arm(x)).view(-1, self.chunk_size, self.arm_dims)
        gripper_logits = self.gripper(x).view(-1, self.chunk_size, self.gripper_dims)
        return arm, gripper_logits


class VisualProjector(nn.Module):
    """Backbone width -> LLM width (two layers with GELU, as in LLaVA-style VLMs)."""

    def __init__(self, vision_hidden: int, llm_hidden: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or llm_hidden
        self.net = nn.Sequential(nn.Linear(vision_hidden, hidden), nn.GELU(), nn.Linear(hidden, llm_hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VisualPositions(nn.Module):
    """Absolute position of each visual token: sin-cos features of its patch-centre coordinates in [0, 1] (any
    square grid: a 6x6 wrist grid and an 8x8 static one share the same encoding) plus the camera's one-hot,
    through a Linear to the LLM width. A token row that is not a square grid is treated as one row."""

    FREQUENCIES = 6

    def __init__(self, cameras: int, llm_hidden: int) -> None:
        super().__init__()
        self.cameras = cameras
        self.proj = nn.Linear(4 * self.FREQUENCIES + cameras, llm_hidden)

    def forward(self, n: int, camera: int) -> torch.Tensor:
        device = self.proj.weight.device
        side = int(round(n**0.5))
        h, w = (side, side) if side * side == n else (1, n)
        ys = (torch.arange(h, device=device) + 0.5) / h
        xs = (torch.arange(w, device=device) + 0.5) / w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)  # (n, 2) row-major
        angles = coords[:, :, None] * (math.pi * 2.0 ** torch.arange(self.FREQUENCIES, device=device))
        feats = torch.cat([angles.sin().flatten(1), angles.cos().flatten(1)], -1)
        onehot = F.one_hot(torch.full((n,), camera, device=device), self.cameras).float()
        return self.proj(torch.cat([feats, onehot], -1))


class StateEncoder(nn.Module):
    """Robot state -> one LLM token: (x - mean) / std with the dataset's statistics (buffers, saved with the
    policy), then a two-layer MLP. Normalising inside keeps raw units at every caller (sim harness, vla_node)."""

    def __init__(self, state_dims: int, llm_hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(state_dims))
        self.register_buffer("std", torch.ones(state_dims))
        self.net = nn.Sequential(nn.Linear(state_dims, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))

    @torch.no_grad()
    def set_statistics(self, mean, std) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(
                f"state statistics must have {self.mean.numel()} entries, got {mean.numel()}/{std.numel()}"
            )
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-3))  # near-constant entries (a joint that barely moves) stay finite

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net((state - self.mean) / self.std)


def build_llm(config: OmniStreamVLAConfig, directory: str | Path | None = None, random_weights: bool = False):
    """The Qwen2ForCausalLM of the policy: tiny random (debug), saved weights, or a Qwen2.5 hub id/directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = _DTYPES[config.llm_dtype]
    if config.llm == "debug" or random_weights:
        llm_config = Qwen2Config(**config.llm_config)
        llm_config._attn_implementation = "sdpa"
        # Built in its dtype (not cast afterwards): the rotary inv_freq stays float32, as from_pretrained keeps
        # it, so a saved and reloaded policy computes exactly the same actions.
        return Qwen2ForCausalLM._from_config(llm_config, dtype=dtype)
    source = Path(directory) / LLM_DIR if config.llm == "weights" else config.llm
    if config.llm == "weights" and not Path(source).is_dir():
        raise FileNotFoundError(f"the policy's LLM weights are missing: {source}")
    return Qwen2ForCausalLM.from_pretrained(str(source), dtype=dtype, attn_implementation="sdpa")


@dataclass
class _StepPlan:
    """What stays the same across the control steps of one instruction, for one sample without gradients.

    The prompt text before the first image (the system turn; with ``instruction_first`` the instruction too)
    attends to nothing that changes, so its K/V, computed once by the LLM itself, serve every step as
    ``past_key_values``; a step feeds only the images, the text after them, the state and the action query. The
    positions, the attention mask, the constant embeddings and the visual position codes are built once here.
    ``key`` names what the plan was built from; ``weights`` the identity, version and storage of every parameter
    it depends on, read through ``slots`` (an optimiser step, a load, a move to another device change them, and
    the plan is rebuilt; ``train()``/``eval()`` drop it, e.g. after replacing a submodule)."""

    key: tuple
    slots: list[tuple[dict, str]]  # (a module's _parameters, name): where each parameter is looked up
    held: list[torch.Tensor]  # the parameters the plan was built with, kept alive so that their ids stay theirs
    weights: tuple
    cache: Any  # transformers Cache holding the prefix K/V; each step's tokens are cropped off again
    prefix_len: int
    step_len: int
    positions: torch.Tensor  # (1, step_len) absolute positions of the step's tokens
    mask: torch.Tensor | None  # the 4D mask of the step's tokens over prefix + step (None: transformers' own)
    separator: torch.Tensor | None  # between two cameras
    suffix: torch.Tensor | None  # the instruction text after the images (instruction_first=False)
    query: torch.Tensor  # (1, H)
    visual_offsets: list[torch.Tensor | None]  # per camera, the visual position codes (visual_positions)

    @staticmethod
    def weights_of(slots: list[tuple[dict, str]]) -> tuple:
        return tuple((id(p), p._version, p.data_ptr()) for p in (params[name] for params, name in slots))


class OmniStreamVLAPolicy(nn.Module):
    name = "omnistream_vla"

    def __init__(
        self,
        config: OmniStreamVLAConfig,
        llm: nn.Module | None = None,
        tokenizer=None,
        normalizer: ActionNormalizer | None = None,
        backbone: nn.Module | None = None,
        directory: str | Path | None = None,
        target_head: bool = True,
    ) -> None:
        """``target_head=False`` leaves out the training-only head of ``config.target_dims`` (it is not saved:
        a loaded policy acts without it)."""
        super().__init__()
        self.config = config
        self.directory = Path(directory) if directory is not None else None
        self.llm = llm if llm is not None else build_llm(config, directory)
        llm_hidden = self.llm.config.hidden_size
        self.processor = OmniStreamVLAProcessor(
            config, tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer, directory)
        )
        vocab = self.llm.get_input_embeddings().num_embeddings
        if self.processor.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {self.processor.vocab_size} ids but the LLM only {vocab} embeddings")
        self.projector = VisualProjector(config.vision_hidden_size, llm_hidden, config.projector_hidden_size)
        # Appended last to every prompt; initialised to zeros as in the recipe.
        self.action_query = nn.Parameter(torch.zeros(llm_hidden))
        self.action_head = ActionHead(config, llm_hidden)
        self.state_encoder = StateEncoder(config.state_dims, llm_hidden) if config.state_dims else None
        self.visual_positions = VisualPositions(len(config.cameras), llm_hidden) if config.visual_positions else None
        self.target_head = nn.Linear(llm_hidden, config.target_dims) if config.target_dims and target_head else None
        self.normalizer = normalizer or ActionNormalizer.identity(config.arm_dims)
        if backbone is not None:
            self.set_backbone(backbone)
        else:
            self.backbone = None
        self._queue: collections.deque[torch.Tensor] = collections.deque()
        # Inference of one sample (predict_action_chunk / select_action) reuses, across the control steps of one
        # instruction, the K/V of the prompt text that comes before the images (see _StepPlan). The actions equal
        # the full pass to float rounding (~1e-7 in float32), not bit for bit. False: the full pass at every step
        # (and no inference mode), as before; the benchmark's reference.
        self.use_prefix_cache = True
        self._step_plan: _StepPlan | None = None

    # ------------------------------------------------------------------------------------------------------
    # Construction, saving, loading
    @classmethod
    def from_config(cls, config: OmniStreamVLAConfig, **kwargs: Any) -> OmniStreamVLAPolicy:
        return cls(config, **kwargs)

    def save_pretrained(self, directory: str | Path, save_llm: bool = True) -> None:
        """config.json, policy.safetensors (projector, query, head), normalization.safetensors, tokenizer.json,
        and ``llm/`` (safetensors) unless ``save_llm=False`` with a hub id/directory reference."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config = OmniStreamVLAConfig.from_dict(self.config.to_dict())
        if save_llm or config.llm in ("debug", "weights"):
            self.llm.save_pretrained(str(out / LLM_DIR), safe_serialization=True)
            config.llm = "weights"
        config.tokenizer = "saved"
        # The backbone travels with the policy when it is part of it (loaded, or a copy in the source directory);
        # a hub id or an outside directory stays a reference.
        local_copy = self.directory / config.backbone if self.directory and config.backbone else None
        target = out / BACKBONE_DIR
        if local_copy is not None and local_copy.is_dir():
            if local_copy.resolve() != target.resolve():
                shutil.copytree(local_copy, target, dirs_exist_ok=True)
            config.backbone = BACKBONE_DIR
        elif self.backbone is not None:
            self.backbone.save_pretrained(target)
            config.backbone = BACKBONE_DIR
        config.normalization_mode = self.normalizer.mode
        config.save(out)
        self.processor.save(out)
        self.normalizer.save(out)
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        state.update({f"action_head.{k}": v for k, v in self.action_head.state_dict().items()})
        if self.state_encoder is not None:
            state.update({f"state_encoder.{k}": v for k, v in self.state_encoder.state_dict().items()})
        if self.visual_positions is not None:
            state.update({f"visual_positions.{k}": v for k, v in self.visual_positions.state_dict().items()})
        state["action_query"] = self.action_query.detach()
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(out / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> OmniStreamVLAPolicy:
        """Loads what ``save_pretrained`` wrote, for acting (no training-only target head). The backbone is loaded
        lazily, on the first raw image."""
        directory = Path(directory)
        config = OmniStreamVLAConfig.load(directory)
        normalizer = ActionNormalizer.load(directory) if (directory / "normalization.safetensors").is_file() else None
        policy = cls(config, normalizer=normalizer, directory=directory, target_head=False)
        weights_path = directory / WEIGHTS_FILE
        if not weights_path.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}")
        state = load_file(str(weights_path))
        policy.action_query.data.copy_(state.pop("action_query"))
        projector = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
        head = {k.removeprefix("action_head."): v for k, v in state.items() if k.startswith("action_head.")}
        policy.projector.load_state_dict(projector)
        if policy.visual_positions is not None:
            positions = {
                k.removeprefix("visual_positions."): v for k, v in state.items() if k.startswith("visual_positions.")
            }
            policy.visual_positions.load_state_dict(positions)
        if policy.state_encoder is not None:
            encoder = {k.removeprefix("state_encoder."): v for k, v in state.items() if k.startswith("state_encoder.")}
            if not encoder:
                raise ValueError(f"{weights_path} has no state_encoder weights but config.state_names is set")
            policy.state_encoder.load_state_dict(encoder)
        policy.action_head.load_state_dict(head)
        return policy.to(device).eval()

    def backbone_source(self) -> str | None:
        """Where the backbone comes from: a directory (relative to the policy directory) or a hub id."""
        source = self.config.backbone
        if source is None:
            return None
        if self.directory is not None and (self.directory / source).is_dir():
            return str(self.directory / source)
        return source

    def set_backbone(self, backbone: nn.Module) -> None:
        """Attaches a frozen backbone (used for raw images)."""
        if backbone.config.hidden_size != self.config.vision_hidden_size:
            raise ValueError(
                f"the backbone's width {backbone.config.hidden_size} != config.vision_hidden_size "
                f"{self.config.vision_hidden_size}"
            )
        backbone.requires_grad_(False)
        backbone.eval()
        self.backbone = backbone

    def _ensure_backbone(self) -> nn.Module:
        if self.backbone is None:
            source = self.backbone_source()
            if source is None:
                raise ValueError("raw images need a backbone, but config.backbone is None; pass features instead")
            from omnistream_perception.model import OmniStreamModel

            self.set_backbone(OmniStreamModel.from_pretrained(source, device=self.action_query.device))
        return self.backbone

    def train(self, mode: bool = True) -> OmniStreamVLAPolicy:
        super().train(mode)
        self._step_plan = None
        if self.backbone is not None:
            self.backbone.eval()  # frozen: no dropout/statistics updates, whatever the policy's mode
        return self

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups of the recipe: projector at ``config.projector_lr``; LLM (with text embeddings),
        action query and head at ``config.lr``. The frozen backbone is in none."""
        projector = [p for p in self.projector.parameters() if p.requires_grad]
        for extra in (self.state_encoder, self.visual_positions):  # projectors too (-> LLM width): their rate
            if extra is not None:
                projector += [p for p in extra.parameters() if p.requires_grad]
        heads = [m for m in (self.llm, self.action_head, self.target_head) if m is not None]
        rest = [p for m in heads for p in m.parameters() if p.requires_grad]
        rest.append(self.action_query)
        return [
            {"params": projector, "lr": self.config.projector_lr, "name": "projector"},
            {"params": rest, "lr": self.config.lr, "name": "llm_and_head"},
        ]

    # ------------------------------------------------------------------------------------------------------
    # The network
    @staticmethod
    def instructions_of(batch: dict[str, Any]) -> list[str]:
        task = batch.get("task", batch.get("instruction"))
        if task is None:
            raise ValueError("the observation needs 'task' (list of instructions, one per sample)")
        return [task] if isinstance(task, str) else list(task)

    def visual_features(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """One (B, n, D_v) float tensor of pooled patch tokens per camera (see the module doc for the keys)."""
        device = self.action_query.device
        per_camera = []
        for cam in self.config.cameras:
            if batch_key(cam) in batch:
                tokens = torch.as_tensor(batch[batch_key(cam)]).to(device, torch.float32)
                if tokens.ndim != 3 or tokens.shape[-1] != self.config.vision_hidden_size:
                    raise ValueError(
                        f"observation.features.{cam} must be (B, n, {self.config.vision_hidden_size}), "
                        f"got {tuple(tokens.shape)}"
                    )
            elif batch_key(cam, pooled=False) in batch:
                grid = torch.as_tensor(batch[batch_key(cam, pooled=False)]).to(device, torch.float32)
                tokens = self.processor.pool_patch_tokens(grid)
            elif f"observation.images.{cam}" in batch:
                tokens = self.encode_images(batch[f"observation.images.{cam}"])
            else:
                raise ValueError(
                    f"camera {cam!r}: the observation needs observation.features.{cam}, "
                    f"observation.patch_tokens.{cam} or observation.images.{cam}"
                )
            per_camera.append(tokens)
        return per_camera

    def state_of(self, batch: dict[str, Any], batch_size: int) -> torch.Tensor | None:
        """(B, state_dims) float from ``observation.state`` (None when the policy takes no state)."""
        if self.state_encoder is None:
            return None
        if "observation.state" not in batch:
            raise ValueError(
                f"this policy reads the robot state {list(self.config.state_names)}: the observation needs "
                "'observation.state' (B, state_dims)"
            )
        # Checked where the state comes from (the CPU, for a robot) before it moves: no wait on the GPU here.
        state = torch.as_tensor(batch["observation.state"]).to(torch.float32)
        if state.ndim == 1:
            state = state[None]
        if tuple(state.shape) != (batch_size, self.config.state_dims):
            raise ValueError(
                f"observation.state must be ({batch_size}, {self.config.state_dims}) "
                f"({', '.join(self.config.state_names)}), got {tuple(state.shape)}"
            )
        if not torch.isfinite(state).all():
            raise ValueError("observation.state holds NaN or inf")
        return state.to(self.action_query.device)

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """Raw images -> frozen backbone (one frame, no history) -> pooled patch tokens (B, n, D_v)."""
        backbone = self._ensure_backbone()
        pixels = self.processor.preprocess_images(images).to(self.action_query.device)
        out = backbone(pixels.unsqueeze(1).to(next(backbone.parameters()).dtype), output_hidden_states=False)
        h, w = out.grid_size
        grid = out.last_hidden_state[:, 0].reshape(pixels.shape[0], h, w, -1)
        return self.processor.pool_patch_tokens(grid)

    def project_visual(self, visual: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per camera (B, n, D_v) pooled tokens -> (B, n, H) LLM embeddings: the projector plus, with
        ``config.visual_positions``, where each token sits (shared with the VLM stage, omnistream_train.vlm)."""
        projected = [self.projector(v) for v in visual]
        if self.visual_positions is not None:
            projected = [t + self.visual_positions(t.shape[1], c).to(t.dtype) for c, t in enumerate(projected)]
        return projected

    def build_inputs(
        self, visual: list[torch.Tensor], instructions: list[str], state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[prefix | cam0 | sep | cam1 ... | suffix(instruction) | (state) | action query], LEFT-padded
        ([prefix | suffix(instruction) | cam0 | sep | cam1 ... | (state) | action query] with
        ``config.instruction_first``).

        Position ids come from the attention mask (first real token = 0), so every real token, the action
        query included, sees exactly what it would see alone: the action does not depend on padding.
        """
        batch_size = visual[0].shape[0]
        if len(instructions) != batch_size:
            raise ValueError(f"{len(instructions)} instructions for a batch of {batch_size}")
        embed = self.llm.get_input_embeddings()
        device, dtype = embed.weight.device, embed.weight.dtype
        projected = [t.to(dtype) for t in self.project_visual(visual)]
        query = self.action_query.to(dtype).view(1, -1)
        state_tokens = self.state_encoder(state).to(dtype) if state is not None else None

        def ids_embedding(ids: tuple[int, ...]) -> torch.Tensor:
            return embed(torch.tensor(ids, dtype=torch.long, device=device))

        prompts = [self.processor.encode_instruction(text) for text in instructions]
        # Shared pieces embedded once per batch.
        prefix = ids_embedding(prompts[0].prefix)
        separator = ids_embedding(prompts[0].camera_separator) if len(projected) > 1 else None
        sequences = []
        for i, prompt in enumerate(prompts):
            instruction = ids_embedding(prompt.suffix)
            parts = [prefix, instruction] if self.config.instruction_first else [prefix]
            for c, cam_tokens in enumerate(projected):
                if c:
                    parts.append(separator)
                parts.append(cam_tokens[i])
            if not self.config.instruction_first:
                parts.append(instruction)
            if state_tokens is not None:
                parts.append(state_tokens[i : i + 1])
            parts.append(query)
            sequences.append(torch.cat(parts, dim=0))
        length = max(s.shape[0] for s in sequences)
        width = sequences[0].shape[-1]
        inputs = torch.zeros(batch_size, length, width, device=device, dtype=dtype)
        mask = torch.zeros(batch_size, length, device=device, dtype=torch.long)
        for i, seq in enumerate(sequences):
            inputs[i, length - seq.shape[0] :] = seq
            mask[i, length - seq.shape[0] :] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        return inputs, mask, position_ids

    def query_hidden_state(self, batch: dict[str, Any], reuse_prefix: bool = False) -> torch.Tensor:
        """The LLM's last hidden state at the action query, (B, H) float. With ``reuse_prefix`` (and
        ``use_prefix_cache``), one sample in eval mode without gradients reuses the prompt prefix's K/V across
        calls (``_StepPlan``); otherwise the whole sequence goes through the LLM (always in ``forward``: every
        rank of a sharded run must run the same LLM calls, whatever its batch)."""
        visual = self.visual_features(batch)
        state = self.state_of(batch, visual[0].shape[0])
        instructions = self.instructions_of(batch)
        if (
            reuse_prefix
            and self.use_prefix_cache
            and len(instructions) == 1
            and visual[0].shape[0] == 1
            and not self.training
            and not torch.is_grad_enabled()
            and not getattr(self.llm.model, "has_sliding_layers", False)
        ):
            return self._query_hidden_state_reusing_prefix(visual, instructions[0], state)
        inputs, mask, position_ids = self.build_inputs(visual, instructions, state)
        out = self.llm.model(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state[:, -1].float()  # the action query is last in every row (left padding)

    def _step_plan_for(self, instruction: str, visual: list[torch.Tensor], with_state: bool) -> _StepPlan:
        key = (instruction, tuple(v.shape[1] for v in visual), with_state, self.llm)
        plan = self._step_plan
        if plan is not None and plan.key == key and _StepPlan.weights_of(plan.slots) == plan.weights:
            return plan
        from transformers.masking_utils import create_causal_mask

        self._step_plan = None
        embed = self.llm.get_input_embeddings()
        device, dtype = embed.weight.device, embed.weight.dtype
        prompt = self.processor.encode_instruction(instruction)
        first = self.config.instruction_first
        prefix_ids = prompt.prefix + prompt.suffix if first else prompt.prefix

        def ids_embedding(ids: tuple[int, ...]) -> torch.Tensor:
            return embed(torch.tensor(ids, dtype=torch.long, device=device))

        prefix_len = len(prefix_ids)
        out = self.llm.model(
            inputs_embeds=ids_embedding(prefix_ids)[None],
            position_ids=torch.arange(prefix_len, device=device)[None],
            use_cache=True,
        )
        cache = out.past_key_values
        suffix = None if first else ids_embedding(prompt.suffix)
        separator = ids_embedding(prompt.camera_separator) if len(visual) > 1 else None
        step_len = (
            sum(v.shape[1] for v in visual)
            + (len(visual) - 1) * len(prompt.camera_separator)
            + (0 if first else len(prompt.suffix))
            + int(with_state)
            + 1
        )
        positions = torch.arange(prefix_len, prefix_len + step_len, device=device)[None]
        # transformers' own mask for these tokens over the cached prefix, in its attention implementation's form
        mask = create_causal_mask(
            config=self.llm.config,
            inputs_embeds=torch.empty(1, step_len, embed.embedding_dim, device=device, dtype=dtype),
            attention_mask=None,
            past_key_values=cache,
            position_ids=positions,
        )
        offsets: list[torch.Tensor | None] = [None] * len(visual)
        if self.visual_positions is not None:
            offsets = [self.visual_positions(v.shape[1], c) for c, v in enumerate(visual)]
        owners = [self.llm] + ([self.visual_positions] if self.visual_positions is not None else [])
        modules = [m for owner in owners for m in owner.modules()]
        slots = [(m._parameters, name) for m in modules for name, p in m._parameters.items() if p is not None]
        slots.append((self._parameters, "action_query"))
        plan = _StepPlan(
            key=key,
            slots=slots,
            held=[params[name] for params, name in slots],
            weights=_StepPlan.weights_of(slots),
            cache=cache,
            prefix_len=prefix_len,
            step_len=step_len,
            positions=positions,
            mask=mask,
            separator=separator,
            suffix=suffix,
            query=self.action_query.to(dtype).view(1, -1),
            visual_offsets=offsets,
        )
        self._step_plan = plan
        return plan

    def _query_hidden_state_reusing_prefix(
        self, visual: list[torch.Tensor], instruction: str, state: torch.Tensor | None
    ) -> torch.Tensor:
        """``query_hidden_state`` of one sample, the prompt prefix's K/V taken from the plan: the same tokens,
        positions and attention as ``build_inputs`` + the full pass, so the same action to float rounding."""
        plan = self._step_plan_for(instruction, visual, state is not None)
        dtype = plan.query.dtype
        parts = []
        for c, tokens in enumerate(visual):
            projected = self.projector(tokens[0])
            if plan.visual_offsets[c] is not None:
                projected = projected + plan.visual_offsets[c].to(projected.dtype)
            if c:
                parts.append(plan.separator)
            parts.append(projected.to(dtype))
        if plan.suffix is not None:
            parts.append(plan.suffix)
        if state is not None:
            parts.append(self.state_encoder(state).to(dtype))
        parts.append(plan.query)
        inputs = torch.cat(parts)[None]
        try:
            out = self.llm.model(
                inputs_embeds=inputs,
                attention_mask=plan.mask,
                position_ids=plan.positions,
                past_key_values=plan.cache,
                use_cache=True,
            )
        except BaseException:
            self._step_plan = None  # the cache may hold part of this step
            raise
        plan.cache.crop(-plan.step_len)  # back to the prefix alone (the forward appended this step's K/V)
        return out.last_hidden_state[:, -1].float()

    def predict_normalized(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(arm in [-1, 1] (B, chunk, 6), gripper logits (B, chunk, 1)) for acting (the prompt prefix's K/V
        reused when ``query_hidden_state`` may)."""
        return self.action_head(self.query_hidden_state(batch, reuse_prefix=True))

    # ------------------------------------------------------------------------------------------------------
    # LeRobot's policy interface
    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss: Huber(delta) on the normalised arm dims + gripper_loss_weight x BCE on the gripper
        (+ target_loss_weight x MSE of the auxiliary target when the batch has ``observation.target``)."""
        if "action" not in batch:
            raise ValueError("a training batch needs 'action' (B, chunk_size, 7) in the dataset's units")
        hidden = self.query_hidden_state(batch)
        arm_pred, gripper_logits = self.action_head(hidden)
        action = torch.as_tensor(batch["action"]).to(arm_pred.device, torch.float32)
        expected = (arm_pred.shape[0], self.config.chunk_size, self.config.action_dims)
        if tuple(action.shape) != expected:
            raise ValueError(f"'action' must be {expected} (batch, chunk_size, arm+gripper), got {tuple(action.shape)}")
        target = self.normalizer.normalize(action)
        arm_target = target[..., : self.config.arm_dims]
        gripper_target = (target[..., self.config.arm_dims :] > 0).float()  # +1 open -> 1, -1 close -> 0
        valid = torch.ones(action.shape[:2], device=action.device)
        if batch.get("action_is_pad") is not None:
            valid = (~torch.as_tensor(batch["action_is_pad"]).to(action.device).bool()).float()
        denom = valid.sum().clamp_min(1.0)
        arm_loss = F.huber_loss(arm_pred, arm_target, delta=self.config.huber_delta, reduction="none").mean(-1)
        arm_loss = (arm_loss * valid).sum() / denom
        bce = F.binary_cross_entropy_with_logits(gripper_logits, gripper_target, reduction="none").mean(-1)
        gripper_loss = (bce * valid).sum() / denom
        loss = arm_loss + self.config.gripper_loss_weight * gripper_loss
        accuracy = (((gripper_logits > 0).float() == gripper_target).float().mean(-1) * valid).sum() / denom
        info = {
            "loss_arm": float(arm_loss.detach()),
            "loss_gripper": float(gripper_loss.detach()),
            "gripper_accuracy": float(accuracy.detach()),
        }
        if self.target_head is not None and batch.get("observation.target") is not None:
            target_value = torch.as_tensor(batch["observation.target"]).to(hidden.device, torch.float32)
            if tuple(target_value.shape) != (hidden.shape[0], self.config.target_dims):
                raise ValueError(
                    f"observation.target must be ({hidden.shape[0]}, {self.config.target_dims}), "
                    f"got {tuple(target_value.shape)}"
                )
            target_loss = F.mse_loss(self.target_head(hidden), target_value)
            loss = loss + self.config.target_loss_weight * target_loss
            info["loss_target"] = float(target_loss.detach())
        return loss, info

    @torch.no_grad()
    def predict_action_chunk(self, observation: dict[str, Any], normalized: bool = False) -> torch.Tensor:
        """(B, chunk_size, 7): arm in the dataset's units (or [-1, 1] with ``normalized=True``), gripper +-1."""
        # Inference mode skips autograd's per-op bookkeeping (about a tenth of a small LLM's step); the chunk goes
        # back as an ordinary tensor, which callers may modify in place. (Not inference_mode(False) for the full
        # pass: that would turn gradients back on inside this no_grad call.)
        with torch.inference_mode() if self.use_prefix_cache else contextlib.nullcontext():
            arm, gripper_logits = self.predict_normalized(observation)
            arm = arm if normalized else self.normalizer.unnormalize_arm(arm)
            chunk = torch.cat([arm, torch.where(gripper_logits > 0, 1.0, -1.0)], dim=-1)
        return chunk.clone() if chunk.is_inference() else chunk

    @torch.no_grad()
    def select_action(self, observation: dict[str, Any]) -> torch.Tensor:
        """(B, 7) for this control step; a new chunk is predicted only when the queue of the last one is empty."""
        if not self._queue:
            chunk = self.predict_action_chunk(observation)[:, : self.config.actions_per_chunk]
            self._queue.extend(chunk.transpose(0, 1))  # one (B, 7) entry per step
        return self._queue.popleft()

    def reset(self) -> None:
        """Clears the action queue (new episode, new instruction)."""
        self._queue.clear()

    @property
    def cached_prefix_instruction(self) -> str | None:
        """The instruction whose prompt prefix K/V are held for the next step (None: none yet)."""
        return self._step_plan.key[0] if self._step_plan is not None else None

    @property
    def queued_actions(self) -> int:
        return len(self._queue)
