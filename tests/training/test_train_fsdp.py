"""FSDP2 training engine (training/omnistream_train/distributed.py): global batch, sharded state, exactness, sharded checkpoints.

CPU, gloo, 2 ranks under torchrun, the tiny ``debug`` presets, geometry objectives only: their losses are per-sample
averages, so a global batch split over ranks or micro-batches is the same arithmetic up to float rounding (the SSL
objectives' KoLeo term is a per-micro-batch statistic and their crops are drawn per slice, so they are not).
``train vla`` and ``train vlm`` on the same engine: a tiny CALVIN-layout split written with numpy, debug presets.
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


# ------------------------------------------------------------------------------------------------------
# train vla and train vlm on the engine: a tiny CALVIN-layout split (numpy only), debug presets, global batch 4
# ------------------------------------------------------------------------------------------------------
# Chunks of 1 action: the VLA loss is the mean over a slice's valid (unpadded) chunk entries, the arithmetic of
# DDP and ZeRO (mean of the slices' means); a chunk running past an episode's end pads entries, and slices with
# different pad counts would weigh their samples differently. Without pads every split is the same arithmetic.
VLA_ONE_ACTION = ["--set", 'policy_overrides={"chunk_size": 1}']
TASKS = ["open the drawer", "push the blue button", "lift the red block from the table", "turn on the lamp"]


def _calvin_split(root: Path, episodes: int = 4, frames: int = 8, seed: int = 0) -> Path:
    """CALVIN's layout: one npz per frame (static camera, relative actions) and the language annotations."""
    import numpy as np

    (root / "lang_annotations").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    spans = []
    for e in range(episodes):
        first = 100 + e * frames
        spans.append((first, first + frames - 1))
        for i in range(first, first + frames):
            action = np.concatenate([rng.uniform(-0.6, 0.6, 6), [rng.choice([-1.0, 1.0])]]).astype(np.float32)
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            np.savez(root / f"episode_{i:07d}.npz", rgb_static=image, rel_actions=action)
    annotations = {"info": {"indx": spans}, "language": {"ann": [TASKS[e % len(TASKS)] for e in range(episodes)]}}
    np.save(root / "lang_annotations" / "auto_lang_ann.npy", annotations, allow_pickle=True)
    return root


def _vla_argv(out: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "vla", "--preset", "debug", "--dataset", str(data), "--out", str(out), "--max-steps", str(STEPS),
            "--save-every", "10", "--batch-size", "4", "--threads", "1", "--no-progress", *VLA_ONE_ACTION, *extra]  # fmt: skip


def _vlm_argv(out: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "vlm", "--preset", "debug", "--dataset", str(data), "--out", str(out), "--max-steps", str(STEPS),
            "--stage1-steps", "6", "--save-every", "10", "--batch-size", "4", "--threads", "1", "--no-progress", *extra]  # fmt: skip


def _state_halves(single: Path, sharded: Path, what: str) -> None:
    """Each rank's parameter, gradient and optimiser bytes are half of one process's (+-10 %)."""
    (one,) = json.loads((single / "summary.json").read_text())["per_rank_state_bytes_detail"]
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["fsdp"] and summary["world_size"] == 2 and len(summary["per_rank_state_bytes"]) == 2
    for rank in summary["per_rank_state_bytes_detail"]:
        print(f"{what}: per-rank state {rank['total']} B = {rank['total'] / one['total']:.3f} of one process's "
              f"{one['total']} B ({rank})")  # fmt: skip
        for key in ("parameters", "gradients", "optimizer", "total"):
            assert 0.45 < rank[key] / one[key] < 0.55, (key, rank, one)


@pytest.fixture(scope="module")
def vla_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vla_fsdp")
    data = _calvin_split(root / "calvin")
    assert main(_vla_argv(root / "single", data)) == 0
    run_torchrun(*_vla_argv(root / "fsdp", data, "--fsdp"), timeout=300)
    return {"root": root, "data": data, "single": root / "single", "fsdp": root / "fsdp"}


def test_vla_fsdp_two_ranks_hold_half_the_state_and_match_one_process(vla_runs):
    _state_halves(vla_runs["single"], vla_runs["fsdp"], "train vla")
    single = json.loads((vla_runs["single"] / "summary.json").read_text())
    sharded = json.loads((vla_runs["fsdp"] / "summary.json").read_text())
    # the frozen backbone stays whole on every rank (and out of the trained state)
    assert sharded["frozen_backbone_bytes_per_rank"] == single["frozen_backbone_bytes_per_rank"] > 0
    assert sharded["micro_batch"] == 2 and sharded["global_batch"] == single["global_batch"] == 4
    difference = _max_relative(_losses(vla_runs["single"]), _losses(vla_runs["fsdp"]))
    print(f"train vla, 2 FSDP ranks vs 1 process: max relative loss difference over {STEPS} steps {difference:.2e}")
    assert difference < 1e-4


def test_vla_accumulation_2_x_batch_b_equals_batch_2b(vla_runs):
    accum = vla_runs["root"] / "accum"
    assert main(_vla_argv(accum, vla_runs["data"], "--grad-accum", "2", "--save-every", "0")) == 0
    assert json.loads((accum / "summary.json").read_text())["micro_batch"] == 2
    difference = _max_relative(_losses(vla_runs["single"]), _losses(accum))
    print(f"train vla, accumulation 2 x 2 vs batch 4: max relative loss difference {difference:.2e}")
    assert difference < 1e-4


def test_vla_fsdp_resume_from_step_10_repeats_steps_11_to_20_exactly(vla_runs):
    full, resumed = vla_runs["fsdp"], vla_runs["root"] / "fsdp_resumed"
    step10 = full / "checkpoints" / "step-000010"
    assert (step10 / "shards" / ".metadata").is_file()
    run_torchrun(*_vla_argv(resumed, vla_runs["data"], "--fsdp", "--resume", str(step10)), timeout=300)
    again = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == list(range(11, STEPS + 1))
    assert again == read_metrics(full / "metrics.jsonl")[10:]
    assert (resumed / "rank_weights_sha256.json").read_text() == (full / "rank_weights_sha256.json").read_text()
    # a sharded checkpoint does not resume replicated (a clear error, exit 2), nor does --fsdp run in one process
    assert main(_vla_argv(vla_runs["root"] / "bad", vla_runs["data"], "--resume", str(step10))) == 2
    assert main(_vla_argv(vla_runs["root"] / "one", vla_runs["data"], "--fsdp", "--max-steps", "1")) == 2


def test_vla_consolidated_policy_is_the_sharded_state_and_acts_as_the_one_process_policy(vla_runs):
    import numpy as np

    from omnistream_train.checkpoint import load_sharded_weights
    from omnistream_vla.policy import OmniStreamVLAPolicy

    exported = OmniStreamVLAPolicy.from_pretrained(vla_runs["fsdp"] / "policy")
    reference = OmniStreamVLAPolicy.from_pretrained(vla_runs["fsdp"] / "policy")
    load_sharded_weights(vla_runs["fsdp"] / "checkpoints" / f"step-{STEPS:06d}", "policy", reference)
    state = exported.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    assert not [p for p in (vla_runs["fsdp"] / "policy").rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    one = OmniStreamVLAPolicy.from_pretrained(vla_runs["single"] / "policy")
    images = np.random.default_rng(1).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    observation = {"observation.images.static": images, "task": TASKS}
    ours, theirs = (p.predict_action_chunk(observation, normalized=True) for p in (exported, one))
    gap = float((ours - theirs).abs().max())
    print(f"train vla: consolidated FSDP policy vs one-process policy after {STEPS} steps: max action gap {gap:.2e}")
    assert gap < 1e-5


@pytest.fixture(scope="module")
def vlm_runs(vla_runs) -> dict[str, Path]:
    root, data = vla_runs["root"], vla_runs["data"]
    assert main(_vlm_argv(root / "vlm_single", data)) == 0
    run_torchrun(*_vlm_argv(root / "vlm_fsdp", data, "--fsdp"), timeout=300)
    return {"root": root, "data": data, "single": root / "vlm_single", "fsdp": root / "vlm_fsdp"}


def test_vlm_fsdp_halves_the_state_matches_one_process_and_accumulation(vlm_runs):
    _state_halves(vlm_runs["single"], vlm_runs["fsdp"], "train vlm")
    # answers differ in length: each slice's loss is its tokens' sum over the global batch's token count
    difference = _max_relative(_losses(vlm_runs["single"]), _losses(vlm_runs["fsdp"]))
    print(f"train vlm, 2 FSDP ranks vs 1 process: max relative loss difference over {STEPS} steps {difference:.2e}")
    assert difference < 1e-4
    accum = vlm_runs["root"] / "vlm_accum"
    assert main(_vlm_argv(accum, vlm_runs["data"], "--grad-accum", "2", "--save-every", "0")) == 0
    difference = _max_relative(_losses(vlm_runs["single"]), _losses(accum))
    print(f"train vlm, accumulation 2 x 2 vs batch 4: max relative loss difference {difference:.2e}")
    assert difference < 1e-4


def test_vlm_fsdp_resumes_exactly_and_exports_what_one_process_scores(vlm_runs):
    from omnistream_train.vla import cache_features, load_episodes
    from omnistream_train.vlm import VLMPrompts, answer_scores, load_vlm

    full, resumed = vlm_runs["fsdp"], vlm_runs["root"] / "vlm_fsdp_resumed"
    step10 = full / "checkpoints" / "step-000010"
    run_torchrun(*_vlm_argv(resumed, vlm_runs["data"], "--fsdp", "--resume", str(step10)), timeout=300)
    assert read_metrics(resumed / "metrics.jsonl") == read_metrics(full / "metrics.jsonl")[10:]
    assert (resumed / "rank_weights_sha256.json").read_text() == (full / "rank_weights_sha256.json").read_text()

    ours, one = load_vlm(full), load_vlm(vlm_runs["single"])
    episodes = load_episodes(vlm_runs["data"], ["static"])
    features = cache_features(ours, episodes, ["static"], 32, progress=False)["static"][:6]
    scores = [answer_scores(p, VLMPrompts(p.processor), [features], "What is the robot doing?", TASKS)
              for p in (ours, one)]  # fmt: skip
    gap = float((scores[0] - scores[1]).abs().max() / scores[1].abs().max())
    print(f"train vlm: consolidated FSDP VLM vs one process after {STEPS} steps: max relative score gap {gap:.2e}")
    assert gap < 1e-5


def test_vla_plan_reports_the_scheme_train_vla_runs(capsys):
    from omnistream_train.plan import plan_vla
    from omnistream_train.vla import VLATrainConfig

    assert plan_vla(VLATrainConfig.from_preset("paper"), 8, "80GB").runs == "fsdp2"  # the multi-GPU default
    assert plan_vla(VLATrainConfig.from_preset("paper", fsdp=False), 8, "80GB").runs == "replicated"
    assert plan_vla(VLATrainConfig.from_preset("paper", grad_accum=16), 1, "80GB").runs == "replicated"
    assert main(["train", "vla", "--preset", "paper", "--plan", "--no-fsdp"]) == 0
    assert "train vla runs: replicated" in capsys.readouterr().out
