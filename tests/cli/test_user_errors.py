"""Start-up mistakes a user can act on: one line that says what to fix, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from omnistream_cli.main import main


@pytest.mark.parametrize("checkpoint", ["/nonexistent", "outputs/typo/backbone", "./backbone"])
def test_train_heads_with_a_missing_checkpoint_says_so(checkpoint, capsys):
    assert main(["train", "heads", "--checkpoint", checkpoint]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {checkpoint}: no such directory" in err
    assert "--save-to" not in err


@pytest.mark.ros
@pytest.mark.parametrize(
    "module",
    ["omnistream_perception.ros.perception_node", "omnistream_vla.ros.vla_node", "omnistream_vla.ros.recorder_node"],
)
def test_node_with_a_missing_params_file_is_one_fatal_line(module, tmp_path):
    pytest.importorskip("rclpy", reason="rclpy is not installed (make setup)")
    missing = tmp_path / "missing.yaml"
    result = subprocess.run(
        [sys.executable, "-m", module, "--ros-args", "--params-file", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "FATAL" in lines[0] and f"params file not found: {missing}" in lines[0]
