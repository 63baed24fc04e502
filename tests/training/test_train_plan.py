"""`omnistream train vla --plan` (training/omnistream_train/plan.py): parameter counts match the built modules, and the memory
arithmetic says what a paper-scale run needs per GPU and per host."""

from __future__ import annotations

import pytest

from omnistream_cli.main import main
from omnistream_train.plan import GIB, count_vla_parameters, parse_bytes, plan_vla
from omnistream_train.vla import VLATrainConfig


def test_parse_bytes_units_and_errors():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes(1234) == 1234
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("eighty gigs")


def test_counts_match_the_built_debug_policy_and_backbone():
    from omnistream_perception.model import OmniStreamModel
    from omnistream_vla.policy import OmniStreamVLAConfig, OmniStreamVLAPolicy

    config = VLATrainConfig.from_preset("debug")
    counts = count_vla_parameters(config)
    backbone = OmniStreamModel.from_preset(config.backbone_preset)
    policy_config = OmniStreamVLAConfig.preset(
        config.policy_preset, **dict(config.policy_overrides, vision_hidden_size=backbone.config.hidden_size)
    )
    policy = OmniStreamVLAPolicy(policy_config)
    built = sum(p.numel() for p in policy.parameters())
    assert counts.trained + counts.llm_held == built
    real = sum(p.numel() for p in backbone.parameters())
    assert abs(counts.backbone - real) / real < 0.01  # small per-frame tokens aside


def test_paper_plan_on_8_x_80gb_needs_sharding_and_a_streamed_data_path():
    plan = plan_vla(VLATrainConfig.from_preset("paper"), 8, "80GB", "128GiB")
    c = plan.counts
    assert 7.0e9 < c.trained < 7.2e9  # Qwen2.5-7B without its LM head, + projector and action head
    replicated, fsdp = plan.per_gpu["replicated"], plan.per_gpu["fsdp2"]
    # replicated: 16 bytes per trained parameter on every GPU before activations, more than an 80 GB GPU holds
    assert replicated["gradients"] + replicated["optimizer"] == 12 * c.trained
    assert not plan.fits("replicated") and plan.fits("fsdp2") and plan.fits("zero2")
    state = [fsdp[k] for k in ("parameters", "gradients", "optimizer")]
    assert sum(state) < sum(replicated[k] for k in ("parameters", "gradients", "optimizer")) / 4
    # the in-RAM data path grows with the frames, the streamed one only by its frame index
    small = plan_vla(VLATrainConfig.from_preset("paper"), 8, "80GB", frames=20 * 500)
    assert not plan.host_fits("in-memory") and plan.host_fits("streamed")
    assert plan.host["in-memory"]["total"] / small.host["in-memory"]["total"] == pytest.approx(105)
    assert plan.host["streamed"]["total"] / small.host["streamed"]["total"] < 1.1


def test_more_gpus_shrink_only_the_sharded_state():
    # the global batch of 128 as 8 per GPU: accumulation 8 on 2 GPUs, 2 on 8 GPUs (the recipe)
    two = plan_vla(VLATrainConfig.from_preset("paper", grad_accum=8), 2, "80GB")
    eight = plan_vla(VLATrainConfig.from_preset("paper"), 8, "80GB")
    assert two.micro_batch == eight.micro_batch == 8
    assert two.per_gpu["replicated"]["total"] == eight.per_gpu["replicated"]["total"]
    assert eight.per_gpu["fsdp2"]["optimizer"] == pytest.approx(two.per_gpu["fsdp2"]["optimizer"] / 4)


def test_the_batch_is_global_and_must_divide_over_gpus_and_accumulation(capsys):
    plan = plan_vla(VLATrainConfig.from_preset("paper"), 8, "80GB")
    assert plan.micro_batch == 8  # 128 = 8 per GPU x 8 GPUs x accumulation 2 (paper C.4 Table 13)
    assert plan.tokens == 196 + 64 + 16 + 1  # 224 px unpooled (14 x 14 patches), instruction, template, query
    assert plan_vla(VLATrainConfig.from_preset("paper", grad_accum=1), 8, "80GB").micro_batch == 16
    with pytest.raises(ValueError, match="multiple of GPUs x accumulation"):
        plan_vla(VLATrainConfig.from_preset("paper"), 3, "80GB")
    assert main(["train", "vla", "--preset", "paper", "--plan", "--nproc", "3"]) == 2
    assert "multiple of GPUs x accumulation" in capsys.readouterr().err


def test_cli_plan_prints_the_table(capsys):
    assert main(["train", "vla", "--preset", "paper", "--plan", "--nproc", "8", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "replicated" in out and "fsdp2" in out and "fits" in out and "host memory" in out
    assert main(["train", "vla", "--preset", "paper", "--plan", "--gpu-memory", "lots"]) == 2
