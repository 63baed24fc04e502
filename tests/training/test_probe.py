"""`omnistream train probe`: linear classification and depth probes on a frozen debug backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from omnistream_cli.main import main
from omnistream_train.probe import ProbeConfig, class_folder_split, depth_frames, run_probe


def _class_folders(root, per_class=15):
    rng = np.random.default_rng(0)
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(np.array(colour) + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")


def test_classification_probe_from_class_folders(tmp_path, capsys):
    _class_folders(tmp_path / "images")
    names, train, val = class_folder_split(tmp_path / "images")
    assert names == ["blue", "red"] and len(train) == 24 and len(val) == 6  # every 5th image held out
    out = tmp_path / "probe"
    code = main(["train", "probe", "--task", "classification", "--images", str(tmp_path / "images"),
                 "--backbone", "debug", "--out", str(out), "--no-progress", "--threads", "1"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "probe.json").read_text())
    assert [r["lr"] for r in result["rows"]] == ProbeConfig.from_preset("debug", "classification").lrs
    assert result["best"]["top1"] >= 5 / 6  # colour classes: far above chance (0.5) on held-out images
    assert "| learning rate | top-1" in (out / "report.md").read_text() and "best: top-1" in capsys.readouterr().out
    head = load_file(out / "probe_head.safetensors")
    assert head["weight"].shape == (2, 2 * 64)  # [CLS, mean patch] of the debug backbone -> 2 classes


def test_depth_probe_dpt_beats_a_constant_and_the_backbone_stays_frozen(tmp_path):
    from omnistream_perception.model import OmniStreamModel

    torch.manual_seed(0)
    backbone = tmp_path / "backbone"
    OmniStreamModel.from_preset("debug").save_pretrained(backbone)
    before = {k: v.clone() for k, v in OmniStreamModel.from_pretrained(backbone).state_dict().items()}
    config = ProbeConfig.from_preset("debug", "depth", head="dpt", lrs=[1e-2])
    result = run_probe(config, str(backbone), tmp_path / "out", device="cpu", progress=False)

    rgb, depth = depth_frames(config, None)
    n_val = result["val_frames"]
    constant = depth[:-n_val][depth[:-n_val] > 0].median()
    gt = depth[-n_val:][depth[-n_val:] > 0]
    baseline = float(torch.sqrt(((gt - constant) ** 2).mean()))
    assert result["best"]["rmse"] < 0.8 * baseline, (result["best"], baseline)
    after = OmniStreamModel.from_pretrained(backbone).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    linear = run_probe(ProbeConfig.from_preset("debug", "depth"), "debug", tmp_path / "lin", device="cpu",
                       progress=False)  # fmt: skip
    assert {r["lr"] for r in linear["rows"]} == {1e-2, 1e-3} and np.isfinite(linear["best"]["rmse"])


def test_probe_errors(tmp_path, capsys):
    assert main(["train", "probe", "--task", "classification", "--backbone", "debug", "--out", str(tmp_path)]) == 2
    assert "--images" in capsys.readouterr().err
    (tmp_path / "one" / "cls").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "one" / "cls" / "a.png")
    assert main(["train", "probe", "--task", "classification", "--images", str(tmp_path / "one"), "--backbone",
                 "debug", "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "at least two class folders" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown probe preset"):
        ProbeConfig.from_preset("huge", "depth")
