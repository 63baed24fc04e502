"""The OmniStream backbone: a DINOv3-style ViT with frame-causal attention, 3D-RoPE and a KV cache.

Parameter names follow the authors' checkpoint exactly (everything lives under ``patch_embed.``), so the
published ``model.safetensors`` loads unchanged.

One forward serves the whole clip and the stream, as ``past_key_values`` does in Hugging Face transformers:
``model(pixel_values)`` is one frame-causal pass; ``model(frames, past_key_values=cache, frame_offset=t)``
continues a stream whose first ``t`` frames went through ``cache`` (a :class:`~.kv_cache.KVCache`). The
streaming session (``streaming.py``) keeps the cache and the frame counter; this file does not know it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .configuration_omnistream import CONFIG_NAME, OmniStreamConfig
from .kv_cache import StepCache
from .rope import apply_rope, rope_cos_sin

WEIGHTS_NAME = "model.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class OmniStreamOutput:
    """What the authors' model returns, under the same names."""

    last_hidden_state: torch.Tensor  # (B, T, h*w, D) normalised patch tokens of the last block
    pooler_output: torch.Tensor  # (B, T, D) normalised CLS token
    camera_token: torch.Tensor | None  # (B, T, D) normalised camera token, or None
    hidden_states: tuple[torch.Tensor, ...] | None  # per block (B, T, tokens, D), before the final norm
    patch_start_idx: int
    grid_size: tuple[int, int]  # (h, w) patches per frame
    frame_indices: torch.Tensor  # (T,) absolute index of each frame in its stream


# ------------------------------------------------------------------------------------------------------
# Building blocks (names as in DINOv3 / the authors' code)
# ------------------------------------------------------------------------------------------------------
class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """DINOv3's SwiGLU feed-forward (w1, w2 gate/up; w3 down), hidden rounded to a multiple of 8."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = int(hidden * 2 / 3)
        hidden += -hidden % 8
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: StepCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, config: OmniStreamConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(dim, config.num_attention_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        ffn = Mlp if config.ffn_layer == "mlp" else SwiGLUFFN
        self.mlp = ffn(dim, config.mlp_hidden_size)
        self.ls2 = LayerScale(dim)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.ls1(self.attn(self.norm1(x), cos, sin, mask, cache, layer))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, h*w, D)
        return self.proj(images).flatten(2).transpose(1, 2)


class OmniStreamEncoder(nn.Module):
    """Everything of the published model. It sits at ``OmniStreamModel.patch_embed`` because that is
    where the authors' checkpoint puts it (``patch_embed.blocks.0...``)."""

    def __init__(self, config: OmniStreamConfig) -> None:
        super().__init__()
        dim, regs = config.hidden_size, config.num_register_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, regs, dim))  # [:, 0] first frame, [:, 1] later
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.post_layernorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.ar_embedder = nn.Linear(1, dim)


# ------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------
class OmniStreamModel(nn.Module):
    """``model(pixel_values)`` is one frame-causal pass over ``(B, T, 3, H, W)`` clips; with ``past_key_values``
    and ``frame_offset`` the same pass continues a stream (``streaming.OmniStreamSession`` keeps both)."""

    config_class = OmniStreamConfig

    def __init__(self, config: OmniStreamConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = OmniStreamEncoder(config)
        self.init_weights()

    # -- construction / IO ----------------------------------------------------------------------------
    def init_weights(self) -> None:
        """DINOv3-like random init (used by tests and pretraining from scratch)."""
        enc = self.patch_embed
        for p in (enc.cls_token, enc.register_token, enc.camera_token):
            nn.init.normal_(p, std=0.02)
        nn.init.zeros_(enc.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(enc.ar_embedder.weight)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> OmniStreamModel:
        config = OmniStreamConfig.preset(name)
        for key, value in overrides.items():
            setattr(config, key, value)
        return cls(config)

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> OmniStreamModel:
        """Loads the authors' layout (config.json + model.safetensors) from a directory or the HF hub.

        Strict: a missing, unexpected or mis-shaped tensor raises a ValueError naming it. Never unpickles.
        """
        directory = resolve_pretrained_dir(path_or_hub_id, [CONFIG_NAME, WEIGHTS_NAME])
        config = OmniStreamConfig.from_json_file(directory / CONFIG_NAME)
        model = cls(config)
        state = load_safetensors(directory / WEIGHTS_NAME)
        load_state_dict_strict(model, state, source=str(directory / WEIGHTS_NAME))
        model.eval()
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.to_json_file(directory / CONFIG_NAME)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_dinov3(cls, config: OmniStreamConfig, weights: dict[str, torch.Tensor] | str | Path) -> OmniStreamModel:
        """Initialises from DINOv3 ViT weights (for pretraining, as the paper does).

        ``weights``: a state dict, a ``.safetensors`` file, a directory holding ``model.safetensors`` (the
        Hugging Face layout) or an original ``.pth`` (read with ``weights_only=True``: tensors only, no code).
        Both the original DINOv3 names (``storage_tokens``, ``blocks.*``, ``norm``) and the Hugging Face
        transformers names (``embeddings.*``, ``layer.*``) are understood. Registers seed both the first-frame
        and later-frame register tokens; the camera token and aspect-ratio embedder keep their random init.
        """
        state = _read_dinov3_weights(weights) if not isinstance(weights, dict) else dict(weights)
        if any(k.startswith("embeddings.") for k in state):
            state = _dinov3_hf_to_original(state, config.depth)
        model = cls(config)
        mapped = {}
        for name, tensor in state.items():
            if name in _DINOV3_IGNORED or name.endswith(".bias_mask") or name.startswith(("head", "local_cls")):
                continue
            if name == "storage_tokens":
                mapped["patch_embed.register_token"] = tensor.reshape(1, 1, *tensor.shape[-2:]).repeat(1, 2, 1, 1)
            elif name in ("norm.weight", "norm.bias"):
                mapped["patch_embed.post_layernorm." + name.split(".")[1]] = tensor
            elif name == "mask_token":
                mapped["patch_embed.mask_token"] = tensor.reshape(1, -1)
            else:
                mapped["patch_embed." + name] = tensor
        own = model.state_dict()
        for key in ("patch_embed.camera_token", "patch_embed.ar_embedder.weight", "patch_embed.ar_embedder.bias"):
            mapped.setdefault(key, own[key])
        load_state_dict_strict(model, mapped, source="DINOv3 weights")
        return model

    # -- shapes ---------------------------------------------------------------------------------------
    def patch_start_idx(self, camera_token: bool) -> int:
        return 1 + int(camera_token) + self.config.num_register_tokens

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Validates ``(B, T, 3, H, W)`` input; raises ValueError saying what to fix."""
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 5 or pixel_values.shape[2] != 3:
            raise ValueError(
                f"pixel_values must have shape (batch, frames, 3, height, width), got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a float tensor normalised with the ImageNet mean/std, got {pixel_values.dtype};"
                " use omnistream_perception.processor to convert uint8 images"
            )
        p = self.config.patch_size
        h, w = pixel_values.shape[-2:]
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"height and width must be positive multiples of the patch size {p}, got {h}x{w}")
        if pixel_values.shape[0] == 0 or pixel_values.shape[1] == 0:
            raise ValueError(f"pixel_values has an empty batch or frame dimension: {tuple(pixel_values.shape)}")
        return pixel_values

    # -- tokens ---------------------------------------------------------------------------------------
    def _embed_frames(
        self,
        pixel_values: torch.Tensor,
        frame_indices: torch.Tensor,
        camera_token: bool,
        aspect_ratio: float | torch.Tensor | None,
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens ``[CLS, (CAM), REG x4, patches]`` of each frame: (B, T, tokens, D)."""
        enc = self.patch_embed
        b, t, _, h, w = pixel_values.shape
        dtype = enc.cls_token.dtype
        patches = enc.patch_embed(pixel_values.reshape(b * t, 3, h, w).to(dtype)).reshape(
            b, t, -1, enc.cls_token.shape[-1]
        )
        if masks is not None:  # iBOT: masked patches are replaced by the mask token
            patches = torch.where(masks.reshape(b, t, -1, 1), enc.mask_token.to(dtype), patches)
        later = (frame_indices > 0).long()  # first-frame tokens by absolute index, not position in the call
        special = [enc.cls_token[:, None].expand(b, t, -1, -1)]
        if camera_token:
            cam = enc.camera_token[0, later]  # (T, 1, D)
            ratio = self._aspect_ratio(aspect_ratio, b, h, w, pixel_values.device)
            cam = cam[None] + enc.ar_embedder(torch.log(ratio).to(dtype))[:, None, None, :]
            special.append(cam.expand(b, t, -1, -1))
        special.append(enc.register_token[0, later][None].expand(b, t, -1, -1))
        return torch.cat(special + [patches], dim=2)

    @staticmethod
    def _aspect_ratio(aspect_ratio, batch: int, h: int, w: int, device) -> torch.Tensor:
        """H/W of the (original) image as a (B, 1) float tensor; the model adds ar_embedder(log(H/W))."""
        if aspect_ratio is None:
            return torch.full((batch, 1), h / w, device=device)
        ratio = torch.as_tensor(aspect_ratio, dtype=torch.float32, device=device).reshape(-1, 1)
        if ratio.shape[0] not in (1, batch) or (ratio <= 0).any():
            raise ValueError(f"aspect_ratio must be a positive float or one per batch element, got {aspect_ratio}")
        return ratio.expand(batch, 1)

    def _rope_tables(self, frame_indices, grid_h, grid_w, camera_token, coord_scale=None):
        cfg = self.config
        return rope_cos_sin(
            frame_indices,
            grid_h,
            grid_w,
            self.patch_start_idx(camera_token),
            cfg.head_dim,
            cfg.rope_base,
            cfg.rope_total_length,
            coord_scale,
        )

    # -- one pass over tokens -------------------------------------------------------------------------
    def _run_blocks(
        self,
        tokens: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        keep: list[int] | None,
        cache: StepCache | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """tokens (B, T, N, D) -> last block output (B, T, N, D) and the outputs of the blocks in ``keep``."""
        b, t, n, d = tokens.shape
        x = tokens.reshape(b, t * n, d)
        collected = {}
        for i, block in enumerate(self.patch_embed.blocks):
            x = block(x, cos, sin, mask, cache, i)
            if keep is not None and i in keep:
                collected[i] = x.reshape(b, t, n, d)
        hidden = tuple(collected[i] for i in keep) if keep is not None else None
        return x.reshape(b, t, n, d), hidden

    def _outputs(self, x, hidden, camera_token, grid, frame_indices) -> OmniStreamOutput:
        normed = self.patch_embed.post_layernorm(x)
        start = self.patch_start_idx(camera_token)
        return OmniStreamOutput(
            last_hidden_state=normed[:, :, start:],
            pooler_output=normed[:, :, 0],
            camera_token=normed[:, :, 1] if camera_token else None,
            hidden_states=hidden,
            patch_start_idx=start,
            grid_size=grid,
            frame_indices=frame_indices,
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio: float | torch.Tensor | None = None,
        camera_token: bool = False,
        *,
        output_hidden_states: bool | Sequence[int] = True,
        past_key_values: StepCache | None = None,
        frame_offset: int | torch.Tensor = 0,
        masks: torch.Tensor | None = None,
        rope_coord_scale: tuple[float, float] | None = None,
    ) -> OmniStreamOutput:
        """One frame-causal pass: every token of frame t sees all tokens of frames <= t.

        ``frame_offset`` is the absolute index of the first frame in its stream (RoPE time, first-frame tokens).
        ``past_key_values``: the earlier frames' keys/values; this call attends over them and adds its own
        frames. None (the full clip) gives what an empty cache with offset 0 gives.
        """
        pixel_values = self._check_pixel_values(pixel_values)
        keep = _wanted_layers(output_hidden_states, self.config.depth)
        cache = past_key_values
        if cache is not None and isinstance(frame_offset, int) and frame_offset < cache.num_cached:
            raise ValueError(
                f"frame_offset {frame_offset} is behind the {cache.num_cached} frames in past_key_values: pass the"
                " absolute index of the first new frame"
            )
        t, (h, w) = pixel_values.shape[1], pixel_values.shape[-2:]
        p = self.config.patch_size
        grid = (h // p, w // p)
        device = pixel_values.device
        offset = frame_offset.to(device) if isinstance(frame_offset, torch.Tensor) else frame_offset
        frames = torch.arange(t, device=device) + offset  # (T,) absolute indices
        tokens = self._embed_frames(pixel_values, frames, camera_token, aspect_ratio, masks)
        cos, sin = self._rope_tables(frames, grid[0], grid[1], camera_token, rope_coord_scale)
        n = tokens.shape[2]
        if cache is None:
            mask = frame_causal_mask(t, n, device) if t > 1 else None
        else:
            cache.begin_step(t, n, self.config.depth)
            mask = cache.step_mask(device)
        x, hidden = self._run_blocks(tokens, cos, sin, mask, keep, cache)
        if cache is not None:
            cache.end_step()
        return self._outputs(x, hidden, camera_token, grid, frames)


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
_DINOV3_IGNORED = {"rope_embed.periods", "mask_token_dummy"}


def _read_dinov3_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in (".pth", ".pt"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: expected a .safetensors file, a directory with {WEIGHTS_NAME}, or a DINOv3 .pth")


def _dinov3_hf_to_original(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Hugging Face ``DINOv3ViTModel`` names -> the original DINOv3 names (q/k/v fused, no key bias there)."""
    out = {
        "cls_token": state["embeddings.cls_token"],
        "storage_tokens": state["embeddings.register_tokens"],
        "mask_token": state["embeddings.mask_token"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.bias"],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    for i in range(depth):
        src, dst = f"layer.{i}.", f"blocks.{i}."
        att = src + "attention."
        q, k, v = (state[att + f"{n}_proj.weight"] for n in "qkv")
        out[dst + "attn.qkv.weight"] = torch.cat([q, k, v])
        biases = [state.get(att + f"{n}_proj.bias", torch.zeros(q.shape[0], dtype=q.dtype)) for n in "qkv"]
        out[dst + "attn.qkv.bias"] = torch.cat(biases)
        out[dst + "attn.proj.weight"] = state[att + "o_proj.weight"]
        out[dst + "attn.proj.bias"] = state[att + "o_proj.bias"]
        for n in ("norm1", "norm2"):
            out[dst + n + ".weight"], out[dst + n + ".bias"] = state[src + n + ".weight"], state[src + n + ".bias"]
        out[dst + "ls1.gamma"] = state[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = state[src + "layer_scale2.lambda1"]
        for ours, theirs in (("fc1", "up_proj"), ("fc2", "down_proj")):
            out[dst + f"mlp.{ours}.weight"] = state[src + f"mlp.{theirs}.weight"]
            out[dst + f"mlp.{ours}.bias"] = state[src + f"mlp.{theirs}.bias"]
    return out


def frame_causal_mask(num_frames: int, tokens_per_frame: int, device) -> torch.Tensor:
    """Boolean (T*N, T*N) mask: query frame >= key frame (vectorised, no Python loop)."""
    frame = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)
    return frame[:, None] >= frame[None, :]


def _wanted_layers(output_hidden_states: bool | Sequence[int], depth: int) -> list[int] | None:
    if output_hidden_states is True:
        return list(range(depth))
    if output_hidden_states is False or output_hidden_states is None:
        return None
    layers = [i % depth if i < 0 else i for i in output_hidden_states]
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"hidden state layers {bad} out of range for a {depth}-block model")
    return layers


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads ``state`` into ``model``; any missing, unexpected or mis-shaped tensor is an error naming it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if shapes:
        problems.append("mis-shaped tensors: " + "; ".join(shapes))
    if problems:
        raise ValueError(f"{source} does not match the model configuration. " + " | ".join(problems))
    model.load_state_dict(state, strict=True)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on the CPU; ValueError naming the file when it is empty, truncated or
    not safetensors at all (the library's own error does not say which file)."""
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a valid safetensors file ({exc}): re-download or re-save it") from exc


def resolve_pretrained_dir(path_or_hub_id: str | Path, required: Sequence[str]) -> Path:
    """A local directory, or a Hugging Face hub repo id fetched (or read from the local HF cache)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        missing = [name for name in required if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path} is missing {', '.join(missing)} (expected config.json + model.safetensors)"
            )
        return path
    text = str(path_or_hub_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{text} is neither a directory nor a Hugging Face hub id like 'StreamFormer/OmniStream'"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # network or auth problems: say what to do instead
        raise FileNotFoundError(
            f"could not fetch {text} from the Hugging Face hub ({exc.__class__.__name__}: {exc}); "
            "download it on a connected machine and pass the local directory instead"
        ) from exc
