"""torch.distributed plumbing: the same command runs alone or under ``torchrun`` (gloo on CPU, nccl on GPU).

Gradients are averaged with one bucketed all-reduce per optimiser step (``average_gradients``): the
multi-task step runs several forward/backward passes over different parts of the model before a single
update, which is gradient accumulation across tasks; DDP's reducer syncs at the end of a backward pass
and would need one pass to touch every parameter. The arithmetic is DDP's (mean of the ranks' gradients).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistributedContext:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistributedContext(rank, world, local, dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module, ctx: DistributedContext) -> None:
    """Rank 0's weights and buffers everywhere (identical starts whatever each rank's RNG did)."""
    if not ctx.enabled:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def average_gradients(params: list[torch.nn.Parameter], ctx: DistributedContext) -> None:
    """Mean of the ranks' gradients, one flat all-reduce (a parameter without a gradient counts as zeros)."""
    if not ctx.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def mean_across_ranks(values: dict[str, float], ctx: DistributedContext) -> dict[str, float]:
    """Per-objective losses averaged over ranks (what the logs report)."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t)}


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer's bytes, in state-dict order (identical weights <=> same digest)."""
    return state_digest(module.state_dict())


def gather_strings(value: str, ctx: DistributedContext) -> list[str]:
    """Every rank's ``value``, in rank order (one entry without torch.distributed)."""
    if not ctx.enabled:
        return [value]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


# ------------------------------------------------------------------------------------------------------
# FSDP2: sharded parameters, gradients and optimiser state
# ------------------------------------------------------------------------------------------------------
# How a training command adopts the engine (``ParallelEngine``; pretrain, heads, vla and vlm use it):
#   engine = ParallelEngine(ctx, ParallelOptions(fsdp, grad_accum, precision, activation_checkpointing))
#   micro = engine.micro_batch(config.batch_size)                  # --batch-size is the global batch
#   engine.prepare(model)   # rank 0's weights everywhere; FSDP2 per block + root for each module that is called
#                           # (keep_whole=(frozen part,): left whole on every rank, e.g. the VLA's backbone)
#   optimizer over the model's trainable parameters (built AFTER prepare: they are DTensor shards under FSDP)
#   for m in range(engine.grad_accum): rows of slice engine.slot(m) of engine.slots();
#       engine.backward(loss / engine.grad_accum, model)
#   engine.finish_gradients(params, max_norm); optimizer.step(); engine.after_step(model)
#   checkpoints: engine.save(...) / engine.load(...); export: engine.full_state_dict(model) on EVERY rank.


@dataclass
class ParallelOptions:
    """How a command spreads its model over the ranks.

    ``fsdp``: FSDP2 (``fully_shard``) per transformer block and per top-level module; each rank then holds
    1/world of every parameter, gradient and optimiser state. ``None`` = the documented default: on for
    multi-rank GPU runs, off otherwise (replicated weights + one all-reduce). ``precision``: ``auto`` =
    bf16 parameters with fp32 gradient reductions on GPUs (the paper trained in bf16), fp32 on CPU (gloo has no
    bf16 reductions worth having and CPU runs are the reference); ``bf16`` | ``fp32`` force it.
    ``activation_checkpointing`` recomputes each block's activations in the backward pass.
    """

    fsdp: bool | None = None
    grad_accum: int = 1
    precision: str = "auto"
    activation_checkpointing: bool = False

    def resolved(self, ctx: DistributedContext) -> ParallelOptions:
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto|bf16|fp32, got {self.precision!r}")
        fsdp = self.fsdp if self.fsdp is not None else (ctx.enabled and ctx.device.type == "cuda")
        if fsdp and not ctx.enabled:
            raise ValueError(
                "--fsdp shards the model over processes: run under torchrun with --nproc-per-node >= 2 "
                "(one process trains replicated)"
            )
        if self.activation_checkpointing and not fsdp:
            raise ValueError("activation checkpointing is applied per sharded block: use it with --fsdp")
        return ParallelOptions(fsdp, self.grad_accum, self.precision, self.activation_checkpointing)

    def param_dtype(self, ctx: DistributedContext) -> torch.dtype:
        if self.precision == "bf16" or (self.precision == "auto" and ctx.device.type == "cuda"):
            return torch.bfloat16
        return torch.float32


def micro_batch(global_batch: int, ctx: DistributedContext, grad_accum: int, what: str = "batch size") -> int:
    """Per-rank micro-batch of a GLOBAL batch: ``global / (world * accum)``; a clear error if it does not divide."""
    slots = ctx.world_size * grad_accum
    if global_batch < 1 or global_batch % slots:
        raise ValueError(
            f"the global {what} {global_batch} must be a positive multiple of processes x accumulation "
            f"= {ctx.world_size} x {grad_accum} = {slots} (each rank's micro-batch is global / (world x accum))"
        )
    return global_batch // slots


def data_slots(ctx: DistributedContext, grad_accum: int) -> int:
    """Micro-batches per optimiser step over all ranks; a global batch is cut into this many equal slices."""
    return ctx.world_size * grad_accum


def data_slot(ctx: DistributedContext, grad_accum: int, micro: int) -> int:
    """Which slice of the global batch micro-batch ``micro`` of this rank is: slices are laid out rank-major,
    so (world 1, accum 2) and (world 2, accum 1) read the same rows with the same per-slice random streams."""
    return ctx.rank * grad_accum + micro


def _block_lists(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks inside ``module``: items of a ModuleList that hold Linear layers in submodules
    (ViT blocks, decoder layers), outermost lists only; lists of single convolutions stay in their parent."""
    blocks: list[torch.nn.Module] = []
    taken: set[int] = set()
    for _, sub in module.named_modules():
        if id(sub) in taken or not isinstance(sub, torch.nn.ModuleList):
            continue
        items = [m for m in sub if any(isinstance(x, torch.nn.Linear) for x in m.modules())]
        if not items or len(items) != len(sub) or not all(len(list(m.children())) >= 2 for m in items):
            continue
        for item in items:
            blocks.append(item)
            taken.update(id(x) for x in item.modules())
    return blocks


def cpu_or_device_mesh(ctx: DistributedContext):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(ctx.device.type, (ctx.world_size,))


def shard_module(
    module: torch.nn.Module,
    ctx: DistributedContext,
    options: ParallelOptions,
    mesh=None,
    keep_whole: tuple[torch.nn.Module, ...] = (),
    cast_inputs: bool = True,
):
    """FSDP2 on one top-level module: ``fully_shard`` per transformer block, then on the module itself (its
    root group holds embeddings, norms and small heads). Frozen parameters are sharded too (they have no
    gradients or optimiser state, only 1/world of their bytes per rank). Returns the module (sharded in place).

    ``keep_whole``: submodules left out of FSDP, whole on every rank (a frozen part that each rank runs on its
    own data outside the training forward, like the VLA's backbone: a sharded one would make every call a
    collective). A Hugging Face LM head that is not tied to the input embeddings gets its own unit: a model
    that reads hidden states only (the VLA's action query) never gathers it. ``cast_inputs=False`` leaves the
    root's floating-point inputs in their dtype (action targets, robot state: bf16 would round them)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not any(True for _ in module.parameters()):
        return module
    mesh = mesh if mesh is not None else cpu_or_device_mesh(ctx)
    dtype = options.param_dtype(ctx)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # FSDP2 warns whenever a module returns a view (the heads' dict of per-output slices); only an in-place op
    # on such an output would be wrong, and the losses here are out-of-place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    whole = {id(x) for m in keep_whole for x in m.modules()}
    ignored = {p for m in keep_whole for p in m.parameters()}
    blocks = [b for b in _block_lists(module) if id(b) not in whole]
    hf = [m for m in module.modules() if getattr(m, "supports_gradient_checkpointing", False) and id(m) not in whole]
    if options.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        # Hugging Face models checkpoint their own layers (their KV cache must be off while recomputing)
        inside_hf = {id(x) for m in hf for x in m.modules()}
        for m in hf:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for block in blocks:
            if id(block) not in inside_hf:
                checkpoint(block)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    for m in hf:
        head, embeddings = m.get_output_embeddings(), m.get_input_embeddings()
        if head is not None and embeddings is not None and head.weight is not embeddings.weight:
            fully_shard(head, mesh=mesh, mp_policy=policy)
    # the module's outputs in fp32: the losses (Sinkhorn-Knopp, Huber, cross-entropy) stay in full precision
    root_policy = MixedPrecisionPolicy(
        param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=torch.float32, cast_forward_inputs=cast_inputs
    )
    fully_shard(module, mesh=mesh, mp_policy=root_policy, ignored_params=ignored or None)
    return module


def reshard(*modules: torch.nn.Module | None) -> None:
    """Frees every gathered parameter of the FSDP modules in ``modules``: a root keeps its parameters gathered
    after a forward that has no backward (a teacher, a frozen backbone) until told; plain modules are left alone."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for m in module.modules() if module is not None else ():
            if isinstance(m, FSDPModule):
                m.reshard()


def fill_missing_grads(*modules: torch.nn.Module | None) -> None:
    """Call between a forward and its backward under FSDP2: every gathered (unsharded) trainable parameter
    without a gradient gets zeros. A parameter whose use depends on the data (the mask token when a rank
    masked nothing) would otherwise leave a group's reduce-scatter a different size on each rank; zeros are
    what the replicated path's all-reduce counts for it too. Sharded (DTensor) parameters are not in use now."""
    for module in modules:
        for p in module.parameters() if module is not None else ():
            if p.requires_grad and p.grad is None and not hasattr(p, "to_local"):
                p.grad = torch.zeros_like(p)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _bytes(tensor: torch.Tensor) -> int:
    local = _local(tensor)
    return local.numel() * local.element_size()


def local_state_bytes(
    modules: list[torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    exclude: tuple[torch.nn.Module, ...] = (),
) -> dict[str, int]:
    """This rank's bytes of parameters (every module given, frozen ones included, but for the parameters of
    ``exclude``), gradients and optimiser state (sharded tensors count their local shard only); ``total`` is
    their sum."""
    seen: set[int] = {id(p) for m in exclude for p in m.parameters()}
    params = grads = 0
    for module in modules:
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            params += _bytes(p)
            if p.grad is not None:
                grads += _bytes(p.grad)
    opt = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            opt += sum(_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return {"parameters": params, "gradients": grads, "optimizer": opt, "total": params + grads + opt}


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` for plain and sharded (DTensor) gradients; returns the global norm as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state of ``module`` on CPU (a collective under FSDP: every rank must call it; the
    result is complete on rank 0 and empty elsewhere). A plain module's own state dict otherwise."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and bytes (what ``weights_digest`` computes for a module)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ParallelEngine:
    """The training loop's view of the ranks: global-batch slicing, replicated or FSDP2 modules, gradient
    synchronisation, sharded or plain checkpoints (see the recipe at the top of this section)."""

    def __init__(self, ctx: DistributedContext, options: ParallelOptions | None = None) -> None:
        self.ctx = ctx
        self.options = (options or ParallelOptions()).resolved(ctx)
        self._mesh = None

    @property
    def fsdp(self) -> bool:
        return bool(self.options.fsdp)

    @property
    def grad_accum(self) -> int:
        return self.options.grad_accum

    def micro_batch(self, global_batch: int, what: str = "batch size") -> int:
        return micro_batch(global_batch, self.ctx, self.grad_accum, what)

    def slots(self) -> int:
        return data_slots(self.ctx, self.grad_accum)

    def slot(self, micro: int) -> int:
        return data_slot(self.ctx, self.grad_accum, micro)

    def prepare(
        self,
        *modules: torch.nn.Module | None,
        keep_whole: tuple[torch.nn.Module, ...] = (),
        cast_inputs: bool = True,
    ) -> None:
        """Rank 0's weights and buffers on every rank, then (FSDP) each module sharded as its own root
        (``keep_whole`` and ``cast_inputs``: see ``shard_module``)."""
        for module in modules:
            if module is not None:
                broadcast_parameters(module, self.ctx)
        if not self.fsdp:
            return
        if self._mesh is None:
            self._mesh = cpu_or_device_mesh(self.ctx)
        for module in modules:
            if module is not None:
                shard_module(module, self.ctx, self.options, self._mesh, keep_whole, cast_inputs)

    def backward(self, loss: torch.Tensor, *modules: torch.nn.Module | None) -> None:
        """``loss.backward()``; under FSDP the trained ``modules``' gathered parameters get zero gradients first
        where the data left them unused (``fill_missing_grads``)."""
        if self.fsdp:
            fill_missing_grads(*modules)
        loss.backward()

    def finish_gradients(self, params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
        """Mean over ranks (replicated: one all-reduce; FSDP2 reduced in every backward), then clipping;
        returns the global gradient norm when clipping."""
        if not self.fsdp:
            average_gradients(params, self.ctx)
        return clip_grad_norm(params, max_norm) if max_norm else None

    def after_step(self, *modules: torch.nn.Module | None) -> None:
        if self.fsdp:
            reshard(*modules)

    def full_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return full_state_dict(module)

    def scalars(self) -> dict[str, object]:
        """What a checkpoint records of the split (resume needs the same processes x accumulation)."""
        return {"world_size": self.ctx.world_size, "grad_accum": self.grad_accum, "fsdp": self.fsdp}

    def save(self, directory, modules: dict[str, torch.nn.Module], optimizer, scalars: dict, keep: int | None = None):
        """Sharded (every rank writes) under FSDP, else rank 0 writes safetensors; ``modules["student"]`` (or
        the only module) owns ``optimizer``."""
        from .checkpoint import save_checkpoint, save_sharded_checkpoint

        scalars = dict(scalars, **self.scalars())
        if self.fsdp:
            return save_sharded_checkpoint(directory, modules, optimizer, scalars, self.ctx.rank, keep)
        if not self.ctx.is_main:
            return None
        return save_checkpoint(directory, modules, optimizer, scalars, keep=keep)

    def load(self, directory, modules: dict[str, torch.nn.Module], optimizer) -> dict:
        """Restores ``modules`` and ``optimizer`` from a checkpoint ``step-N/``, or from the latest one of a run
        directory (``<out>`` or ``<out>/checkpoints``); returns its scalars. Sharded and replicated checkpoints
        resume only as they were written, and with the same processes x accumulation."""
        from pathlib import Path

        from .checkpoint import (
            STATE_NAME,
            is_sharded_checkpoint,
            latest_checkpoint,
            load_checkpoint,
            load_sharded_checkpoint,
        )

        directory = Path(directory)
        if not (directory / STATE_NAME).is_file():
            runs = directory if directory.name == "checkpoints" else directory / "checkpoints"
            directory = latest_checkpoint(runs) or directory
        if not (directory / STATE_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not a training checkpoint (no {STATE_NAME}) nor a run with one")
        sharded = is_sharded_checkpoint(directory)
        if sharded != self.fsdp:
            raise ValueError(
                f"{directory} is a {'sharded (--fsdp)' if sharded else 'replicated'} checkpoint: resume it "
                f"{'with' if sharded else 'without'} --fsdp"
            )
        if sharded:
            scalars = load_sharded_checkpoint(directory, modules, optimizer, self.ctx.rank)
        else:
            scalars = load_checkpoint(directory, modules, optimizer)
        slots = scalars.get("world_size", 1) * scalars.get("grad_accum", 1)
        if slots != self.slots():
            raise ValueError(
                f"{Path(directory)} was written by {scalars.get('world_size', 1)} process(es) x accumulation "
                f"{scalars.get('grad_accum', 1)}; resume with the same product (got {self.ctx.world_size} x "
                f"{self.grad_accum}) so that the batch slices and their random streams match"
            )
        return scalars
