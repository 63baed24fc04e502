"""Export of one streaming step (backbone + geometry heads) to ONNX with the KV cache as explicit tensors.

The graph computes exactly one frame at a fixed resolution against a fixed number of cache slots:

inputs
  ``pixel_values``   (B, 3, H, W) float32, ImageNet-normalised (as ``OmniStreamImageProcessor`` gives)
  ``frame_index``    (1,) int64, the absolute index of the frame in its stream: RoPE time and the first-frame
                     register/camera tokens come from it, so they stay exact however long the stream runs
  ``past_valid``     (window,) bool, which slots hold a frame
  ``past_key_<i>``   per layer i: (B, heads, window * tokens_per_frame, head_dim) float32, rotated keys by slot
  ``past_value_<i>`` same shape, values (one input per layer: a runtime can hand each layer's buffer in place,
                     where slicing one stacked tensor inside the graph would copy the whole cache every step)
outputs
  ``last_hidden_state`` (B, h*w, D), ``pooler_output`` (B, D), ``camera_token`` (B, D) when exported with it,
  ``new_key`` / ``new_value`` (layers, B, heads, tokens_per_frame, head_dim): this frame's cache entries,
  and with heads ``depth``, ``depth_conf`` (B, H, W), ``pose_enc`` (B, 9) (camera token), ``rays`` /
  ``points`` (B, H, W, 6 / 3) when asked for.

The graph is the model's own forward (``model(frame, past_key_values=slots, frame_offset=frame_index)``), the
slots standing in for the KV cache, so the exported step cannot drift from the torch one.

Which slot the new frame goes to (sinks stay, a ring of recent frames) is bookkeeping outside the graph
(:class:`~omnistream_perception.deploy.onnx_session.OnnxStreamSession`): attention over the slots is
permutation invariant, so the graph never needs to know the ring position, and a deployment runtime only
has to copy one frame's keys/values per step.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..model.heads import GeometryHeads
from ..model.modeling_omnistream import OmniStreamModel

# Bumped when the graph's inputs/outputs change, so a runtime can refuse a file it does not understand.
FORMAT_VERSION = 1
METADATA_KEY = "omnistream_stream_step"


def input_names(num_layers: int) -> list[str]:
    cache = [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    return ["pixel_values", "frame_index", "past_valid"] + cache


class _SlotCache:
    """The graph's cache inputs as the model's ``past_key_values`` (the calls of ``kv_cache.StepCache``): the
    keys/values to attend over are every slot, then this frame's; the mask hides the slots marked not valid;
    this frame's keys/values are kept for the outputs. Nothing is stored: the runtime places them."""

    num_cached = 0  # the slots are inputs: the frame offset is a graph input too, never checked against them

    def __init__(self, cache: tuple[torch.Tensor, ...], past_valid: torch.Tensor) -> None:
        self.cache = cache
        self.past_valid = past_valid
        self.tokens_per_frame = 0
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []

    def begin_step(self, num_frames: int, tokens_per_frame: int, num_layers: int) -> None:
        if num_frames != 1:
            raise ValueError(f"the exported step computes one frame, got {num_frames}")
        self.tokens_per_frame = tokens_per_frame

    def step_mask(self, device: torch.device) -> torch.Tensor:
        n, window = self.tokens_per_frame, self.past_valid.shape[0]
        # keys: the window's slots (valid or not), then this frame's own tokens (always visible)
        visible = torch.cat([self.past_valid[:, None].expand(window, n).reshape(-1), self.past_valid.new_ones(n)])
        return visible[None, :].expand(n, -1)

    def end_step(self) -> None:
        pass

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new_keys.append(k)
        self.new_values.append(v)
        return torch.cat([self.cache[2 * layer], k], dim=2), torch.cat([self.cache[2 * layer + 1], v], dim=2)


class StreamStepGraph(nn.Module):
    """One streaming step as a pure function of (frame, absolute index, cache slots): what gets exported."""

    def __init__(
        self,
        model: OmniStreamModel,
        heads: GeometryHeads | None,
        *,
        window: int,
        resolution: tuple[int, int],
        camera_token: bool,
        rays: bool = False,
    ) -> None:
        super().__init__()
        cfg = model.config
        p = cfg.patch_size
        if resolution[0] % p or resolution[1] % p or min(resolution) <= 0:
            raise ValueError(f"resolution must be positive multiples of the patch size {p}, got {resolution}")
        if window < 1:
            raise ValueError(f"window must be >= 1 frame, got {window}")
        self.model = model
        self.heads = heads
        self.window = window
        self.resolution = tuple(resolution)
        self.grid = (resolution[0] // p, resolution[1] // p)
        self.camera_token = camera_token
        self.rays = rays
        self.start = model.patch_start_idx(camera_token)
        self.tokens_per_frame = self.start + self.grid[0] * self.grid[1]
        self.output_names = ["last_hidden_state", "pooler_output"] + (["camera_token"] if camera_token else [])
        self.output_names += ["new_key", "new_value"]
        if heads is not None:
            self.output_names += ["depth", "depth_conf"] + (["rays", "points"] if rays else [])
            self.output_names += ["pose_enc"] if camera_token else []

    def forward(self, pixel_values, frame_index, past_valid, *cache):
        slots = _SlotCache(cache, past_valid)
        out = self.model(
            pixel_values[:, None],
            camera_token=self.camera_token,
            output_hidden_states=self.heads.layers if self.heads is not None else False,
            past_key_values=slots,
            frame_offset=frame_index,
        )
        outputs = [out.last_hidden_state[:, 0], out.pooler_output[:, 0]]
        if self.camera_token:
            outputs.append(out.camera_token[:, 0])
        outputs += [torch.stack(slots.new_keys), torch.stack(slots.new_values)]
        if self.heads is not None:
            pred = self.heads(out, self.resolution, rays=self.rays)
            outputs += [pred["depth"][:, 0], pred["depth_conf"][:, 0]]
            if self.rays:
                outputs += [pred["rays"][:, 0], pred["points"][:, 0]]
            if self.camera_token:
                outputs.append(pred["pose_enc"][:, 0])
        return tuple(outputs)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        cfg = self.model.config
        layer_cache = (batch_size, cfg.num_attention_heads, self.window * self.tokens_per_frame, cfg.head_dim)
        inputs = [torch.zeros(batch_size, 3, *self.resolution), torch.tensor([1], dtype=torch.int64)]
        inputs.append(torch.ones(self.window, dtype=torch.bool))
        return tuple(inputs + [torch.zeros(layer_cache) for _ in range(2 * cfg.depth)])

    def metadata(self, sink: int, batch_size: int) -> dict:
        cfg = self.model.config
        return {
            "format_version": FORMAT_VERSION,
            "window": self.window,
            "sink": sink,
            "batch_size": batch_size,
            "resolution": list(self.resolution),
            "grid": list(self.grid),
            "patch_size": cfg.patch_size,
            "camera_token": self.camera_token,
            "patch_start_idx": self.start,
            "tokens_per_frame": self.tokens_per_frame,
            "layers": cfg.depth,
            "num_heads": cfg.num_attention_heads,
            "head_dim": cfg.head_dim,
            "hidden_size": cfg.hidden_size,
            "heads": self.heads is not None,
            "head_layers": self.heads.layers if self.heads is not None else [],
            "rays": self.rays and self.heads is not None,
            "inputs": input_names(cfg.depth),
            "outputs": self.output_names,
        }


def export_stream_step(
    model: OmniStreamModel,
    path: str | Path,
    *,
    window: int,
    resolution: tuple[int, int],
    sink: int = 1,
    heads: GeometryHeads | None = None,
    camera_token: bool | None = None,
    rays: bool = False,
    batch_size: int = 1,
    opset: int = 23,
) -> Path:
    """Writes the float32 streaming step of ``model`` (+ ``heads``) to ``path``; returns the path.

    ``camera_token`` defaults to on when heads are given (the pose needs it), as in ``PerceptionSession``.
    The ring semantics (first ``sink`` frames stay, ``window - sink`` recent frames) live in the runtime
    wrapper and are recorded in the file's metadata. ``opset >= 23`` writes attention as the ONNX Attention op
    (fused in onnxruntime); ``opset=18`` as MatMul/Softmax for runtimes without that op (older TensorRT).
    """
    if not 0 <= sink <= window:
        raise ValueError(f"sink must be in [0, window={window}], got {sink}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    camera_token = heads is not None if camera_token is None else camera_token
    model, heads = _float32_cpu(model), _float32_cpu(heads) if heads is not None else None
    graph = StreamStepGraph(
        model,
        heads,
        window=window,
        resolution=resolution,
        camera_token=camera_token,
        rays=rays,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter logs chatter (e.g. torchvision ops it skips) that says nothing about this graph.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                graph.example_inputs(batch_size),
                dynamo=True,
                input_names=input_names(model.config.depth),
                output_names=graph.output_names,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    finally:
        logger.setLevel(level)
    program.model.metadata_props[METADATA_KEY] = json.dumps(graph.metadata(sink, batch_size))
    program.save(str(path))  # weights over 2 GB go to an external data file beside it
    return path


def _float32_cpu(module: nn.Module) -> nn.Module:
    """The module in float32 on the CPU, in eval mode; a copy when it is not already (the caller keeps theirs)."""
    p = next(module.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu":
        module = copy.deepcopy(module).float().cpu()
    return module.eval()
