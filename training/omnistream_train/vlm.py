"""The VLM stage before the VLA (VLM4VLA starts from a vision-language model): ``omnistream train vlm``.

    frozen OmniStream features -> the VLA's MLP projector (+ visual positions) -> the VLA's Qwen2ForCausalLM
    [<|im_start|>system ... user\\n<|vision_start|> visual <|vision_end|> question <|im_end|>\\n
     <|im_start|>assistant\\n answer <|im_end|>]  ->  language-modelling loss on the answer tokens only

The projector, LLM and tokenizer are built by the VLA's own code (``omnistream_train.vla.build_policy`` on the
same preset), and the frozen features come from the VLA's feature pass (``frozen_features``),
so a VLM output plugs into ``train vla --init-vlm`` of the same preset. LLaVA's two stages:

* stage 1 (feature alignment): only the projector trains (``stage1_lr``); the LLM is frozen;
* stage 2 (instruction tuning): the projector (``projector_lr``) and the whole LLM (``lr``) train.

``stages=[1, 2]`` (default) runs both in one schedule (each stage its own warm-up + cosine), ``[1]`` or ``[2]`` one
of them (stage 2 usually from a stage-1 output: ``init_vlm``). Data (``omnistream_train.vlm_data``): questions
and answers from tabletop ground truth, LeRobot/CALVIN task strings and caption JSONL. Adam, gradient clip,
bf16 autocast where supported; resumable bit for bit (data order is a function of seed and step); runs under
``torchrun`` on ``distributed.ParallelEngine``: ``batch_size`` is the GLOBAL batch (each rank's micro-batch is
``batch_size / (processes x grad_accum)``), replicated (one all-reduce per step) or FSDP2 (each decoder layer a
unit, the projector, visual positions and embeddings the root: ``VLMModel``, whose forward is the answer
likelihood, so every call gathers what it needs); the frozen backbone and the VLA-only parts of the policy stay
whole and untouched on every rank. The loss is the mean over the answer tokens of the whole global batch
(each slice's token sum over the global count), so any split gives the one-process loss. Checkpoints and the
output are safetensors + JSON (sharded checkpoints under FSDP, the output gathered).

Output ``<out>/vlm/``: ``vlm_config.json`` (the policy architecture, the backbone's weights digest),
``projector.safetensors`` (projector + visual positions), ``llm/`` (transformers safetensors), ``tokenizer.json``,
and ``backbone/`` when the backbone was a random preset (no directory to refer to).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .config import VLMTrainConfig, warmup_cosine
from .data import sample_indices
from .distributed import (
    DistributedContext,
    ParallelEngine,
    ParallelOptions,
    gather_strings,
    init_distributed,
    local_state_bytes,
    mean_across_ranks,
    shutdown_distributed,
    state_digest,
    weights_digest,
)
from .metrics import MetricsLogger
from .vlm_data import COLOURS, VLMSample, caption_episodes, dataset_samples

VLM_DIR = "vlm"
CONFIG_FILE = "vlm_config.json"
PROJECTOR_FILE = "projector.safetensors"
MODEL_TYPE = "omnistream_vlm"
# Fields of the policy configuration a VLM output fixes for the VLA it starts: the weights' shapes and the
# features the projector was trained on.
ARCHITECTURE_FIELDS = ("vision_hidden_size", "projector_hidden_size", "visual_positions", "cameras", "image_size",
                       "patch_size", "pool", "features")  # fmt: skip
LLM_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size")  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# Prompts and the answer likelihood
# ------------------------------------------------------------------------------------------------------
class VLMPrompts:
    """Token ids of the VLM's chat turn, built from the VLA processor's prompt pieces (cached per string)."""

    def __init__(self, processor) -> None:
        self.tokenizer = processor.tokenizer
        ids = processor.encode_instruction("x")
        self.prefix, self.separator = ids.prefix, ids.camera_separator
        self._cache: dict[tuple[str, str], tuple[int, ...]] = {}

    def _ids(self, kind: str, text: str) -> tuple[int, ...]:
        key = (kind, text)
        if key not in self._cache:
            if kind == "question":
                text = f"<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
            else:
                text = f"{text}<|im_end|>"
            self._cache[key] = tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return self._cache[key]

    def question(self, text: str) -> tuple[int, ...]:
        return self._ids("question", text)

    def answer(self, text: str) -> tuple[int, ...]:
        return self._ids("answer", text)


def answer_token_logprobs(
    policy, prompts: VLMPrompts, visual: list[torch.Tensor], questions: list[str], answers: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of every answer token (and the closing <|im_end|>) given the frame and the question,
    and the sample each belongs to. ``visual``: per camera (B, n, D_v) features; right-padded batch."""
    embed = policy.llm.get_input_embeddings()
    device, dtype = embed.weight.device, embed.weight.dtype
    projected = [t.to(dtype) for t in policy.project_visual(visual)]
    batch = len(questions)

    def embedded(ids) -> torch.Tensor:
        return embed(torch.tensor(ids, dtype=torch.long, device=device))

    prefix = embedded(prompts.prefix)
    separator = embedded(prompts.separator) if len(projected) > 1 else None
    sequences, targets = [], []
    for i in range(batch):
        parts = [prefix]
        for c, tokens in enumerate(projected):
            if c:
                parts.append(separator)
            parts.append(tokens[i])
        answer = prompts.answer(answers[i])
        parts.append(embedded(prompts.question(questions[i]) + answer))
        sequence = torch.cat(parts)
        sequences.append(sequence)
        targets.append((sequence.shape[0] - len(answer), answer))
    length = max(s.shape[0] for s in sequences)
    inputs = torch.zeros(batch, length, sequences[0].shape[-1], device=device, dtype=dtype)
    mask = torch.zeros(batch, length, device=device, dtype=torch.long)
    for i, seq in enumerate(sequences):
        inputs[i, : seq.shape[0]] = seq
        mask[i, : seq.shape[0]] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    hidden = policy.llm.model(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids, use_cache=False)
    hidden = hidden.last_hidden_state
    rows, cols, ids = [], [], []
    for i, (start, answer) in enumerate(targets):  # position p predicts token p + 1
        rows += [i] * len(answer)
        cols += list(range(start - 1, start - 1 + len(answer)))
        ids += list(answer)
    rows_t = torch.tensor(rows, device=device)
    logits = policy.llm.lm_head(hidden[rows_t, torch.tensor(cols, device=device)]).float()
    logprobs = -F.cross_entropy(logits, torch.tensor(ids, device=device), reduction="none")
    return logprobs, rows_t


class VLMModel(torch.nn.ModuleDict):
    """What the VLM trains (``projector``, ``llm``, ``visual_positions``: the state of its checkpoints) with
    ``answer_token_logprobs`` of ``policy`` as its forward: under FSDP the whole is one root, and every
    likelihood goes through its forward, which gathers the shards. ``policy`` itself (backbone, action head)
    is not a submodule."""

    def __init__(self, policy) -> None:
        modules = {"projector": policy.projector, "llm": policy.llm}
        if policy.visual_positions is not None:
            modules["visual_positions"] = policy.visual_positions
        super().__init__(modules)
        self.__dict__["policy"] = policy  # a plain reference, not a registered submodule

    def forward(self, prompts, visual, questions, answers) -> tuple[torch.Tensor, torch.Tensor]:
        return answer_token_logprobs(self.policy, prompts, visual, questions, answers)


def _scorer(model) -> VLMModel:
    return model if isinstance(model, VLMModel) else VLMModel(model)


def lm_loss(policy, prompts, visual, questions, answers, tokens: int | None = None) -> torch.Tensor:
    """Mean negative log-likelihood per answer token of the batch (LLaVA's loss); with ``tokens`` (the answer
    tokens of the whole global batch) the batch's sum over that count instead, so that slices add up to the
    global mean. ``policy``: a policy or its ``VLMModel``."""
    logprobs, _ = _scorer(policy)(prompts, visual, questions, answers)
    return -logprobs.mean() if tokens is None else -logprobs.sum() / tokens


@torch.no_grad()
def answer_scores(policy, prompts, visual, question: str, candidates: list[str]) -> torch.Tensor:
    """(B, len(candidates)) total log-likelihood of each candidate answer for each frame (``policy``: a policy
    or its ``VLMModel``)."""
    batch = visual[0].shape[0]
    scores = torch.zeros(batch, len(candidates))
    scorer = _scorer(policy)
    for j, candidate in enumerate(candidates):
        logprobs, rows = scorer(prompts, visual, [question] * batch, [candidate] * batch)
        scores[:, j] = torch.zeros(batch, device=logprobs.device).index_add_(0, rows, logprobs).cpu()
    return scores


@torch.no_grad()
def grounding_accuracy(policy, prompts, features, samples: list[VLMSample], cameras, device, batch: int = 64) -> float:
    """Share of "which colour is the block on the <side>?" questions whose most likely answer among the three
    colours is the right one (chance 1/3)."""
    was_training = policy.training
    policy.eval()
    items = [s for s in samples if s.kind == "which_colour"]
    if not items:
        raise ValueError("no 'which_colour' questions to evaluate (tabletop demonstrations carry them)")
    correct = 0
    by_question: dict[str, list[VLMSample]] = {}
    for s in items:
        by_question.setdefault(s.question, []).append(s)
    for question, group in by_question.items():
        for k in range(0, len(group), batch):
            chunk = group[k : k + batch]
            idx = [s.frame for s in chunk]
            visual = [features[cam][idx].to(device) for cam in cameras]
            best = answer_scores(policy, prompts, visual, question, list(COLOURS)).argmax(1)
            correct += sum(int(COLOURS[int(b)] == s.answer) for b, s in zip(best, chunk))
    policy.train(was_training)
    return correct / len(items)


# ------------------------------------------------------------------------------------------------------
# Building, saving and loading
# ------------------------------------------------------------------------------------------------------
def vla_config_for(config: VLMTrainConfig):
    """The VLA training configuration whose policy the VLM shares (projector, LLM, tokenizer, backbone)."""
    from .vla import VLATrainConfig

    return VLATrainConfig(policy_preset=config.policy_preset, policy_overrides=dict(config.policy_overrides),
                          backbone=config.backbone, backbone_preset=config.backbone_preset,
                          cameras=list(config.cameras), features=config.features, seed=config.seed,
                          init_vlm=config.init_vlm, feature_batch=config.feature_batch, precision=config.precision)  # fmt: skip


def build_vlm_policy(config: VLMTrainConfig, device: torch.device):
    """The VLA policy of the same preset; the VLM trains its projector, visual positions and LLM."""
    from .vla import build_policy

    return build_policy(vla_config_for(config), {}, device, bounds=(-1.0, 1.0))


def trained_modules(policy) -> VLMModel:
    return VLMModel(policy)


def save_vlm(policy, directory: Path, config: VLMTrainConfig, stages_done: list[int]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"projector.{k}": v for k, v in policy.projector.state_dict().items()}
    if policy.visual_positions is not None:
        state.update({f"visual_positions.{k}": v for k, v in policy.visual_positions.state_dict().items()})
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(directory / PROJECTOR_FILE))
    policy.llm.save_pretrained(str(directory / "llm"), safe_serialization=True)
    policy.processor.save(directory)
    backbone = config.backbone
    if backbone is None:  # a random preset backbone: saved, so the VLA can be trained on the same features
        policy.backbone.save_pretrained(directory / "backbone")
        backbone = "backbone"
    architecture = {k: v for k, v in policy.config.to_dict().items() if k in ARCHITECTURE_FIELDS}
    llm_shape = {k: getattr(policy.llm.config, k) for k in LLM_SHAPE_FIELDS}
    meta = {"model_type": MODEL_TYPE, "architecture": architecture, "llm_shape": llm_shape, "backbone": backbone,
            "backbone_sha256": weights_digest(policy.backbone), "stages": stages_done,
            "policy_preset": config.policy_preset, "train_config": asdict(config)}  # fmt: skip
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


class VLMDirectory:
    """A VLM output read for starting a VLA (or a stage-2 run) from it."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if (path / VLM_DIR / CONFIG_FILE).is_file():  # the --out of a `train vlm` run
            path = path / VLM_DIR
        if not (path / CONFIG_FILE).is_file():
            raise ValueError(f"{path} is not a VLM output (no {CONFIG_FILE}); pass the --out of `omnistream train vlm`")
        meta = json.loads((path / CONFIG_FILE).read_text())
        if meta.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path / CONFIG_FILE} is not an OmniStream VLM configuration")
        missing = [n for n in (PROJECTOR_FILE, "llm", "tokenizer.json") if not (path / n).exists()]
        if missing:
            raise ValueError(f"the VLM output {path} is incomplete: {missing} missing")
        self.path, self.meta = path, meta

    def check_fits(self, policy_config) -> None:
        """ValueError naming every field where the VLA's policy differs from the VLM's (shapes, features, LLM)."""
        wanted = {k: v for k, v in policy_config.to_dict().items() if k in ARCHITECTURE_FIELDS}
        diffs = [f"{k}: VLM {self.meta['architecture'].get(k)!r}, VLA {v!r}" for k, v in wanted.items()
                 if self.meta["architecture"].get(k) != v]  # fmt: skip
        if policy_config.llm == "debug" or policy_config.llm in _hub_ids():
            diffs += [f"llm.{k}: VLM {self.meta['llm_shape'][k]}, VLA {policy_config.llm_config[k]}"
                      for k in LLM_SHAPE_FIELDS if k in policy_config.llm_config
                      and policy_config.llm_config[k] != self.meta["llm_shape"][k]]  # fmt: skip
        if diffs:
            raise ValueError(
                f"the VLM {self.path} does not fit this VLA ({'; '.join(diffs)}): train the VLM with the VLA's preset "
                f"(omnistream train vlm --preset <the VLA preset>) or set the VLA's policy_overrides to match"
            )

    def llm_overrides(self) -> dict[str, Any]:
        return {"llm": str(self.path / "llm"), "tokenizer": str(self.path / "tokenizer.json")}

    def check_backbone(self, backbone) -> None:
        if weights_digest(backbone) != self.meta["backbone_sha256"]:
            source = self.meta["backbone"]
            where = self.path / source if source == "backbone" else source
            raise ValueError(
                f"the VLM {self.path} was trained on the features of another backbone; pass --backbone {where}"
            )

    def load_into(self, policy) -> None:
        """Projector (+ visual positions) weights; the LLM and tokenizer come through ``llm_overrides``."""
        state = load_file(str(self.path / PROJECTOR_FILE))
        projector = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
        policy.projector.load_state_dict(projector)
        if policy.visual_positions is not None:
            positions = {k.removeprefix("visual_positions."): v for k, v in state.items()
                         if k.startswith("visual_positions.")}  # fmt: skip
            policy.visual_positions.load_state_dict(positions)


def _hub_ids() -> set[str]:
    from omnistream_vla.policy.configuration_omnistream_vla import QWEN25_SHAPES

    return {shape["hub_id"] for shape in QWEN25_SHAPES.values()}


# ------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------
def load_sources(policy, config: VLMTrainConfig, datasets: list, captions: list, show: bool):
    """Cached features of every source (concatenated per camera) and the samples pointing into them."""
    from .vla import frozen_features, load_episodes

    features: dict[str, list[torch.Tensor]] = {cam: [] for cam in config.cameras}
    samples: list[VLMSample] = []
    offset = 0

    def add(episodes) -> None:
        for cam, tensor in frozen_features(policy, episodes, config, show).items():
            features[cam].append(tensor)

    for root in datasets:
        episodes = load_episodes(root, config.cameras)
        if not episodes:
            raise ValueError(f"{root} holds no episodes")
        lengths = [len(e.actions) for e in episodes]
        samples += dataset_samples(root, lengths, [e.instruction for e in episodes], config.questions,
                                   config.frame_stride, offset)  # fmt: skip
        add(episodes)
        offset += sum(lengths)
    for path in captions:
        if len(config.cameras) != 1:
            raise ValueError(f"caption JSONL gives one image per sample; the policy has cameras {config.cameras}")
        episodes, texts = caption_episodes(path, config.cameras[0], last_frame_only=config.features == "frame")
        from .vlm_data import CAPTION_QUESTION

        for e, text in zip(episodes, texts):
            offset += len(e.actions)
            samples.append(VLMSample(offset - 1, CAPTION_QUESTION, text, "caption_jsonl"))
        add(episodes)
    if not samples:
        raise ValueError("no training samples: give tabletop/LeRobot/CALVIN datasets or caption JSONL")
    return {cam: torch.cat(v) for cam, v in features.items()}, samples


def run_vlm_training(
    config: VLMTrainConfig,
    datasets: list[str | Path] = (),
    out_dir: str | Path = "outputs/vlm",
    captions: list[str | Path] = (),
    resume: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    parallel: ParallelOptions | None = None,
) -> dict:
    """``parallel``: FSDP2, accumulation and activation checkpointing (``distributed.ParallelOptions``; FSDP's
    parameter dtype follows ``config.precision``); ``summary.json`` records ``per_rank_state_bytes``."""
    from tqdm.auto import tqdm

    config.validate()
    if not datasets and not captions:
        raise ValueError("give at least one dataset (--dataset) or caption JSONL (--captions)")
    ctx = init_distributed(device)
    try:
        return _train(config, list(datasets), list(captions), Path(out_dir), resume, ctx, progress, tqdm, parallel)
    finally:
        shutdown_distributed()


def _set_stage(policy, stage: int) -> list[torch.nn.Parameter]:
    """Freezes the LLM in stage 1; returns the parameters that train in ``stage``."""
    policy.llm.requires_grad_(stage == 2)
    modules = [policy.projector, policy.visual_positions] + ([policy.llm] if stage == 2 else [])
    return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]


def _train(
    config: VLMTrainConfig, datasets, captions, out: Path, resume, ctx: DistributedContext, progress, tqdm, parallel
):
    from .vla import _precision, engine_dtype

    parallel = parallel or ParallelOptions()
    precision = "fp32" if _precision(config, ctx.device) is None else "bf16"
    engine = ParallelEngine(
        ctx, ParallelOptions(parallel.fsdp, parallel.grad_accum, precision, parallel.activation_checkpointing)
    )
    micro = engine.micro_batch(config.batch_size)  # an error before any work if it does not divide
    slots = engine.slots()
    policy = build_vlm_policy(config, ctx.device)
    show = progress and ctx.is_main
    features, samples = load_sources(policy, config, datasets, captions, show)
    eval_features = eval_samples = None
    if config.eval_dataset:
        grounding = replace(config, questions=["which_colour"], frame_stride=1)  # whatever the training asks
        eval_features, eval_samples = load_sources(policy, grounding, [config.eval_dataset], [], show)
    prompts = VLMPrompts(policy.processor)
    model = VLMModel(policy)
    policy.train()
    engine.prepare(model, cast_inputs=False)  # rank 0's weights everywhere; FSDP2 shards (backbone untouched)
    projector_params = [p for m in (policy.projector, policy.visual_positions) if m is not None for p in m.parameters()]
    groups = [{"params": projector_params, "lr": 0.0, "name": "projector"},
              {"params": list(policy.llm.parameters()), "lr": 0.0, "name": "llm"}]  # fmt: skip
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=0.0)
    step = 0
    if resume:
        step = int(engine.load(resume, {"vlm": model}, optimizer)["step"])
    autocast_dtype = _precision(config, ctx.device)

    def accuracy() -> float | None:
        if eval_samples is None:
            return None
        # every rank scores every question (the same calls: collectives under FSDP), then frees the gathers;
        # under FSDP with bf16 gathers in the training's autocast (full-precision features meet bf16 weights)
        bf16 = engine.fsdp and autocast_dtype is not None
        with torch.autocast(ctx.device.type, dtype=autocast_dtype or torch.float32, enabled=bf16):
            value = grounding_accuracy(model, prompts, eval_features, eval_samples, config.cameras, ctx.device)
        engine.after_step(model)
        return value

    accuracy_before = accuracy()
    logger = MetricsLogger(out, enabled=ctx.is_main, resume_step=step if resume else None)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "vlm_train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    bar = tqdm(total=config.max_steps, initial=step, desc="vlm", disable=not show)
    began = time.perf_counter()
    logs: dict[str, float] = {}
    while step < config.max_steps:
        stage = config.stage_at(step)
        params = _set_stage(policy, stage)
        first, span = config.stage_span(step)
        scale = warmup_cosine(step - first, config.warmup_steps, span, config.min_lr_ratio)
        optimizer.param_groups[0]["lr"] = (config.stage1_lr if stage == 1 else config.projector_lr) * scale
        optimizer.param_groups[1]["lr"] = config.lr * scale if stage == 2 else 0.0
        # the global batch as slices, rank-major (distributed.data_slot); split over ranks or micro-batches, each
        # slice's loss is its answer tokens' sum over the global batch's count (None: one slice, the plain mean)
        slices = [sample_indices(len(samples), step, k, slots, micro, config.seed, 0) for k in range(slots)]
        tokens = sum(len(prompts.answer(samples[i].answer)) for idx in slices for i in idx) if slots > 1 else None
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(engine.grad_accum):
            chosen = [samples[i] for i in slices[engine.slot(m)]]
            frames = [s.frame for s in chosen]
            visual = [features[cam][frames].to(ctx.device) for cam in config.cameras]
            with torch.autocast(
                ctx.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            ):
                loss = lm_loss(model, prompts, visual, [s.question for s in chosen], [s.answer for s in chosen], tokens)
            if tokens is not None and ctx.world_size > 1:
                loss = loss * ctx.world_size  # the ranks' gradients are averaged: their partial sums must add up
            engine.backward(loss, model)
            total += float(loss.detach())
        grad_norm = engine.finish_gradients(params, config.grad_clip)  # mean over ranks, then the clip
        optimizer.step()
        engine.after_step(model)
        step += 1
        logs = mean_across_ranks({"loss": total}, ctx)  # the mean of world x partial sums: the global batch's
        logs.update(stage=stage)
        if grad_norm is not None:
            logs["grad_norm"] = grad_norm
        logs.update(lr_projector=optimizer.param_groups[0]["lr"], lr_llm=optimizer.param_groups[1]["lr"])
        logger.log(step, logs)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", stage=stage)
        if config.save_every and step % config.save_every == 0:  # a collective under FSDP: every rank writes
            engine.save(out / "checkpoints" / f"step-{step:06d}", {"vlm": model}, optimizer,
                        {"step": step, "config": asdict(config)}, keep=config.keep_checkpoints)  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - began
    accuracy_after = accuracy()
    state_bytes = [json.loads(b) for b in gather_strings(json.dumps(local_state_bytes([model], optimizer)), ctx)]
    if engine.fsdp:
        # the whole weights exist once gathered (a collective), on rank 0: its fingerprint stands for every rank
        gathered = engine.full_state_dict(model)
        export = build_vlm_policy(config, torch.device("cpu")) if ctx.is_main else None
        if export is not None:
            VLMModel(export).load_state_dict(gathered)
        del gathered
        digests = [state_digest(VLMModel(export).state_dict())] if export is not None else []
    else:
        export = policy
        digests = gather_strings(weights_digest(model), ctx)  # every replica's, to show they never drifted
    logger.close()
    result: dict[str, Any] = {"steps": step, "seconds": seconds, "final": logs, "samples": len(samples),
                              "frames": int(next(iter(features.values())).shape[0]), "rank_digests": digests,
                              "vlm": None, "world_size": ctx.world_size, "fsdp": engine.fsdp,
                              "param_dtype": engine_dtype(engine, ctx), "global_batch": config.batch_size,
                              "micro_batch": micro, "grad_accum": engine.grad_accum,
                              "per_rank_state_bytes": [b["total"] for b in state_bytes],
                              "per_rank_state_bytes_detail": state_bytes}  # fmt: skip
    if accuracy_before is not None:
        result["eval"] = {"grounding_accuracy_before": accuracy_before, "grounding_accuracy": accuracy_after,
                          "chance": 1 / len(COLOURS), "questions": sum(s.kind == "which_colour" for s in eval_samples)}  # fmt: skip
    if ctx.is_main:
        (out / "summary.json").write_text(
            json.dumps({k: v for k, v in result.items() if k != "final"}, indent=2) + "\n"
        )
        (out / "rank_weights_sha256.json").write_text(json.dumps(digests, indent=2) + "\n")
        stages_done = {config.stage_at(s) for s in range(step)}
        if config.init_vlm:  # stage 2 on a stage-1 output has been through both
            stages_done |= set(VLMDirectory(config.init_vlm).meta["stages"])
        stages_done = sorted(stages_done)
        result["vlm"] = str(save_vlm(export, out / VLM_DIR, config, stages_done))  # consolidated safetensors
    return result


def load_vlm(directory: str | Path, device: str | torch.device = "cpu"):
    """A saved VLM as a policy object (projector, visual positions, LLM, tokenizer, backbone) for scoring
    answers: ``answer_scores(policy, VLMPrompts(policy.processor), features, question, candidates)``."""
    from omnistream_perception.model import OmniStreamModel
    from omnistream_vla.policy import OmniStreamVLAConfig, OmniStreamVLAPolicy

    vlm = VLMDirectory(directory)
    source = vlm.meta["backbone"]
    backbone = OmniStreamModel.from_pretrained(vlm.path / source if source == "backbone" else source)
    config = OmniStreamVLAConfig.preset(vlm.meta["policy_preset"], **vlm.meta["architecture"], **vlm.llm_overrides())
    policy = OmniStreamVLAPolicy(config, backbone=backbone)
    vlm.check_backbone(backbone)
    vlm.load_into(policy)
    return policy.to(device).eval()


def scene_features(policy, images: np.ndarray) -> list[torch.Tensor]:
    """(B, H, W, 3) uint8 frames of the (single) camera -> the VLM's visual input (frame features)."""
    return [policy.encode_images(images)]
