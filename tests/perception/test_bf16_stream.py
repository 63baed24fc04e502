"""The embedded default (bfloat16 weights and cache, window 16) streams features within cosine 0.999 of float32."""

from __future__ import annotations

import copy

import pytest
import torch

from omnistream_cli.benchmarks.stream import stream_cosine
from omnistream_perception.model import OmniStreamModel


def model_with_active_blocks(**overrides) -> OmniStreamModel:
    """A small random backbone whose blocks all matter: variance-preserving weights and LayerScale at 1. The
    training init (std 0.02, LayerScale 1e-5) leaves every block close to the identity, where the features are
    the patch embedding and any precision would look good."""
    torch.manual_seed(0)
    cfg = dict(hidden_size=128, num_attention_heads=2, depth=6)  # head_dim 64 as in every real preset
    model = OmniStreamModel.from_preset("debug", **{**cfg, **overrides}).eval()
    with torch.no_grad():
        for block in model.patch_embed.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
            for layer in block.modules():
                if isinstance(layer, torch.nn.Linear):
                    torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
                    torch.nn.init.normal_(layer.bias, std=0.1)
    return model


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_bfloat16_window_16_stream_stays_within_cosine_0999_of_float32_over_64_frames(ffn):
    reference = model_with_active_blocks(ffn_layer=ffn)
    low = copy.deepcopy(reference).to(torch.bfloat16)
    result = stream_cosine(reference, low, 64, 64, window=16, sink=1)
    assert result["frames"] == 64
    assert result["patch_cosine_min"] >= 0.999, result
    assert result["cls_cosine_min"] >= 0.999, result


def test_the_cosine_check_sees_a_wrong_model():
    reference = model_with_active_blocks()
    other = model_with_active_blocks()
    with torch.no_grad():
        other.patch_embed.blocks[2].attn.qkv.weight.mul_(-1)
    result = stream_cosine(reference, other, 8, 64, window=4)
    assert result["patch_cosine_min"] < 0.99


def test_float32_stream_compared_with_itself_is_exact():
    reference = model_with_active_blocks()
    result = stream_cosine(reference, copy.deepcopy(reference), 20, 64, window=16)
    assert result["patch_cosine_min"] == pytest.approx(1.0, abs=1e-6)
