"""ONNX export of the streaming step: onnxruntime matches torch streaming (window, sinks, heads), the
PerceptionSession drop-in, `omnistream export onnx` (check and errors) and `bench stream --backend onnxruntime`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -r requirements.txt)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -r requirements.txt)")

from omnistream_cli.main import main  # noqa: E402
from omnistream_perception.deploy.onnx_export import export_stream_step  # noqa: E402
from omnistream_perception.deploy.onnx_session import (  # noqa: E402
    OnnxStreamSession,
    attach_onnxruntime,
    compare_with_torch,
    read_metadata,
)
from omnistream_perception.model import OmniStreamModel, OmniStreamSession, StreamResetWarning  # noqa: E402
from omnistream_perception.model.heads import GeometryHeads, GeometryHeadsConfig  # noqa: E402
from omnistream_perception.perception import PerceptionConfig, PerceptionSession  # noqa: E402

TOLERANCE = 1e-4  # float32, the goal; measured diffs are ~5e-6


@pytest.fixture(scope="module")
def debug_checkpoint(tmp_path_factory):
    """A debug backbone with tiny geometry heads whose pose depends on the input (the camera head's last layer
    starts at zero, which would make any pose match)."""
    directory = tmp_path_factory.mktemp("debug_heads")
    torch.manual_seed(0)
    model = OmniStreamModel.from_preset("debug")
    model.save_pretrained(directory)
    heads = GeometryHeads(GeometryHeadsConfig.for_backbone(model.config.hidden_size, model.config.depth, "tiny"))
    torch.nn.init.normal_(heads.camera_head.mlp[-1].weight, std=0.5)
    heads.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("window,sink,opset", [(8, 1, 23), (6, 0, 18), (5, 5, 23)])
def test_fixture_stream_of_40_frames_matches_torch(fixture_a, tmp_path, window, sink, opset):
    model = OmniStreamModel.from_pretrained(fixture_a)
    path = export_stream_step(model, tmp_path / "s.onnx", window=window, sink=sink, resolution=(64, 64), opset=opset)
    # opset 23: the fused ONNX Attention op; 18: plain MatMul/Softmax for runtimes without it
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ("Attention" in ops) == (opset >= 23)
    diffs = compare_with_torch(model, None, path, frames=40)
    assert set(diffs) == {"last_hidden_state", "pooler_output"}
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_the_ring_really_bounds_the_context(fixture_a, tmp_path):
    """The parity above is not vacuous: past the window, the bounded step differs from an unbounded stream."""
    model = OmniStreamModel.from_pretrained(fixture_a)
    path = export_stream_step(model, tmp_path / "step.onnx", window=4, sink=1, resolution=(64, 64))
    onnx_stream, unbounded = OnnxStreamSession(path), OmniStreamSession(model, window=None)
    gen = torch.Generator().manual_seed(1)
    diffs = []
    for _ in range(10):
        frame = torch.randn(1, 3, 64, 64, generator=gen)
        got, ref = onnx_stream.step(frame), unbounded.step(frame)
        diffs.append(float((got.last_hidden_state - ref.last_hidden_state).abs().max()))
    assert max(diffs[:5]) <= TOLERANCE  # frames 0..4 see everything either way
    assert min(diffs[6:]) > 100 * TOLERANCE
    assert onnx_stream.cached_frames == 4 and onnx_stream.frames_seen == 10


def test_heads_and_rays_in_the_graph_match_torch(debug_checkpoint, tmp_path):
    model = OmniStreamModel.from_pretrained(debug_checkpoint)
    heads = GeometryHeads.from_pretrained(debug_checkpoint)
    path = export_stream_step(
        model, tmp_path / "step.onnx", window=6, sink=2, resolution=(48, 64), heads=heads, rays=True
    )
    meta = read_metadata(path)
    assert meta["heads"] and meta["camera_token"] and meta["head_layers"] == heads.layers
    diffs = compare_with_torch(model, heads, path, frames=40)
    assert {"depth", "depth_conf", "rays", "points", "pose_enc", "camera_token"} <= set(diffs)
    assert max(diffs.values()) <= TOLERANCE, diffs
    # chunks are stepped frame by frame with the same results as single frames
    a, b = OnnxStreamSession(path), OnnxStreamSession(path)
    clip = torch.randn(1, 3, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    chunked = a.step(clip)
    singles = [b.step(clip[:, i]) for i in range(3)]
    assert chunked.heads["depth"].shape == (1, 3, 48, 64) and chunked.heads["pose_enc"].shape == (1, 3, 9)
    assert torch.equal(chunked.heads["depth"][:, 2], singles[2].heads["depth"][:, 0])
    assert chunked.frame_indices.tolist() == [0, 1, 2]


def test_perception_session_drop_in_gives_the_torch_results(debug_checkpoint, tmp_path):
    config = PerceptionConfig(str(debug_checkpoint), window=4, sink=1, feature_dtype="float32")
    torch_session = PerceptionSession.from_config(config)
    onnx_session = PerceptionSession.from_config(config)
    model = OmniStreamModel.from_pretrained(debug_checkpoint)
    heads = GeometryHeads.from_pretrained(debug_checkpoint)
    path = export_stream_step(model, tmp_path / "step.onnx", window=4, sink=1, resolution=(64, 96), heads=heads)
    attach_onnxruntime(onnx_session, path)
    rng = np.random.default_rng(0)
    for _ in range(7):
        rgb = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
        ref = torch_session.process(rgb, want_points=True)
        got = onnx_session.process(rgb, want_points=True)
        assert got.frame_index == ref.frame_index
        np.testing.assert_allclose(got.patch_tokens, ref.patch_tokens, atol=TOLERANCE)
        np.testing.assert_allclose(got.cls_token, ref.cls_token, atol=TOLERANCE)
        np.testing.assert_allclose(got.depth, ref.depth, atol=TOLERANCE, rtol=1e-5)
        np.testing.assert_allclose(got.pose, ref.pose, atol=TOLERANCE)
        np.testing.assert_allclose(got.points, ref.points, atol=1e-3, rtol=1e-4)
    assert onnx_session.cached_frames == 4 and onnx_session.frames_seen == 7
    # a frame the graph was not exported for is a clear error, not a silent resize
    with pytest.warns(StreamResetWarning), pytest.raises(ValueError, match="export again"):
        onnx_session.process(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))


def test_attach_refuses_a_graph_with_another_window(debug_checkpoint, tmp_path):
    model = OmniStreamModel.from_pretrained(debug_checkpoint)
    path = export_stream_step(model, tmp_path / "step.onnx", window=3, resolution=(32, 32))
    session = PerceptionSession.from_config(PerceptionConfig(str(debug_checkpoint), window=4))
    with pytest.raises(ValueError, match="window, sink, camera_token"):
        attach_onnxruntime(session, path)


def test_cli_export_with_check_prints_the_diff(debug_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    args = ["export", "onnx", "--checkpoint", str(debug_checkpoint), "--window", "8", "--resolution", "64x48"]
    assert main(args + ["--out", str(out), "--check", "--check-frames", "12"]) == 0
    printed = capsys.readouterr().out
    value = float(re.search(r"max abs diff (\S+)", printed).group(1))
    assert value <= TOLERANCE
    meta = read_metadata(out)
    assert meta["resolution"] == [48, 64] and meta["window"] == 8 and meta["sink"] == 1 and meta["heads"]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--checkpoint": "does/not/exist"}, "no such directory"),
        ({"--resolution": "65"}, "multiple of the patch size"),
        ({"--resolution": "big"}, "R or WIDTHxHEIGHT"),
        ({"--sink": "9"}, "--sink"),
        ({"--window": "0"}, "--window"),
    ],
)
def test_cli_errors_are_user_errors(fixture_a, tmp_path, capsys, change, message):
    opts = {"--checkpoint": str(fixture_a), "--window": "8", "--resolution": "64", "--out": str(tmp_path / "x.onnx")}
    opts.update(change)
    assert main(["export", "onnx"] + [item for pair in opts.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert "omnistream export: error:" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_bench_stream_onnxruntime_backend_reports_both(tmp_path):
    path = tmp_path / "bench.json"
    args = ["bench", "stream", "--preset", "debug", "--resolution", "32", "--frames", "5,7", "--window", "4"]
    assert main(args + ["--repeats", "1", "--no-recompute", "--backend", "onnxruntime", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [r["frames"] for r in rows] == [5, 7]
    for r in rows:
        assert r["stream_ms"] > 0 and r["onnxruntime_ms"] > 0 and r["torch_paired_ms"] > 0
        assert r["onnxruntime_vs_torch"] == pytest.approx(r["torch_paired_ms"] / r["onnxruntime_ms"], rel=0.05)
