"""`omnistream vla init|info` and `omnistream bench vla`: files written, loadable, JSON numbers, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from omnistream_cli.main import main


def test_vla_init_writes_a_policy_that_loads_and_acts(tmp_path, fixture_a, capsys):
    out = tmp_path / "policy"
    assert main(["vla", "init", "--preset", "debug", "--backbone", str(fixture_a), "--out", str(out)]) == 0
    assert "wrote debug policy" in capsys.readouterr().out
    from omnistream_vla.policy import OmniStreamVLAPolicy

    policy = OmniStreamVLAPolicy.from_pretrained(out)
    assert policy.config.backbone == "backbone" and policy.config.vision_hidden_size == 64
    obs = {"observation.images.static": torch.rand(1, 3, 48, 80), "task": ["open the drawer"]}  # resized to 64
    action = policy.select_action(obs)
    assert action.shape == (1, 7) and torch.isfinite(action).all() and action[0, 6].abs() == 1
    assert main(["vla", "info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["llm"] == "weights"
    # An existing directory is not overwritten by accident.
    assert main(["vla", "init", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["vla", "init", "--preset", "huge", "--out", "{tmp}/a"], "unknown VLA preset"),
        (["vla", "init", "--backbone", "{tmp}/missing", "--out", "{tmp}/b"], "no such directory"),
        (["vla", "init", "--stats", "{tmp}/stats.json", "--out", "{tmp}/c"], "no such file"),
        (["vla", "info", "{tmp}"], "config.json"),
        (["bench", "vla", "--dtype", "float8"], "--dtype"),
    ],
)
def test_vla_cli_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_vla_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    argv = ["bench", "vla", "--preset", "debug,demo", "--repeats", "2", "--chunks", "2", "--json", str(path)]
    assert main(argv) == 0
    report = json.loads(path.read_text())
    r = report["results"]["debug"]
    assert r["chunk_size"] == 4 and r["visual_tokens"] == 4
    for way in ("full", "reuse"):  # side by side: the whole prompt vs the reused prefix
        assert r[way]["chunk_ms"] > 0 and r[way]["step_ms_amortised"] > 0
        # The chunk queue: most steps only pop, so the amortised step is far cheaper than the worst one.
        assert r[way]["step_ms_amortised"] < r[way]["step_ms_max"]
    assert r["speedup"]["chunk"] > 0 and r["max_abs_diff"] <= 1e-5
    assert r["prefix_tokens"] > 0 and r["sequence_tokens"] > r["prefix_tokens"] + r["visual_tokens"]
    assert r["step_tokens"] == r["sequence_tokens"] - r["prefix_tokens"]  # images first: only the system prefix
    demo = report["results"]["demo"]
    assert demo["instruction_first"] and demo["visual_tokens"] == 64
    assert demo["step_tokens"] == demo["visual_tokens"] + 2  # the images, the state token and the action query
    assert r["tokenize_cached_ms"] < r["tokenize_ms"]


def test_vla_init_on_a_truncated_backbone_is_one_clear_error(tmp_path, fixture_a, capsys):
    backbone = tmp_path / "backbone"
    shutil.copytree(fixture_a, backbone)
    weights = backbone / "model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy
    assert main(["vla", "init", "--backbone", str(backbone), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(weights) in err  # names the damaged file


def test_vla_init_offline_fails_at_once_saying_to_pass_a_local_directory(tmp_path):
    """No network (a hub endpoint that refuses connections) and an empty cache: one line naming --llm, exit 2."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))  # port 9: nothing listens
    result = subprocess.run(
        [sys.executable, "-m", "omnistream_cli.main", "vla", "init", "--preset", "qwen2.5-0.5b",
         "--out", str(tmp_path / "policy")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--llm DIR" in lines[0] and "Qwen/Qwen2.5-0.5B" in lines[0]
