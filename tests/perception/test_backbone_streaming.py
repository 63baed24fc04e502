"""Streaming equals the full causal pass; bounded windows; cache behaviour; bad input; one streaming path."""

from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import pytest
import torch

from omnistream_perception import model as model_package
from omnistream_perception.model import (
    KVCache,
    OmniStreamConfig,
    OmniStreamModel,
    OmniStreamSession,
    StreamResetWarning,
)
from omnistream_perception.model.rope import rope_angles

TOL = 1e-4


def random_model(seed=0, **cfg) -> OmniStreamModel:
    """A model whose every parameter matters (LayerScale ~1, random special tokens and aspect embedder)."""
    torch.manual_seed(seed)
    config = OmniStreamConfig(**{"hidden_size": 64, "num_attention_heads": 4, "depth": 2, **cfg})
    model = OmniStreamModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "token" in name or "ar_embedder" in name:
                p.copy_(torch.randn_like(p))
    return model


def stream_all(model, clip, pattern, step_kwargs=None, **stream_kwargs):
    stream = OmniStreamSession(model, batch_size=clip.shape[0], **stream_kwargs)
    outs, i = [], 0
    for k in pattern:
        outs.append(stream.step(clip[:, i : i + k], **(step_kwargs or {})))
        i += k
    assert i == clip.shape[1]
    return stream, outs


def cat(outs, key):
    return torch.cat([getattr(o, key) for o in outs], dim=1)


CONFIGS = [
    dict(hidden_size=64, num_attention_heads=4, depth=2),  # head dim 16
    dict(hidden_size=96, num_attention_heads=3, depth=3),  # head dim 32
    dict(hidden_size=128, num_attention_heads=2, depth=2, ffn_layer="swiglu"),  # head dim 64
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["hd16", "hd32", "hd64-swiglu"])
@pytest.mark.parametrize("pattern", [[1] * 6, [2, 1, 2, 1], [6], [1, 5]], ids=["1x6", "2-1-2-1", "one-chunk", "1-5"])
def test_streaming_equals_full_causal_pass(cfg, pattern):
    model = random_model(**cfg)
    clip = torch.randn(2, 6, 3, 32, 48)  # a batch of two streams, non-square frames
    with torch.no_grad():
        full = model(clip, camera_token=True)
    stream, outs = stream_all(model, clip, pattern, camera_token=True)
    for key in ("last_hidden_state", "pooler_output", "camera_token"):
        assert (cat(outs, key) - getattr(full, key)).abs().max() <= TOL, key
    assert stream.frames_seen == 6 and stream.cached_frames == 6


def test_hidden_states_stream_too():
    model = random_model()
    clip = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        full = model(clip)
    _, outs = stream_all(model, clip, [1, 2, 1], step_kwargs={"output_hidden_states": True})
    per_layer = [torch.cat([o.hidden_states[i] for o in outs], 1) for i in range(2)]
    for i in range(2):
        assert (per_layer[i] - full.hidden_states[i]).abs().max() <= TOL
    # a chosen subset of layers comes back in the order asked for
    stream = OmniStreamSession(model)
    out = stream.step(clip[:, 0], output_hidden_states=[1])
    assert len(out.hidden_states) == 1 and (out.hidden_states[0] - full.hidden_states[1][:, :1]).abs().max() <= TOL


def first_block_input(model, clip, **kwargs) -> torch.Tensor:
    """The tokens (B, T, N, D) the forward feeds its first block."""
    seen = []
    hook = model.patch_embed.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(clip, **kwargs)
    finally:
        hook.remove()
    return seen[0].reshape(clip.shape[0], clip.shape[1], -1, seen[0].shape[-1])


def test_first_frame_tokens_follow_the_absolute_index():
    """A chunk starting mid-stream must use the later-frame register/camera tokens, not the first-frame ones."""
    model = random_model()
    clip = torch.randn(1, 3, 3, 32, 32)
    tokens_mid = first_block_input(model, clip[:, 1:], camera_token=True, frame_offset=1)
    tokens_first = first_block_input(model, clip[:, :1], camera_token=True)
    reg = model.patch_embed.register_token
    assert torch.equal(tokens_first[0, 0, 2:6], reg[0, 0])
    assert torch.equal(tokens_mid[0, 0, 2:6], reg[0, 1])
    # and the streamed chunk [1:3] equals the full pass, which it could not if frame 1 used first-frame tokens
    with torch.no_grad():
        full = model(clip, camera_token=True)
    _, outs = stream_all(model, clip, [1, 2], camera_token=True)
    assert (cat(outs, "last_hidden_state") - full.last_hidden_state).abs().max() <= TOL


def test_camera_token_uses_the_aspect_ratio():
    model = random_model()
    clip = torch.randn(1, 1, 3, 32, 64)
    with torch.no_grad():
        a = model(clip, camera_token=True).camera_token
        b = model(clip, aspect_ratio=2.0, camera_token=True).camera_token
        c = model(clip, aspect_ratio=0.5, camera_token=True).camera_token
    assert torch.allclose(a, c)  # default is H/W = 0.5
    assert not torch.allclose(a, b)


class ExplicitWindowMask:
    """In place of the KV cache in one full pass: stores nothing, and hands attention the mask a single-frame
    windowed stream implies (frame t sees the first `sink` frames, the `window - sink` frames before it, and
    itself), built independently of the cache's ring."""

    num_cached = 0

    def __init__(self, window: int, sink: int) -> None:
        self.window, self.sink = window, sink

    def begin_step(self, num_frames, tokens_per_frame, num_layers):
        frames = torch.arange(num_frames)
        qf = frames.repeat_interleave(tokens_per_frame)[:, None]
        kf = frames.repeat_interleave(tokens_per_frame)[None, :]
        recent = self.window - self.sink
        self.mask = (kf <= qf) & ((kf == qf) | (kf < self.sink) | (kf >= qf - recent))

    def step_mask(self, device):
        return self.mask.to(device)

    def write(self, layer, k, v):
        return k, v

    def end_step(self):
        pass


def windowed_reference(model, clip, window, sink):
    """Full pass with an explicit windowed mask; RoPE time is the absolute frame index."""
    with torch.no_grad():
        return model(clip, output_hidden_states=False, past_key_values=ExplicitWindowMask(window, sink))


@pytest.mark.parametrize("window,sink", [(4, 1), (3, 0), (5, 2)])
def test_window_keeps_sinks_and_recent_frames_with_absolute_time(window, sink):
    model = random_model()
    clip = torch.randn(1, 11, 3, 32, 32)
    ref = windowed_reference(model, clip, window, sink)
    stream, outs = stream_all(model, clip, [1] * 11, window=window, sink=sink)
    assert (cat(outs, "last_hidden_state") - ref.last_hidden_state).abs().max() <= TOL
    assert stream.cached_frames == window and stream.frames_seen == 11


def test_window_bounds_memory_and_never_reallocates():
    model = random_model()
    stream = OmniStreamSession(model, window=4, sink=1)
    frame = torch.randn(1, 3, 32, 32)
    stream.step(frame)
    ptr, nbytes = stream.cache.buffer.data_ptr(), stream.cache_bytes
    for _ in range(30):
        stream.step(frame)
        assert stream.cached_frames <= 4
    assert stream.cache.buffer.data_ptr() == ptr and stream.cache_bytes == nbytes


def test_unbounded_cache_grows_geometrically():
    model = random_model()
    stream = OmniStreamSession(model)
    frame = torch.randn(1, 3, 32, 32)
    pointers = set()
    for _ in range(40):
        stream.step(frame)
        pointers.add(stream.cache.buffer.data_ptr())
    assert len(pointers) <= 3  # 16 -> 32 -> 64 frames: amortised O(1) copying, not a concat per step


def test_single_frame_steps_build_no_attention_mask(monkeypatch):
    model = random_model()
    stream = OmniStreamSession(model)
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return original(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for _ in range(3):
        stream.step(torch.randn(1, 3, 32, 32))
    assert seen and all(m is None for m in seen)
    seen.clear()
    stream.step(torch.randn(1, 2, 3, 32, 32))
    assert all(m is not None for m in seen)


@pytest.mark.margin
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, "float16"])
def test_low_precision_cache_stays_close(cache_dtype, seed, margin):
    model = random_model(seed)
    clip = torch.randn(1, 5, 3, 32, 32)
    _, ref = stream_all(model, clip, [1] * 5)
    stream, outs = stream_all(model, clip, [1] * 5, cache_dtype=cache_dtype)
    assert stream.cache.buffer.dtype in (torch.bfloat16, torch.float16)
    diff = (cat(outs, "last_hidden_state") - cat(ref, "last_hidden_state")).abs().max()
    assert diff > 0  # the cache really is in low precision
    margin("max abs difference to the float32 cache", diff, 0.1, higher_is_better=False)


def test_resolution_change_resets_with_a_warning():
    model = random_model()
    stream = OmniStreamSession(model)
    stream.step(torch.randn(1, 3, 32, 32))
    stream.step(torch.randn(1, 3, 32, 32))
    frame = torch.randn(1, 3, 48, 32)
    with pytest.warns(StreamResetWarning, match="resolution changed"):
        out = stream.step(frame)
    assert stream.frames_seen == 1 and int(out.frame_indices[0]) == 0
    fresh = OmniStreamSession(model).step(frame)
    assert torch.equal(out.last_hidden_state, fresh.last_hidden_state)


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.randn(1, 1, 3, 30, 32), "multiples of the patch size"),
        (torch.randint(0, 255, (1, 1, 3, 32, 32), dtype=torch.uint8), "float tensor"),
        (torch.randn(1, 1, 4, 32, 32), r"\(batch, frames, 3, height, width\)"),
        (torch.randn(3, 32, 32), r"\(batch, frames, 3, height, width\)"),
        (torch.randn(2, 1, 3, 32, 32), "batch_size=1"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_bad_input_raises_a_clear_value_error(bad, match):
    model = random_model()
    stream = OmniStreamSession(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=match):
            stream.step(bad)
    assert stream.frames_seen == 0


def test_rope_layout_matches_the_published_formula():
    """Re-derive angles element by element from the spec: [Y|Y|X|X], then i % 4 == 3 holds time."""
    d, h, w, base, total = 16, 2, 3, 100.0, 16.0
    frames = torch.tensor([0, 5, 37])
    got = rope_angles(frames, h, w, d, base, total)
    for fi, f in enumerate(frames.tolist()):
        for r in range(h):
            for c in range(w):
                y, x, t = 2 * (r + 0.5) / h - 1, 2 * (c + 0.5) / w - 1, f / total
                for i in range(d):
                    if i % 4 == 3:
                        j, coord = (i // 4) % (d // 8), t
                    else:
                        j, coord = i % (d // 4), (y if i < d // 2 else x)
                    expected = 2 * math.pi * coord / base ** (4 * j / d)
                    assert abs(got[fi, r * w + c, i].item() - expected) < 1e-4, (f, r, c, i)


# ------------------------------------------------------------------------------------------------------
# One streaming path: the model's forward takes the cache and the frame offset; the session only calls it
# ------------------------------------------------------------------------------------------------------
def test_the_full_pass_is_the_forward_with_an_empty_cache_and_offset_0():
    model = random_model()
    clip = torch.randn(2, 6, 3, 32, 48)
    cache = KVCache()
    with torch.no_grad():
        full = model(clip, camera_token=True)
        first = model(clip[:, :4], camera_token=True, past_key_values=cache, frame_offset=0)
        head = model(clip[:, :4], camera_token=True)
        rest = model(clip[:, 4:], camera_token=True, past_key_values=cache, frame_offset=4)
    for key in ("last_hidden_state", "pooler_output", "camera_token"):
        assert (getattr(first, key) - getattr(head, key)).abs().max() <= 1e-6, key
        assert (torch.cat([getattr(first, key), getattr(rest, key)], 1) - getattr(full, key)).abs().max() <= TOL, key
    for i in range(model.config.depth):
        assert (first.hidden_states[i] - head.hidden_states[i]).abs().max() <= 1e-6
    assert rest.frame_indices.tolist() == [4, 5] and cache.num_cached == 6


def test_an_offset_behind_the_cache_or_another_token_grid_is_refused():
    model = random_model()
    cache = KVCache()
    with torch.no_grad():
        model(torch.randn(1, 2, 3, 32, 32), past_key_values=cache)
        with pytest.raises(ValueError, match="frame_offset 0 is behind the 2 frames"):
            model(torch.randn(1, 1, 3, 32, 32), past_key_values=cache)
        with pytest.raises(ValueError, match="needs a new cache"):
            model(torch.randn(1, 1, 3, 48, 32), past_key_values=cache, frame_offset=2)
    assert cache.num_cached == 2


def test_a_refused_frame_leaves_the_stream_as_it_was():
    """Only a frame the model accepts moves the resolution guard: a bad one neither warns nor restarts."""
    model = random_model()
    clip = torch.randn(1, 3, 3, 32, 32)
    stream = OmniStreamSession(model)
    stream.step(clip[:, 0])
    stream.step(clip[:, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="multiples of the patch size"):
            stream.step(torch.randn(1, 3, 30, 32))
    assert stream.frames_seen == 2 and stream.cached_frames == 2
    out = stream.step(clip[:, 2])
    with torch.no_grad():
        full = model(clip)
    assert int(out.frame_indices[0]) == 2
    assert (out.last_hidden_state - full.last_hidden_state[:, 2:]).abs().max() <= TOL


MODEL_DIR = Path(model_package.__file__).parent


def _model_imports(path: Path) -> set[str]:
    """Sibling modules of the model package that ``path`` imports (anywhere in the file, lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif (node.module or "").startswith("omnistream_perception.model."):
                names.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[2] for a in node.names if a.name.startswith("omnistream_perception.model."))
    return names


def test_no_import_cycle_in_the_model_package():
    graph = {p.stem: _model_imports(p) for p in MODEL_DIR.glob("*.py") if p.stem != "__init__"}
    assert "streaming" not in graph["modeling_omnistream"] and "streaming" not in graph["kv_cache"]

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in graph.get(start, ()))

    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, f"modules importing themselves through others: {cycles}"


@pytest.mark.parametrize("path", ["model/streaming.py", "deploy/onnx_export.py"])
def test_the_session_and_the_export_call_only_the_model_forward(path):
    """No model internals (private methods or attributes) in the streaming session or the exported step."""
    tree = ast.parse((MODEL_DIR.parent / path).read_text())
    reached = sorted(
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and (
            (isinstance(node.value, ast.Name) and node.value.id == "model")
            or (isinstance(node.value, ast.Attribute) and node.value.attr == "model")
        )
    )
    assert not reached, f"{path} reaches into the model: {reached}"
    if path == "model/streaming.py":  # the session touches nothing of the model but its call
        touched = [
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "model"
        ]
        assert not touched, touched
