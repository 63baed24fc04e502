"""Peak-memory measurement for benchmarks: CUDA allocator statistics, or resident memory on CPU.

On CPU, glibc is told to serve every large block with mmap (a fixed threshold), so freed tensors leave
the resident set at once and a sampling thread sees each call's real peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")
_M_MMAP_THRESHOLD = -3
_configured = False


def _pin_mmap_threshold() -> None:
    global _configured
    if _configured:
        return
    with contextlib.suppress(OSError):  # not glibc: measurements are then upper bounds
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    _configured = True


def resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def measure_peak(fn: Callable[[], Any], device: torch.device, interval: float = 0.0005) -> tuple[Any, int]:
    """Runs ``fn`` and returns (result, peak bytes in use during it, counting what was live before).

    ``interval``: seconds between resident-memory samples on CPU (coarser for long calls).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device)
    _pin_mmap_threshold()
    peak = resident_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak, resident_bytes())
