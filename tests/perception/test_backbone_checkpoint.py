"""The published checkpoint layout: the authors' fixture loads unchanged and reproduces their outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnistream_perception.model import OmniStreamConfig, OmniStreamModel, OmniStreamSession

TOL = 1e-4


@pytest.fixture(scope="module")
def reference(fixture_a):
    return load_file(str(fixture_a / "reference_io.safetensors"))


@pytest.fixture(scope="module")
def model_a(fixture_a):
    return OmniStreamModel.from_pretrained(fixture_a)


def test_fixture_config_is_read_with_noise_fields_tolerated(model_a):
    cfg = model_a.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.depth, cfg.patch_size, cfg.ffn_layer) == (64, 4, 2, 16, "mlp")
    # fields that do not shape the network are kept, not interpreted (e.g. num_hidden_layers, top_k)
    assert cfg.extra["top_k"] == 2 and cfg.extra["layer_norm_eps"] == 1e-6
    assert cfg.layer_norm_eps == 1e-5  # the network uses 1e-5 whatever the file says


def test_fixture_reproduces_reference_outputs(model_a, reference, fixture_a):
    meta = json.loads((fixture_a / "reference_io.json").read_text())
    assert meta["camera_token"] is False and meta["patch_start_idx"] == 5
    with torch.no_grad():
        out = model_a(reference["pixel_values"])
    assert out.patch_start_idx == 5
    assert (out.last_hidden_state - reference["last_hidden_state"]).abs().max() <= TOL
    assert (out.pooler_output - reference["pooler_output"]).abs().max() <= TOL
    assert len(out.hidden_states) == model_a.config.depth
    for i, hs in enumerate(out.hidden_states):
        assert (hs - reference[f"hidden_states.{i}"]).abs().max() <= TOL, f"hidden_states.{i}"
    assert out.camera_token is None


def test_fixture_streaming_frame_by_frame_matches_reference(model_a, reference):
    stream = OmniStreamSession(model_a)
    outs = [stream.step(reference["pixel_values"][:, i]) for i in range(reference["pixel_values"].shape[1])]
    streamed = torch.cat([o.last_hidden_state for o in outs], dim=1)
    assert (streamed - reference["last_hidden_state"]).abs().max() <= TOL


def test_save_pretrained_round_trip_is_exact_and_keeps_the_layout(model_a, fixture_a, tmp_path, reference):
    model_a.save_pretrained(tmp_path)
    written = load_file(str(tmp_path / "model.safetensors"))
    original = load_file(str(fixture_a / "model.safetensors"))
    assert set(written) == set(original)
    for k in original:
        assert torch.equal(written[k], original[k]), k
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "vfm" and cfg["video_aggregator_layer"] == 2 and cfg["top_k"] == 2
    again = OmniStreamModel.from_pretrained(tmp_path)
    with torch.no_grad():
        a = again(reference["pixel_values"]).last_hidden_state
        b = model_a(reference["pixel_values"]).last_hidden_state
    assert torch.equal(a, b)


def _copy_with_state(fixture_a, tmp_path, edit):
    shutil.copy(fixture_a / "config.json", tmp_path / "config.json")
    state = load_file(str(fixture_a / "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_tensor_is_named(fixture_a, tmp_path):
    d = _copy_with_state(fixture_a, tmp_path, lambda s: s.pop("patch_embed.blocks.1.ls2.gamma"))
    with pytest.raises(ValueError, match=r"missing tensors: patch_embed\.blocks\.1\.ls2\.gamma"):
        OmniStreamModel.from_pretrained(d)


def test_unexpected_tensor_is_named(fixture_a, tmp_path):
    d = _copy_with_state(fixture_a, tmp_path, lambda s: s.__setitem__("patch_embed.extra_thing", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"unexpected tensors: patch_embed\.extra_thing"):
        OmniStreamModel.from_pretrained(d)


def test_misshaped_tensor_is_named(fixture_a, tmp_path):
    d = _copy_with_state(fixture_a, tmp_path, lambda s: s.__setitem__("patch_embed.cls_token", torch.zeros(1, 1, 32)))
    with pytest.raises(ValueError, match=r"mis-shaped tensors: patch_embed\.cls_token"):
        OmniStreamModel.from_pretrained(d)


def test_pickle_checkpoints_are_refused(fixture_a, tmp_path):
    shutil.copy(fixture_a / "config.json", tmp_path / "config.json")
    torch.save(load_file(str(fixture_a / "model.safetensors")), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        OmniStreamModel.from_pretrained(tmp_path)


def test_not_a_directory_nor_hub_id_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor a Hugging Face hub id"):
        OmniStreamModel.from_pretrained(tmp_path / "does" / "not" / "exist")


def test_presets_and_large_is_the_published_vit_l():
    large = OmniStreamConfig.preset("large")
    assert (large.hidden_size, large.num_attention_heads, large.depth, large.patch_size) == (1024, 16, 24, 16)
    with pytest.raises(ValueError, match="unknown preset"):
        OmniStreamConfig.preset("huge")


def test_dinov3_names_initialise_the_backbone():
    """DINOv3's own parameter names (storage_tokens, norm, blocks.*) map onto the published layout."""
    torch.manual_seed(0)
    src = OmniStreamModel.from_preset("debug")
    dinov3 = {}
    for name, tensor in src.state_dict().items():
        short = name.removeprefix("patch_embed.")
        if short in ("camera_token", "ar_embedder.weight", "ar_embedder.bias"):
            continue
        if short == "register_token":
            dinov3["storage_tokens"] = tensor[:, 0]
        elif short.startswith("post_layernorm."):
            dinov3["norm." + short.split(".")[1]] = tensor
        else:
            dinov3[short] = tensor
    dinov3["rope_embed.periods"] = torch.ones(4)  # DINOv3 buffers we recompute are ignored
    model = OmniStreamModel.from_dinov3(src.config, dinov3)
    got = model.state_dict()
    assert torch.equal(got["patch_embed.blocks.1.attn.qkv.weight"], dinov3["blocks.1.attn.qkv.weight"])
    assert torch.equal(got["patch_embed.register_token"][:, 1], dinov3["storage_tokens"])
    assert torch.equal(got["patch_embed.post_layernorm.weight"], dinov3["norm.weight"])


def test_dinov3_hugging_face_names_and_files_initialise_the_backbone(tmp_path):
    """The transformers DINOv3 layout (separate q/k/v without key bias, layer_scale lambdas) maps onto ours."""
    torch.manual_seed(1)
    src = OmniStreamModel.from_preset("debug")
    sd = {k.removeprefix("patch_embed."): v for k, v in src.state_dict().items()}
    d = src.config.hidden_size
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.register_tokens": sd["register_token"][:, 0],
        "embeddings.mask_token": sd["mask_token"][None],
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["post_layernorm.weight"],
        "norm.bias": sd["post_layernorm.bias"],
    }
    for i in range(src.config.depth):
        b, layer = f"blocks.{i}.", f"layer.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].split(d)
        qb, _, vb = sd[b + "attn.qkv.bias"].split(d)
        hf.update({
            layer + "attention.q_proj.weight": q, layer + "attention.k_proj.weight": k,
            layer + "attention.v_proj.weight": v, layer + "attention.q_proj.bias": qb,
            layer + "attention.v_proj.bias": vb,
            layer + "attention.o_proj.weight": sd[b + "attn.proj.weight"],
            layer + "attention.o_proj.bias": sd[b + "attn.proj.bias"],
            layer + "layer_scale1.lambda1": sd[b + "ls1.gamma"], layer + "layer_scale2.lambda1": sd[b + "ls2.gamma"],
            layer + "mlp.up_proj.weight": sd[b + "mlp.fc1.weight"], layer + "mlp.up_proj.bias": sd[b + "mlp.fc1.bias"],
            layer + "mlp.down_proj.weight": sd[b + "mlp.fc2.weight"], layer + "mlp.down_proj.bias": sd[b + "mlp.fc2.bias"],
        })  # fmt: skip
        for n in ("norm1", "norm2"):
            hf[layer + n + ".weight"], hf[layer + n + ".bias"] = sd[b + n + ".weight"], sd[b + n + ".bias"]
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    model = OmniStreamModel.from_dinov3(src.config, tmp_path)
    got = model.state_dict()
    assert torch.equal(
        got["patch_embed.blocks.0.attn.qkv.weight"], src.state_dict()["patch_embed.blocks.0.attn.qkv.weight"]
    )
    qkv_bias = got["patch_embed.blocks.1.attn.qkv.bias"]
    assert torch.equal(qkv_bias[d : 2 * d], torch.zeros(d))  # DINOv3 has no key bias
    assert torch.equal(
        got["patch_embed.blocks.1.mlp.fc2.weight"], src.state_dict()["patch_embed.blocks.1.mlp.fc2.weight"]
    )
