"""Bad start-up configurations of perception_node, started as a user would (console script, ``--ros-args``): each
ends with exit code 2 and one FATAL line that names the problem, never a traceback.

The node processes of all cases start together (module fixture), so the suite pays one torch import's wall time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy is not installed (make setup)")

from test_perception_node_process import _perception_node_command  # noqa: E402

pytestmark = pytest.mark.ros


def _copy(fixture: Path, directory: Path, heads: bool = False) -> Path:
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixture / name, directory / name)
        os.chmod(directory / name, 0o644)
    if heads:
        from omnistream_perception.model import OmniStreamModel
        from omnistream_perception.model.heads import GeometryHeads, GeometryHeadsConfig

        config = OmniStreamModel.from_pretrained(fixture).config
        GeometryHeads(GeometryHeadsConfig.for_backbone(config.hidden_size, config.depth, "tiny")).save_pretrained(
            directory
        )
    return directory


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _set(data: dict, key: str, value) -> dict:
    data[key] = value
    return data


# case -> (how to break a copy of the fixture, extra parameters, words the FATAL line must contain)
CASES = {
    "truncated_model": (lambda d: _truncate(d / "model.safetensors"), [], ["model.safetensors", "not a valid"]),
    "empty_model": (lambda d: (d / "model.safetensors").write_bytes(b""), [], ["model.safetensors", "not a valid"]),
    "bad_header_model": (
        lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"not a header"),
        [],
        ["model.safetensors", "not a valid"],
    ),
    "config_is_a_list": (lambda d: (d / "config.json").write_text("[1, 2]"), [], ["config.json", "JSON object"]),
    "string_hidden_size": (
        lambda d: _edit_json(d / "config.json", lambda c: _set(c, "hidden_size", "64")),
        [],
        ["hidden_size", "integer", "'64'"],
    ),
    "truncated_heads": (
        lambda d: _truncate(d / "geometry_heads.safetensors"),
        [],
        ["geometry_heads.safetensors", "not a valid"],
    ),
    "empty_heads": (
        lambda d: (d / "geometry_heads.safetensors").write_bytes(b""),
        [],
        ["geometry_heads.safetensors", "not a valid"],
    ),
    "bad_header_heads": (
        lambda d: (d / "geometry_heads.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json}......"),
        [],
        ["geometry_heads.safetensors", "not a valid"],
    ),
    "unknown_heads_key": (
        lambda d: _edit_json(d / "geometry_heads.json", lambda c: _set(c, "bogus_key", 1)),
        [],
        ["geometry_heads.json", "bogus_key"],
    ),
    "empty_checkpoint_dir": (
        lambda d: [p.unlink() for p in d.iterdir()],
        [],
        ["missing config.json"],
    ),
    "device_cuda": (None, ["device:=cuda"], ["device 'cuda'", "cpu"]),
    "device_cuda_7": (None, ["device:=cuda:7"], ["device 'cuda:7'"]),
    "window_abc": (None, ["window:=abc"], ["window must be an integer", "'abc'"]),
    "empty_checkpoint": (None, ["checkpoint:=''"], ["checkpoint is required"]),
    # nothing after ':=' is refused by rcl's own parser, which would print its ERROR before ours
    "checkpoint_without_value": (None, ["checkpoint:="], ["'checkpoint' has no value"]),
}
HEADS_CASES = {"truncated_heads", "empty_heads", "bad_header_heads", "unknown_heads_key"}


@pytest.fixture(scope="module")
def results(fixture_a, tmp_path_factory):
    """Starts one node per case, all at once; returns case -> (exit code, output)."""
    import torch

    root = tmp_path_factory.mktemp("broken")
    processes = {}
    for case, (damage, params, _) in CASES.items():
        if case.startswith("device") and torch.cuda.is_available():
            continue  # the device exists here: not a configuration error
        checkpoint = fixture_a
        if damage is not None:
            checkpoint = _copy(fixture_a, root / case, heads=case in HEADS_CASES)
            damage(checkpoint)
        args = ["-p", f"checkpoint:={checkpoint}"]
        for param in params:
            args += ["-p", param]
        command = [_perception_node_command(), "--ros-args", *args]
        processes[case] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {}
    for case, process in processes.items():
        try:
            output, _ = process.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0] + "\n(killed after 180 s: the node kept running)"
        out[case] = (process.returncode, output)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_start_up_configuration_is_one_fatal_line_and_exit_2(results, case):
    if case not in results:
        pytest.skip("this machine has CUDA: the device exists")
    returncode, output = results[case]
    lines = [line for line in output.splitlines() if line.strip()]
    assert returncode == 2, f"exit code {returncode}:\n{output}"
    assert len(lines) == 1 and "[FATAL]" in lines[0], output
    assert "Traceback" not in output
    for words in CASES[case][2]:
        assert words in lines[0], f"{words!r} not in {lines[0]!r}"
