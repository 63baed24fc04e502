"""The stack's CPU threading policy: degrade gracefully when other processes want the same cores.

A robot shares its CPU with drivers, a workstation with a second job. OpenMP's default makes idle worker
threads spin before they sleep; when another busy process holds one of the cores, the spinning thread and the
thread that has work fight for it, and a 2-thread op on 2 cores ran 3.2x slower with one competing process
(measured; losing one of two cores is 2x). Passive waiting lets the waiting thread sleep at once.

The policy, applied by every entry point of the stack (the ``omnistream`` command, the nodes) before torch loads:
- ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it;
- intra-op threads = the cores this process may run on (its CPU affinity, not the machine's count), divided by the
  processes started on this host by torchrun (``LOCAL_WORLD_SIZE``); ``--threads`` / ``OMP_NUM_THREADS`` override.

OpenMP reads its environment once, when torch loads its runtime, so ``apply_environment_defaults`` only helps
when it runs before ``import torch``: the packages' ``__init__`` modules call it for that reason.
"""

from __future__ import annotations

import os

ENVIRONMENT_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_environment_defaults() -> None:
    """Set the policy's environment variables that the user has not set (call before importing torch)."""
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def available_cores() -> int:
    """Cores this process may run on (affinity, cgroup-pinned containers included where the kernel says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Intra-op threads for one process: ``OMP_NUM_THREADS`` if set, else its share of the available cores."""
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1").strip()
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, available_cores() // processes)


def configure_torch_threads(threads: int | None = None) -> int:
    """Apply the policy to torch (``threads`` overrides it); returns the thread count in use."""
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    count = threads or default_threads()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
