"""Training checkpoints that resume exactly, without pickle.

A checkpoint is a directory ``step-000010/`` holding one safetensors file per module state
(``<name>.safetensors``), the optimiser's tensors (``optimizer.safetensors``, keys
``state.<param index>.<field>``), the torch RNG state (``rng.safetensors``) and ``trainer_state.json`` with
every scalar: step, optimiser hyper-parameters per group, scheduler position, world size, config. Data order
and augmentation are pure functions of (seed, step, rank) (``data.sample_indices``), so step + RNG is all
the run needs to continue bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

STATE_NAME = "trainer_state.json"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, fields in state["state"].items():
        for name, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [dict(g) for g in state["param_groups"]]
    return _contiguous(tensors), {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    directory: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scalars: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Writes atomically (a temporary directory renamed into place); keeps the newest ``keep`` siblings."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        save_model(module, str(tmp / f"{name}.safetensors"))  # handles tied weights (LM embeddings/head)
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    _publish(tmp, directory, dict(scalars, optimizer=opt_meta), keep)
    return directory


def _publish(tmp: Path, directory: Path, payload: dict[str, Any], keep: int | None) -> None:
    """Writes ``trainer_state.json`` last, renames the finished ``tmp`` into place, keeps the newest ``keep``."""
    (tmp / STATE_NAME).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    if keep:
        siblings = sorted(p for p in directory.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in siblings[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    directory: str | Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restores modules, optimiser and RNG in place; returns the scalars of ``trainer_state.json``."""
    directory = Path(directory)
    if not (directory / STATE_NAME).is_file():
        raise FileNotFoundError(f"{directory} is not a training checkpoint (no {STATE_NAME})")
    scalars = json.loads((directory / STATE_NAME).read_text())
    for name, module in modules.items():
        path = directory / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {directory} has no {path.name}; was it written by another objective set?"
            )
        load_model(module, str(path), strict=True)
    if optimizer is not None:
        optimizer_from_tensors(optimizer, load_file(str(directory / "optimizer.safetensors")), scalars["optimizer"])
    torch.set_rng_state(load_file(str(directory / "rng.safetensors"))["torch_cpu"])
    return scalars


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    found = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file())
    return found[-1] if found else None


def resume_checkpoint(
    resume: str | Path, modules: dict[str, torch.nn.Module], optimizer, world_size: int, grad_accum: int = 1
) -> int:
    """Loads what ``--resume`` names (a checkpoint, or a run directory: its latest checkpoint) into ``modules`` and
    ``optimizer`` and returns its step; ValueError when another number of processes (or another accumulation)
    wrote it (the data order and the optimiser state are per process)."""
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        path = latest_checkpoint(path / "checkpoints") or path
    scalars = load_checkpoint(path, modules, optimizer)
    if scalars.get("world_size", 1) != world_size:
        raise ValueError(f"{path} was written by {scalars['world_size']} processes; resume with as many")
    if scalars.get("grad_accum", 1) != grad_accum:
        raise ValueError(f"{path} was written with accumulation {scalars['grad_accum']}; resume with the same")
    return int(scalars["step"])


# ------------------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP2): torch.distributed.checkpoint, every rank writes its own shards
# ------------------------------------------------------------------------------------------------------
SHARDS_NAME = "shards"  # the DCP directory inside step-N/ (its .metadata says which rank holds what)


def is_sharded_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / SHARDS_NAME / ".metadata").is_file()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _dcp_state(modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {f"model.{name}": get_model_state_dict(m) for name, m in modules.items()}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(_optimizer_owner(modules), optimizer)
    return state


def _optimizer_owner(modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """The module whose parameters the optimiser holds: ``modules["student"]``, or the only module."""
    return modules["student"] if "student" in modules else next(iter(modules.values()))


def save_sharded_checkpoint(
    directory: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scalars: dict[str, Any],
    rank: int,
    keep: int | None = None,
) -> Path:
    """A collective: every rank writes its shards of the modules and of the optimiser (``optimizer`` must
    belong to ``modules["student"]`` or to the only module) into ``step-N/shards`` and its RNG into ``rng.rank<r>.safetensors``;
    rank 0 writes ``trainer_state.json`` and renames the finished directory into place (shared filesystem)."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_dcp_state(modules, optimizer), checkpoint_id=str(tmp / SHARDS_NAME))
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / f"rng.rank{rank}.safetensors"))
    _barrier()
    if rank == 0:
        _publish(tmp, directory, dict(scalars, format="dcp"), keep)
    _barrier()
    return directory


def load_sharded_checkpoint(
    directory: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    rank: int,
) -> dict[str, Any]:
    """Restores sharded modules, optimiser and this rank's RNG in place (a collective); returns the scalars."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    directory = Path(directory)
    if not is_sharded_checkpoint(directory):
        raise FileNotFoundError(
            f"{directory} is not a sharded (--fsdp) checkpoint; resume it without --fsdp, or pass a checkpoint "
            "written with --fsdp"
        )
    scalars = json.loads((directory / STATE_NAME).read_text())
    state = _dcp_state(modules, optimizer)
    dcp.load(state, checkpoint_id=str(directory / SHARDS_NAME))
    for name, module in modules.items():
        set_model_state_dict(module, state[f"model.{name}"])
    if optimizer is not None:
        set_optimizer_state_dict(_optimizer_owner(modules), optimizer, state["optimizer"])
    rng = directory / f"rng.rank{rank}.safetensors"
    if rng.is_file():
        torch.set_rng_state(load_file(str(rng))["torch_cpu"])
    return scalars


def load_sharded_weights(directory: str | Path, name: str, module: torch.nn.Module) -> None:
    """One module's weights out of a sharded checkpoint into a plain module, in ONE process (no torchrun):
    how a sharded run's state is inspected or compared on a single machine."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {f"model.{name}": module.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(Path(directory) / SHARDS_NAME), no_dist=True)
    module.load_state_dict(state[f"model.{name}"])
