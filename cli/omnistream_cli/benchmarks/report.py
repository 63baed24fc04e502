"""What every benchmark command shares: the device label in its report and writing the report as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def device_label(device: torch.device) -> str:
    """The GPU's name, or ``cpu (N threads)`` (CPU timings depend on the thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def write_json_report(report: dict[str, Any], path: str | Path | None, console=None) -> None:
    """Writes ``report`` to ``path`` (parents created) when a path is given; says so on ``console``."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if console is not None:
        console.print(f"wrote {path}")
