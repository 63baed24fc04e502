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
    payload = dict(scalars)
    payload["optimizer"] = opt_meta
    (tmp / STATE_NAME).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    if keep:
        siblings = sorted(p for p in directory.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in siblings[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return directory


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
