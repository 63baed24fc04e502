"""`bench stream` counts the step's FLOPs from the config: the count equals what torch's FLOP counter sees."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from omnistream_cli.benchmarks.stream import benchmark_stream, matmul_peak_gflops, step_gflop
from omnistream_perception.model import OmniStreamModel, OmniStreamSession


def counted_gflop(stream, pixels) -> float:
    # The math SDPA backend decomposes attention into matmuls the counter sees (the fused CPU kernel it skips).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        stream.step(pixels)
    return counter.get_total_flops() / 1e9


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
@pytest.mark.parametrize("camera_token", [False, True])
def test_single_frame_step_matches_the_flop_counter(ffn, camera_token):
    torch.manual_seed(0)
    model = OmniStreamModel.from_preset("debug", ffn_layer=ffn).eval()
    stream = OmniStreamSession(model, window=4, sink=1, camera_token=camera_token)
    frame = torch.randn(1, 3, 32, 48)
    for frames_seen in range(7):  # through filling the window and into ring mode
        expected = step_gflop(model.config, (32, 48), stream.cached_frames + 1, camera_token=camera_token)
        assert counted_gflop(stream, frame) == pytest.approx(expected, rel=1e-9), frames_seen


def test_multi_frame_step_matches_the_flop_counter():
    torch.manual_seed(0)
    model = OmniStreamModel.from_preset("debug").eval()
    stream = OmniStreamSession(model)
    stream.step(torch.randn(1, 2, 3, 32, 32))
    expected = step_gflop(model.config, 32, stream.cached_frames + 3, frames=3)
    assert counted_gflop(stream, torch.randn(1, 3, 3, 32, 32)) == pytest.approx(expected, rel=1e-9)


def test_attention_grows_with_the_context_and_dominates_the_small_preset():
    from omnistream_perception.model import OmniStreamConfig

    config = OmniStreamConfig.preset("small")
    no_context, window = step_gflop(config, 224, 1), step_gflop(config, 224, 17)
    assert 15 < window < 30  # the windowed small step at 224 is about 20 GFLOP
    assert window > 2 * no_context


def test_bench_rows_report_gflop_throughput_and_fraction_of_peak():
    torch.manual_seed(0)
    model = OmniStreamModel.from_preset("debug").eval()
    peak = matmul_peak_gflops(torch.float32, torch.device("cpu"), size=256, repeats=1)
    assert peak > 0
    rows = benchmark_stream(model, [2, 5], 32, window=3, repeats=1, recompute=False, peak_gflops=peak)
    for row in rows:
        assert row["gflop"] > 0 and row["gflops"] > 0
        assert row["peak_fraction"] == pytest.approx(row["gflops"] / peak, abs=1e-3)
    assert rows[1]["gflop"] > rows[0]["gflop"]  # 3 cached frames attended instead of 1
