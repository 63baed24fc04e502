"""`omnistream train pretrain` / `train heads`: objectives run, loss falls, checkpoints resume exactly, DDP ranks agree.

Fast (make test): single process, few steps, 32 px. Slow (make test-all): the issue's 2-process torchrun run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnistream_cli.main import main
from omnistream_train.metrics import read_metrics

FAST = ["--threads", "1", "--no-progress", "--set", "stages=[[0,32]]"]


def _run(argv: list[str]) -> int:
    return main(["train", *argv])


def test_pretrain_fast_all_objectives_and_exact_resume(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert (
        _run(["pretrain", "--preset", "debug", "--max-steps", "6", "--save-every", "3", "--out", str(full), *FAST]) == 0
    )
    rows = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in (
        "loss",
        "ssl",
        "img_dino",
        "img_ibot",
        "img_koleo",
        "img_gram",
        "vid_dino",
        "vid_ibot",
        "geo",
        "depth",
        "ray",
        "points",
        "camera",
        "cap",
    ):
        assert all(r[key] is not None for r in rows), key
    # every logged total is the paper's weighting of the logged objectives
    for r in rows:
        assert r["loss"] == pytest.approx(0.1 * r["ssl"] + r["geo"] + r["cap"], rel=1e-6)
    assert rows[-1]["geo"] < rows[0]["geo"] and rows[-1]["cap"] < rows[0]["cap"]
    # the export: backbone in the authors' layout, heads beside it, captioner
    from omnistream_perception.model import OmniStreamModel
    from omnistream_perception.model.heads import GeometryHeads

    backbone = OmniStreamModel.from_pretrained(full / "backbone")
    heads = GeometryHeads.from_pretrained(full / "backbone")
    out = backbone(torch.zeros(1, 2, 3, 32, 32), camera_token=True, output_hidden_states=heads.layers)
    assert heads(out, (32, 32))["depth"].shape == (1, 2, 32, 32)
    assert (full / "backbone" / "captioner" / "language_model" / "config.json").is_file()
    assert (full / "checkpoints" / "step-000003" / "optimizer.safetensors").is_file()

    # restart from the step-3 checkpoint: steps 4..6 repeat exactly
    assert _run(["pretrain", "--preset", "debug", "--max-steps", "6", "--out", str(resumed),
                 "--resume", str(full / "checkpoints" / "step-000003"), *FAST]) == 0  # fmt: skip
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == [4, 5, 6]
    for a, b in zip(rows[3:], again):
        assert a == b
    digest_full = json.loads((full / "rank_weights_sha256.json").read_text())
    digest_resumed = json.loads((resumed / "rank_weights_sha256.json").read_text())
    assert digest_full == digest_resumed


def test_pretrain_objectives_switch_off(tmp_path):
    out = tmp_path / "geo_only"
    argv = ["pretrain", "--preset", "debug", "--max-steps", "2", "--save-every", "0", "--out", str(out), *FAST]
    assert _run([*argv, "--no-ssl-images", "--no-ssl-videos", "--no-captioning"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert "geo" in rows[0] and "ssl" not in rows[0] and "cap" not in rows[0]
    assert rows[0]["loss"] == pytest.approx(rows[0]["geo"])
    assert not (out / "backbone" / "captioner").exists()


def test_pretrain_bad_input_is_a_user_error(tmp_path, capsys):
    assert _run(["pretrain", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown pretraining preset" in capsys.readouterr().err
    assert _run(["pretrain", "--preset", "debug", "--out", str(tmp_path), "--set", "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
    assert (
        _run(
            [
                "pretrain",
                "--out",
                str(tmp_path),
                "--no-ssl-images",
                "--no-ssl-videos",
                "--no-geometry",
                "--no-captioning",
            ]
        )
        == 2
    )
    assert "every objective is switched off" in capsys.readouterr().err
    assert _run(["pretrain", "--out", str(tmp_path), "--geometry", str(tmp_path / "missing")]) == 2


@pytest.mark.margin
def test_heads_probe_frozen_backbone_and_save_beside_it(tmp_path, seed, margin):
    from omnistream_perception.model import OmniStreamModel
    from omnistream_perception.model.heads import GeometryHeads

    torch.manual_seed(seed)
    ckpt = OmniStreamModel.from_preset("debug").save_pretrained(tmp_path / "ckpt")
    before = (ckpt / "model.safetensors").read_bytes()
    assert _run(["heads", "--checkpoint", str(ckpt), "--preset", "debug", "--max-steps", "12", "--save-every", "0",
                 "--out", str(tmp_path / "log"), "--threads", "1", "--no-progress", "--seed", str(seed)]) == 0  # fmt: skip
    assert GeometryHeads.present(ckpt)
    GeometryHeads.from_pretrained(ckpt)
    assert (ckpt / "model.safetensors").read_bytes() == before  # the backbone is untouched
    rows = read_metrics(tmp_path / "log" / "metrics.jsonl")
    first, last = (sum(r["geo"] for r in part) / 3 for part in (rows[:3], rows[-3:]))
    margin("geometry loss fall (first 3 / last 3 steps)", first / last, 1.1, baseline=1.0)
    assert set(rows[0]) >= {"step", "loss", "depth", "ray", "points", "camera"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *extra: str) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    omnistream = shutil.which("omnistream") or str(Path(sys.executable).with_name("omnistream"))
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), omnistream, "train", "pretrain",
           "--preset", "debug", "--max-steps", "20", "--batch-size", "4", "--out", str(out), "--threads", "1", "--no-progress",
           *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.margin
def test_torchrun_two_processes_loss_falls_ranks_agree_and_resume_is_exact(tmp_path, margin):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _torchrun(full)
    rows = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("ssl", "geo", "cap"):
        assert all(r[key] is not None for r in rows), key
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    margin("loss fall (first 5 / last 5 steps)", first / last, 1.0, baseline=1.0)
    digests = json.loads((full / "rank_weights_sha256.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold identical weights
    _torchrun(resumed, "--resume", str(full / "checkpoints" / "step-000010"))
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == list(range(11, 21))
    assert [r["loss"] for r in again] == [r["loss"] for r in rows[10:]]
    assert json.loads((resumed / "rank_weights_sha256.json").read_text()) == digests


def test_pretrain_backbone_can_start_from_dinov3_weights(tmp_path):
    from safetensors.torch import save_file

    from omnistream_perception.model import OmniStreamModel
    from omnistream_train.config import PretrainConfig
    from omnistream_train.pretrain import build_backbone

    torch.manual_seed(3)
    source = OmniStreamModel.from_preset("debug")
    original = {}  # the same weights under DINOv3's original names
    for key, value in source.state_dict().items():
        name = key.removeprefix("patch_embed.")
        if name == "register_token":
            original["storage_tokens"] = value[:, 0]
        elif name.startswith("post_layernorm."):
            original["norm." + name.split(".")[1]] = value
        elif name != "camera_token" and not name.startswith("ar_embedder"):
            original[name] = value
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "dinov3.safetensors"))
    built = build_backbone(PretrainConfig.from_preset("debug", init_dinov3=str(tmp_path / "dinov3.safetensors")))
    for key, value in source.state_dict().items():
        if "camera_token" not in key and "ar_embedder" not in key and "register_token" not in key:
            assert torch.equal(built.state_dict()[key], value), key
    # DINOv3's one set of registers seeds both the first-frame and the later-frame registers
    registers = built.patch_embed.register_token
    assert torch.equal(registers[:, 0], source.patch_embed.register_token[:, 0])
    assert torch.equal(registers[:, 1], source.patch_embed.register_token[:, 0])
