"""FSDP2 training engine (training/distributed.py): global batch, sharded state, exactness, sharded checkpoints.

CPU, gloo, 2 ranks under torchrun, the tiny ``debug`` presets, geometry objectives only: their losses are per-sample
averages, so a global batch split over ranks or micro-batches is the same arithmetic up to float rounding (the SSL
objectives' KoLeo term is a per-micro-batch statistic and their crops are drawn per slice, so they are not).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_torchrun

from omnistream_cli.main import main
from omnistream_train.metrics import read_metrics

GEOMETRY = ["--no-ssl-images", "--no-ssl-videos", "--no-captioning", "--no-gram"]
FAST = ["--threads", "1", "--no-progress", "--set", "stages=[[0,32]]"]
STEPS = 20


def _pretrain_argv(out: Path, *extra: str) -> list[str]:
    return ["train", "pretrain", "--preset", "debug", "--max-steps", str(STEPS), "--save-every", "10",
            "--batch-size", "4", "--out", str(out), *GEOMETRY, *FAST, *extra]  # fmt: skip


def _losses(out: Path) -> list[float]:
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def _max_relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One process (global batch 4) and 2 FSDP ranks (micro-batch 2 each), 20 steps, checkpoints at 10 and 20."""
    root = tmp_path_factory.mktemp("fsdp")
    single, sharded = root / "single", root / "fsdp"
    assert main(_pretrain_argv(single)) == 0
    run_torchrun(*_pretrain_argv(sharded, "--fsdp"), timeout=300)
    return {"single": single, "fsdp": sharded, "root": root}


def test_global_batch_must_divide_processes_times_accumulation(tmp_path, capsys):
    from omnistream_train.distributed import DistributedContext, micro_batch

    assert micro_batch(128, DistributedContext(world_size=8), 2) == 8  # the recipe: 8 per GPU x 8 GPUs x 2
    with pytest.raises(ValueError, match="multiple of processes x accumulation"):
        micro_batch(6, DistributedContext(world_size=2), 2)
    code = main(["train", "pretrain", "--preset", "debug", "--out", str(tmp_path), "--batch-size", "3",
                 "--grad-accum", "2", *GEOMETRY, *FAST])  # fmt: skip
    assert code == 2
    assert "batch" in capsys.readouterr().err
    # --fsdp in one process is a clear error, not a silent replicated run
    assert main(_pretrain_argv(tmp_path / "one", "--fsdp", "--max-steps", "1")) == 2


def test_accumulation_2_x_batch_b_equals_batch_2b(runs, tmp_path):
    accum = tmp_path / "accum"
    assert main(_pretrain_argv(accum, "--grad-accum", "2")) == 0
    summary = json.loads((accum / "summary.json").read_text())
    assert summary["micro_batch"]["batch_geometry"] == 2 and summary["global_batch"]["batch_geometry"] == 4
    difference = _max_relative(_losses(runs["single"]), _losses(accum))
    print(f"accumulation 2 x 2 vs batch 4: max relative loss difference over {STEPS} steps {difference:.2e}")
    assert difference < 1e-4


def test_fsdp_two_ranks_hold_half_the_state_and_match_one_process(runs):
    single = json.loads((runs["single"] / "summary.json").read_text())
    sharded = json.loads((runs["fsdp"] / "summary.json").read_text())
    assert sharded["fsdp"] and sharded["world_size"] == 2 and sharded["micro_batch"]["batch_geometry"] == 2
    (whole,) = single["per_rank_state_bytes"]
    assert len(sharded["per_rank_state_bytes"]) == 2
    for rank_bytes, detail in zip(sharded["per_rank_state_bytes"], sharded["per_rank_state_bytes_detail"]):
        print(f"per-rank state {rank_bytes} B = {rank_bytes / whole:.3f} of one process's {whole} B ({detail})")
        assert 0.45 < rank_bytes / whole < 0.55
        assert detail["optimizer"] > 0 and detail["gradients"] > 0
    difference = _max_relative(_losses(runs["single"]), _losses(runs["fsdp"]))
    print(f"2 FSDP ranks vs 1 process: max relative loss difference over {STEPS} steps {difference:.2e}")
    assert difference < 1e-4


def test_fsdp_resume_from_step_10_repeats_steps_11_to_20_exactly(runs):
    full = runs["fsdp"]
    resumed = runs["root"] / "fsdp_resumed"
    assert (full / "checkpoints" / "step-000010" / "shards" / ".metadata").is_file()
    run_torchrun(*_pretrain_argv(resumed, "--fsdp", "--resume", str(full / "checkpoints" / "step-000010")), timeout=300)
    rows = read_metrics(full / "metrics.jsonl")
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == list(range(11, STEPS + 1))
    for a, b in zip(rows[10:], again, strict=True):
        assert a == b
    digest = json.loads((full / "rank_weights_sha256.json").read_text())
    assert json.loads((resumed / "rank_weights_sha256.json").read_text()) == digest
    # a sharded checkpoint does not resume replicated (a clear error, exit 2)
    assert main(_pretrain_argv(runs["root"] / "bad", "--resume", str(full / "checkpoints" / "step-000010"))) == 2


def test_consolidated_export_is_the_sharded_state_and_loads_on_one_machine(runs):
    from omnistream_perception.model import OmniStreamModel
    from omnistream_perception.model.heads import GeometryHeads
    from omnistream_train.checkpoint import load_sharded_weights
    from omnistream_train.config import PretrainConfig
    from omnistream_train.pretrain import build_student

    config = PretrainConfig.from_dict(json.loads((runs["fsdp"] / "pretrain_config.json").read_text()))
    reference = build_student(config)
    load_sharded_weights(runs["fsdp"] / "checkpoints" / f"step-{STEPS:06d}", "student", reference)
    backbone = OmniStreamModel.from_pretrained(runs["fsdp"] / "backbone").eval()
    heads = GeometryHeads.from_pretrained(runs["fsdp"] / "backbone").eval()
    exported = backbone.state_dict()
    for name, tensor in reference["backbone"].state_dict().items():
        assert torch.equal(exported[name], tensor), name

    def depth(bb, hh) -> torch.Tensor:
        x = torch.linspace(0, 1, 2 * 3 * 32 * 32).reshape(1, 2, 3, 32, 32)
        with torch.no_grad():
            return hh(bb(x, camera_token=True, output_hidden_states=hh.layers), (32, 32))["depth"]

    ours = depth(backbone, heads)
    assert torch.equal(ours, depth(reference["backbone"].eval(), reference["geometry_heads"].eval()))
    one = depth(OmniStreamModel.from_pretrained(runs["single"] / "backbone").eval(),
                GeometryHeads.from_pretrained(runs["single"] / "backbone").eval())  # fmt: skip
    relative = float((ours - one).abs().max() / one.abs().max())
    print(f"consolidated FSDP policy vs one-process policy after {STEPS} steps: max relative depth gap {relative:.2e}")
    assert relative < 1e-3


def test_heads_probe_fsdp_shards_the_frozen_backbone(runs, tmp_path):
    single_out, sharded_out = tmp_path / "h1", tmp_path / "h2"
    common = ["train", "heads", "--checkpoint", str(runs["single"] / "backbone"), "--preset", "debug",
              "--batch-size", "4", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main([*common, "--out", str(single_out), "--save-to", str(tmp_path / "s1")]) == 0
    run_torchrun(*common, "--out", str(sharded_out), "--save-to", str(tmp_path / "s2"), "--fsdp", timeout=300)
    one = json.loads((single_out / "summary.json").read_text())["per_rank_state_bytes_detail"][0]
    for rank in json.loads((sharded_out / "summary.json").read_text())["per_rank_state_bytes_detail"]:
        for key in ("parameters", "gradients", "optimizer"):
            assert 0.45 < rank[key] / one[key] < 0.55, (key, rank, one)
    a = [r["loss"] for r in read_metrics(single_out / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(sharded_out / "metrics.jsonl")]
    assert _max_relative(a, b) < 1e-4
    assert (tmp_path / "s2" / "geometry_heads.safetensors").is_file()


def test_activation_checkpointing_recomputes_the_same_losses(runs):
    out = runs["root"] / "checkpointed"
    run_torchrun(
        *_pretrain_argv(out, "--fsdp", "--activation-checkpointing", "--max-steps", "5", "--save-every", "0"),
        timeout=300,
    )
    again = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert again == pytest.approx(_losses(runs["fsdp"])[:5], rel=1e-6)


def test_every_objective_shards_and_resumes_exactly(tmp_path):
    """SSL (EMA teacher, Gram teacher, a mask token some ranks leave unused), geometry and captioning under FSDP."""
    argv = ["train", "pretrain", "--preset", "debug", "--max-steps", "4", "--save-every", "2", "--batch-size", "4",
            "--fsdp", *FAST]  # fmt: skip
    run_torchrun(*argv, "--out", str(tmp_path / "full"), timeout=300)
    step2 = tmp_path / "full" / "checkpoints" / "step-000002"
    run_torchrun(*argv, "--out", str(tmp_path / "resumed"), "--resume", str(step2), timeout=300)
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert all(r[k] is not None for r in rows for k in ("ssl", "geo", "cap"))
    assert read_metrics(tmp_path / "resumed" / "metrics.jsonl") == rows[2:]
    detail = json.loads((tmp_path / "full" / "summary.json").read_text())["per_rank_state_bytes_detail"]
    assert detail[0]["optimizer"] > 0 and abs(detail[0]["total"] - detail[1]["total"]) / detail[0]["total"] < 0.05
