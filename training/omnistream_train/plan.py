"""Memory plan of a VLA training run, by arithmetic only: ``omnistream train vla --preset paper --plan``.

Nothing is built or loaded: parameter counts come from the configured shapes (Qwen2.5 presets, the backbone
preset, projector and action head), bytes from the training scheme, activations from the tokens of one
micro-batch. Three schemes per GPU:

* replicated (``train vla --no-fsdp``): fp32 weights, fp32 gradients, fp32 Adam moments on every rank, bf16
  autocast, whose bf16 copies of the weights live through the step: 16 B per trained parameter.
* FSDP2 (what ``train vla`` runs on several GPUs by default, ``distributed.shard_module``: bf16 parameters,
  fp32 reductions): fp32 master weights, gradients and moments sharded 1/N, plus the gathered bf16 units in
  flight (two units prefetched and one unit's gradient in bf16 and its fp32 reduction copy); the frozen
  backbone stays whole (fp32) on every rank, since each rank computes its own batches' features with it.
* ZeRO-2 (what the paper used, appendix C.4): bf16 weights on every rank, fp32 master + moments and bf16
  gradients sharded 1/N, plus DeepSpeed's reduce bucket (5e8 elements by default).

Activations (bf16, SDPA attention: no score matrix) per token and decoder layer: the two RMSNorm inputs kept in
fp32, the normalised inputs, q/k/v, the attention output and the SwiGLU MLP's four intermediate tensors; with
activation checkpointing only each layer's input is kept, plus one layer's activations during recomputation.
The data path: what ``train vla --set data="memory"`` holds in host RAM (every frame's images as uint8 and its
features as fp32, in every process) against ``data="streamed"`` (the ``paper`` preset's: loader workers reading
frames on demand, features memory-mapped in float16 on disk, ``omnistream_train.vla_data``), whose resident memory
does not grow with the dataset but for an index of the frames.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3
# CALVIN ABC (the training split of ABC -> D): about 1.05M annotated frames; static camera 200 x 200 RGB,
# gripper camera 84 x 84 RGB (../shared/specs/simulators.md)
CALVIN_ABC_FRAMES = 1_050_000
CAMERA_PIXELS = {
    "static": 200 * 200,
    "rgb_static": 200 * 200,
    "gripper": 84 * 84,
    "rgb_gripper": 84 * 84,
    "wrist": 84 * 84,
}
TEMPLATE_TOKENS = 16  # "What action should the robotic arm take to ..." around the instruction
ZERO2_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size
WORKER_BYTES = GIB // 2  # resident size of one torch.utils.data worker process (Python + torch imported)
HEADROOM = 0.9  # CUDA context, NCCL buffers and allocator fragmentation take the rest of a GPU


def parse_bytes(text: str | int | float) -> int:
    """``80GB`` (10^9), ``80GiB`` (2^30), ``512MB``, ``1.5TB`` or a plain number of bytes."""
    if isinstance(text, int | float):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", str(text))
    if not match:
        raise ValueError(f"not a memory size: {text!r} (examples: 80GB, 80GiB, 141GB)")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    powers = {"k": 1, "m": 2, "g": 3, "t": 4}
    if unit in ("b",):
        return int(number)
    base = 1024 if "i" in unit else 1000
    return int(number * base ** powers[unit[0]])


@dataclass
class ModelCounts:
    """Parameter counts of the policy, by role."""

    llm_trained: int  # embeddings + decoder layers + final norm (the recipe trains them all)
    llm_held: int  # the LM head: loaded with Qwen2ForCausalLM, never used by the action query, no gradients
    projector: int
    action_head: int
    backbone: int  # frozen
    layer: int  # one decoder layer (an FSDP unit)
    embedding: int  # the embedding table (the largest FSDP unit)
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int

    @property
    def trained(self) -> int:
        return self.llm_trained + self.projector + self.action_head


def count_vla_parameters(config) -> ModelCounts:
    """Counts from a ``VLATrainConfig``'s policy and backbone presets (shapes only)."""
    from omnistream_perception.model import OmniStreamConfig
    from omnistream_vla.policy.configuration_omnistream_vla import OmniStreamVLAConfig

    policy = OmniStreamVLAConfig.preset(config.policy_preset, **config.policy_overrides)
    llm = dict(policy.llm_config)
    h, inter, n = llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"]
    vocab = llm.get("vocab_size", 151936)
    kv = h // llm["num_attention_heads"] * llm["num_key_value_heads"]
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h  # q(+b), k/v(+b), o, SwiGLU, 2 norms
    embedding = vocab * h
    held = 0 if llm.get("tie_word_embeddings", False) else vocab * h
    shape = OmniStreamConfig.preset(config.backbone_preset)
    vision = shape.hidden_size  # the projector reads the backbone's width (as vla.build_policy sets it)
    ph = policy.projector_hidden_size or h
    projector = vision * ph + ph + ph * h + h
    trunk = h * (h // 2) + h // 2 + (h // 2) * policy.head_trunk_dim + policy.head_trunk_dim

    def branch(out: int) -> int:
        dims = [policy.head_trunk_dim, *policy.head_branch_dims, policy.chunk_size * out]
        return sum(a * b + b for a, b in zip(dims, dims[1:]))

    head = trunk + branch(policy.arm_dims) + branch(policy.gripper_dims) + h  # + the action query embedding
    d, depth = shape.hidden_size, shape.depth
    mlp = getattr(shape, "intermediate_size", None) or 4 * d
    p = shape.patch_size
    backbone = depth * (4 * d * d + 4 * d + 2 * d * mlp + mlp + d + 6 * d) + 3 * p * p * d + d + 8 * d
    return ModelCounts(
        llm_trained=embedding + n * layer + h, llm_held=held, projector=projector, action_head=head,
        backbone=backbone, layer=layer, embedding=embedding, hidden=h, intermediate=inter, layers=n, kv_dim=kv,
    )  # fmt: skip


@dataclass
class MemoryPlan:
    preset: str
    nproc: int
    gpu_bytes: int
    micro_batch: int
    tokens: int
    activation_checkpointing: bool
    counts: ModelCounts
    runs: str = "fsdp2"  # the scheme ``train vla`` runs with this configuration (config.fsdp, or its default)
    per_gpu: dict[str, dict[str, float]] = field(default_factory=dict)  # scheme -> row -> bytes
    host: dict[str, dict[str, float]] = field(default_factory=dict)  # path -> row -> bytes
    host_bytes: int = 0
    frames: int = 0

    def fits(self, scheme: str) -> bool:
        return self.per_gpu[scheme]["total"] <= HEADROOM * self.gpu_bytes

    def host_fits(self, path: str) -> bool:
        return self.host[path]["total"] <= HEADROOM * self.host_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "nproc": self.nproc, "gpu_bytes": self.gpu_bytes, "micro_batch": self.micro_batch,
            "runs": self.runs,
            "tokens_per_sample": self.tokens, "activation_checkpointing": self.activation_checkpointing,
            "per_gpu": self.per_gpu, "fits": {s: self.fits(s) for s in self.per_gpu},
            "host": self.host, "host_bytes": self.host_bytes, "host_fits": {p: self.host_fits(p) for p in self.host},
        }  # fmt: skip


def activation_bytes(counts: ModelCounts, tokens: int, checkpointing: bool) -> float:
    """bf16 activations of the LLM for ``tokens`` tokens (micro-batch x sequence), see the module docstring."""
    h, inter, kv = counts.hidden, counts.intermediate, counts.kv_dim
    per_layer = 2 * (h + (h + 2 * kv) + h + h + 4 * inter) + 4 * (2 * h)
    if checkpointing:
        return tokens * (counts.layers * 2 * h + per_layer)
    return tokens * counts.layers * per_layer


def plan_vla(
    config,
    nproc: int,
    gpu_memory: str | int,
    host_memory: str | int = "128GiB",
    frames: int = CALVIN_ABC_FRAMES,
    activation_checkpointing: bool = False,
    workers: int = 4,
    prefetch: int = 2,
    preset: str = "",
) -> MemoryPlan:
    """Per-GPU and host memory of training ``config`` (a ``VLATrainConfig``) on ``nproc`` GPUs.

    ``config.batch_size`` is the global batch: each GPU's micro-batch is ``batch_size / (nproc x grad_accum)``
    (the recipe: 128 = 8 per GPU x 8 GPUs x accumulation 2, appendix C.4)."""
    from omnistream_perception.model import OmniStreamConfig
    from omnistream_vla.policy.configuration_omnistream_vla import OmniStreamVLAConfig

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    policy = OmniStreamVLAConfig.preset(config.policy_preset, **config.policy_overrides)
    c = count_vla_parameters(config)
    grid = policy.image_size // 16
    visual = len(config.cameras) * (-(-grid // policy.pool)) ** 2
    tokens = visual + policy.max_instruction_tokens + TEMPLATE_TOKENS + 1
    slots = nproc * config.grad_accum
    if config.batch_size % slots:
        raise ValueError(
            f"the global batch {config.batch_size} must be a multiple of GPUs x accumulation = {nproc} x "
            f"{config.grad_accum} (set --batch-size or --grad-accum)"
        )
    micro = config.batch_size // slots
    acts = activation_bytes(c, micro * tokens, activation_checkpointing)
    n = nproc
    trained, held, frozen = c.trained, c.llm_held, c.backbone
    plan = MemoryPlan(preset, nproc, parse_bytes(gpu_memory), micro, tokens, activation_checkpointing, c)
    # train vla's default on GPUs (distributed.ParallelOptions): FSDP2 with several processes, replicated alone
    fsdp = getattr(config, "fsdp", None)
    plan.runs = "fsdp2" if (fsdp if fsdp is not None else nproc > 1) else "replicated"
    plan.host_bytes = parse_bytes(host_memory)
    plan.frames = frames
    plan.per_gpu["replicated"] = {
        "parameters": 4 * (trained + held) + 4 * frozen,
        "gradients": 4 * trained,
        "optimizer": 8 * trained,
        "activations": acts + 2 * trained,  # + autocast's bf16 weight copies, kept for the backward pass
    }
    unit = max(c.layer, c.embedding)
    plan.per_gpu["fsdp2"] = {
        "parameters": 4 * (trained + held) / n + 4 * frozen + 2 * (c.layer + unit),  # shards, backbone, 2 units
        "gradients": 4 * trained / n + (2 + 4) * unit,  # shards + one unit's bf16 grad and fp32 reduction
        "optimizer": 8 * trained / n,
        "activations": acts,
    }
    plan.per_gpu["zero2"] = {
        "parameters": 2 * (trained + held + frozen),
        "gradients": 2 * trained / n + 2 * ZERO2_BUCKET_ELEMENTS,
        "optimizer": 12 * trained / n,  # fp32 master weights + two moments
        "activations": acts,
    }
    for row in plan.per_gpu.values():
        row["total"] = sum(row.values())
    # host memory of the data path, all processes of one machine (nproc per node)
    pixels = sum(CAMERA_PIXELS.get(cam, policy.image_size**2) for cam in config.cameras)
    tokens_per_frame = visual * OmniStreamConfig.preset(config.backbone_preset).hidden_size
    plan.host["in-memory"] = {
        "images": n * frames * pixels * 3,
        "features": n * frames * tokens_per_frame * 4,
        "total": 0,
    }
    in_flight = n * workers * prefetch * micro * (pixels * 3 + tokens_per_frame * 2)
    plan.host["streamed"] = {
        "batches in flight": in_flight,
        "loader worker processes": n * workers * WORKER_BYTES,
        "frame index": n * frames * 16,
        "total": 0,
    }
    for row in plan.host.values():
        row["total"] = sum(v for k, v in row.items() if k != "total")
    plan.host["streamed"]["float16 feature cache on disk (page cache, evictable)"] = frames * tokens_per_frame * 2
    return plan


def _gib(value: float) -> str:
    return f"{value / GIB:7.1f}"


def format_plan(plan: MemoryPlan) -> str:
    c = plan.counts
    lines = [
        f"memory plan: VLA preset {plan.preset or '?'} on {plan.nproc} GPU(s) x {plan.gpu_bytes / GIB:.1f} GiB "
        f"(fits = total <= {HEADROOM:.0%} of it)",
        f"parameters: trained {c.trained / 1e9:.2f} B (LLM {c.llm_trained / 1e9:.2f} B, projector "
        f"{c.projector / 1e6:.1f} M, action head {c.action_head / 1e6:.1f} M), LM head held untrained "
        f"{c.llm_held / 1e9:.2f} B, frozen backbone {c.backbone / 1e6:.0f} M",
        f"micro-batch {plan.micro_batch} per GPU x {plan.tokens} tokens; activation checkpointing "
        f"{'on' if plan.activation_checkpointing else 'off'}",
        f"train vla runs: {plan.runs} (--fsdp / --no-fsdp; default fsdp2 on several GPUs); zero2 is the paper's "
        "DeepSpeed scheme, for comparison",
        "",
        f"{'per GPU, GiB':<14}" + "".join(f"{s:>12}" for s in plan.per_gpu),
    ]
    for row in ("parameters", "gradients", "optimizer", "activations", "total"):
        lines.append(f"{row:<14}" + "".join(f"{_gib(v[row]):>12}" for v in plan.per_gpu.values()))
    lines.append(f"{'fits':<14}" + "".join(f"{('yes' if plan.fits(s) else 'NO'):>12}" for s in plan.per_gpu))
    lines += ["", f"host memory of the data path ({plan.frames:,} frames, {plan.nproc} process(es), host "
              f"{plan.host_bytes / GIB:.0f} GiB):"]  # fmt: skip
    for path, row in plan.host.items():
        parts = ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in row.items() if k != "total")
        verdict = "fits" if plan.host_fits(path) else "does NOT fit"
        lines.append(f"  {path}: {row['total'] / GIB:.1f} GiB resident ({parts}) -> {verdict}")
    return "\n".join(lines)
