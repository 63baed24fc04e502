"""The VLA recipe (paper C.4, VLM4VLA) in `train vla`: the `paper` preset's choices, its traps, and the options
behind them (schedule, head initialisation, random shift, accumulation), on tiny synthetic CALVIN splits.

Two short `train vla` runs (debug preset, 64 px frames, a few steps) on one synthetic CALVIN split, read directly
and through `data calvin-to-lerobot`, serve the bounds test and the two-camera evaluation test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from calvin_split import write_calvin_split

from omnistream_cli.main import main
from omnistream_train.augment import random_shift
from omnistream_train.vla import VLATrainConfig, lr_multiplier, warmup_length, xavier_init

TWO_CAMERAS = '["static", "gripper"]'
SMALL = '{"image_size": 64}'


def _train(dataset, out, *extra) -> int:
    return main(["train", "vla", "--preset", "debug", "--dataset", str(dataset), "--out", str(out), "--threads", "1",
                 "--no-progress", "--set", f"policy_overrides={SMALL}", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def calvin(tmp_path_factory):
    """A CALVIN split, its LeRobot conversion, and a two-camera debug policy trained on each (2 steps)."""
    root = tmp_path_factory.mktemp("calvin")
    split = root / "task_D_D" / "training"
    write_calvin_split(split, [(0, 5), (6, 11)], ["open the drawer", "push the button"])
    lerobot = root / "lerobot"
    assert main(["data", "calvin-to-lerobot", str(split), "--out", str(lerobot)]) == 0
    torch.set_num_threads(1)
    for name, dataset in (("from_split", split), ("from_lerobot", lerobot)):
        assert _train(dataset, root / name, "--max-steps", "2", "--batch-size", "4",
                      "--set", f"cameras={TWO_CAMERAS}") == 0  # fmt: skip
    return {"split": split, "lerobot": lerobot, "root": root}


# ------------------------------------------------------------------------------------------------ traps
def test_paper_preset_without_backbone_is_refused_in_one_line(tmp_path, capsys):
    code = main(["train", "vla", "--preset", "paper", "--dataset", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--backbone" in err and "--random-backbone" in err and "large" in err
    # opting in passes the check (the run itself would need a GPU); the debug backbone needs no opt-in
    VLATrainConfig.from_preset("paper", random_backbone=True).check_backbone()
    VLATrainConfig.from_preset("paper", backbone="some/dir").check_backbone()
    VLATrainConfig.from_preset("debug").check_backbone()
    with pytest.raises(ValueError, match="random-backbone"):
        VLATrainConfig.from_preset("debug", backbone_preset="small").check_backbone()


def test_lerobot_converted_from_calvin_gets_the_calvin_bounds_and_units(calvin):
    from omnistream_vla.policy import OmniStreamVLAPolicy

    info = json.loads((calvin["lerobot"] / "meta" / "info.json").read_text())
    assert info["omnistream"] == {"source": "calvin", "action_key": "rel_actions"}
    direct = OmniStreamVLAPolicy.from_pretrained(calvin["root"] / "from_split" / "policy")
    converted = OmniStreamVLAPolicy.from_pretrained(calvin["root"] / "from_lerobot" / "policy")
    actions = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (50, 7))).float()
    a, b = direct.normalizer.normalize(actions), converted.normalizer.normalize(actions)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the recipe's bounds: +-0.65 -> [-1, 1] (actions beyond them are clipped), not the data's min/max
    assert torch.allclose(a[:, :6], (actions[:, :6] / 0.65).clamp(-1, 1), atol=1e-6)
    assert direct.config.action_convention == converted.config.action_convention
    assert "calvin" in json.dumps(converted.config.action_convention)


def test_a_two_camera_calvin_policy_runs_through_the_calvin_evaluation(calvin):
    from omnistream_sim.calvin.protocol import evaluate_chain
    from omnistream_sim.calvin.sequences import EvalChain
    from omnistream_sim.policies import VLACheckpointPolicy

    class NeverSolvedCalvinEnvDouble:
        """calvin_env's interface with CALVIN's camera sizes; no subtask is ever solved."""

        def __init__(self):
            self.steps = 0

        def get_obs(self):
            rng = np.random.default_rng(self.steps)
            rgb = {"rgb_static": rng.integers(0, 255, (200, 200, 3), dtype=np.uint8),
                   "rgb_gripper": rng.integers(0, 255, (84, 84, 3), dtype=np.uint8)}  # fmt: skip
            return {"rgb_obs": rgb, "robot_obs": np.zeros(15), "scene_obs": np.zeros(24)}

        def reset(self, robot_obs=None, scene_obs=None):
            return self.get_obs()

        def get_info(self):
            return {}

        def step(self, action):
            assert np.asarray(action).shape == (7,)
            self.steps += 1
            return self.get_obs(), 0.0, False, {}

    class Oracle:
        def get_task_info_for_set(self, start_info, end_info, task_filter):
            return set()

    policy = VLACheckpointPolicy(calvin["root"] / "from_split" / "policy")
    assert policy.cameras == ("static", "gripper")
    chain = EvalChain(0, {}, ("open_drawer",) * 5, np.zeros(15), np.zeros(24), 0)
    env = NeverSolvedCalvinEnvDouble()
    record, _ = evaluate_chain(env, policy, Oracle(), chain, {"open_drawer": "open the drawer"}, ep_len=6)
    assert record["completed"] == 0 and record["steps"] == [6] and env.steps == 6


def test_a_calvin_camera_of_another_name_is_a_clear_error(calvin, tmp_path, capsys):
    assert _train(calvin["split"], tmp_path / "o", "--max-steps", "1", "--set", 'cameras=["wrist"]') == 2
    assert "CALVIN has the cameras ['static', 'gripper']" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the recipe
def test_the_paper_preset_follows_the_recipe():
    c = VLATrainConfig.from_preset("paper")
    assert (c.batch_size, c.grad_accum, c.epochs, c.lr, c.projector_lr, c.grad_clip) == (128, 2, 5, 2e-5, 1e-4, 1.0)
    assert (c.lr_schedule, c.warmup_epochs, c.head_init, c.require_vlm) == ("constant", 0.25, "xavier", True)
    assert c.shift_pads() == {"static": 10} and c.random_shift["gripper"] == 4
    assert not c.policy_overrides["prompt_template"].endswith("?") and c.policy_overrides["pool"] == 1
    # debug and demo keep their schedule, initialisation and cached features
    for name in ("debug", "demo"):
        d = VLATrainConfig.from_preset(name)
        assert (d.lr_schedule, d.head_init, d.grad_accum, d.require_vlm) == ("cosine", "default", 1, False)
        assert not any(d.shift_pads().values())


def test_constant_schedule_after_the_warmup():
    frames, batch = 1000, 8
    config = VLATrainConfig.from_preset("debug", batch_size=batch, warmup_epochs=0.25, lr_schedule="constant")
    warmup = warmup_length(config, frames)
    assert warmup == round(0.25 * frames / batch)  # a quarter of an epoch, in optimiser steps of the global batch
    total = 5 * frames // batch
    lrs = [lr_multiplier("constant", s, warmup, total, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(1 / warmup) and all(a < b for a, b in zip(lrs[: warmup - 1], lrs[1:warmup]))
    assert lrs[warmup - 1] == lrs[warmup] == lrs[-1] == 1.0  # at 0.25 epoch and at the end: the same rate
    cosine = [lr_multiplier("cosine", s, warmup, total, 0.1) for s in range(total)]
    assert cosine[-1] < 0.11 and cosine[warmup] > 0.99
    with pytest.raises(ValueError, match="lr_schedule"):
        VLATrainConfig.from_preset("debug", lr_schedule="linear")


def test_xavier_head_init_has_zero_biases_and_xavier_weights():
    from omnistream_vla.policy import OmniStreamVLAConfig
    from omnistream_vla.policy.modeling_omnistream_vla import ActionHead

    torch.manual_seed(0)
    head = ActionHead(OmniStreamVLAConfig.preset("debug", head_trunk_dim=256, head_branch_dims=(256, 256)), 512)
    xavier_init(head)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 + 3 + 3  # trunk, arm and gripper branches
    for m in linears:
        assert torch.count_nonzero(m.bias) == 0
        fan_out, fan_in = m.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert m.weight.abs().max() <= bound
        if m.weight.numel() > 10_000:  # uniform on [-bound, bound]: std bound / sqrt(3)
            assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # PyTorch's default (what debug/demo keep) has non-zero biases
    assert torch.count_nonzero(ActionHead(OmniStreamVLAConfig.preset("debug"), 64).trunk[0].bias) > 0


def test_random_shift_moves_each_image_within_the_pad_with_replicated_edges():
    h, w, pad = 32, 40, 10
    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    images = torch.stack([rows, cols, rows * 0 + 7]).unsqueeze(0).repeat(200, 1, 1, 1)  # each pixel names itself
    out = random_shift(images, pad, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    shifts = []
    for image in out:
        dy, dx = int(image[0, h // 2, w // 2]) - h // 2, int(image[1, h // 2, w // 2]) - w // 2
        assert abs(dy) <= pad and abs(dx) <= pad
        # the whole image is the original moved by (dy, dx), the border repeating the edge pixels
        assert torch.equal(image[0], (rows + dy).clamp(0, h - 1)) and torch.equal(image[1], (cols + dx).clamp(0, w - 1))
        assert torch.equal(image[2], images[0, 2])
        shifts += [dy, dx]
    assert min(shifts) == -pad and max(shifts) == pad and 0 in shifts  # every whole shift in [-pad, pad] occurs
    assert torch.equal(random_shift(images[:3], 0, torch.Generator()), images[:3])


def test_shifted_features_use_the_policy_encoder(tmp_path):
    from omnistream_train.vla import build_policy, encode_pixels

    config = VLATrainConfig.from_preset("debug", policy_overrides={"image_size": 64})
    stats = {k: np.zeros(7, np.float32) for k in ("min", "max", "mean", "std", "q01", "q99")}
    policy = build_policy(config, stats, torch.device("cpu"), bounds=(-1.0, 1.0))
    frames = np.random.default_rng(0).integers(0, 255, (3, 20, 20, 3), dtype=np.uint8)
    reference = policy.encode_images(frames)
    torch.testing.assert_close(encode_pixels(policy, policy.processor.preprocess_images(frames)), reference)


def test_recipe_options_train_on_the_debug_preset(calvin, tmp_path, capsys):
    """Random shift (features encoded per step), constant schedule after a 0.25-epoch warm-up, Xavier head,
    accumulation 2 and the missing-VLM warning, together on the debug preset."""
    out = tmp_path / "recipe"
    code = _train(calvin["split"], out, "--max-steps", "6", "--batch-size", "4", "--grad-accum", "2",
                  "--set", "random_shift=10", "--set", 'lr_schedule="constant"', "--set", "warmup_epochs=0.25",
                  "--set", 'head_init="xavier"', "--set", "require_vlm=true")  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "WARNING: no --init-vlm" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe_warnings"] and summary["init_vlm"] is None
    assert (summary["global_batch"], summary["micro_batch"], summary["grad_accum"]) == (4, 2, 2)
    assert summary["warmup_steps"] == 1  # 0.25 x 12 frames / 4 = 0.75 -> at least one step
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["lr"] == rows[-1]["lr"] == pytest.approx(2e-3)  # constant from the end of the warm-up
