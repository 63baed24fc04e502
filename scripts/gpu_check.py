"""The Python side of ``scripts/gpu_check.sh``: the fixture parity on a device, and the summary of a run.

    python scripts/gpu_check.py parity --device cuda --dtype float32 --json OUT/parity_float32.json
    python scripts/gpu_check.py summary OUT

``parity`` runs the authors' tiny fixture (``../shared/fixtures/upstream_tiny_a``) on ``--device`` in ``--dtype``:
the full pass and the frame-by-frame stream against the authors' reference outputs, and a bounded stream (window
4, sink 1, 12 frames: the ring wraps) against the same stream in float32 on the CPU. Tolerances are those of the
CPU tests: float32 within 1e-4 max abs (``test_backbone_checkpoint``; TF32 is switched off, since it rounds
float32 matmuls and convolutions to a 10-bit mantissa), bfloat16 a per-token cosine similarity of at least 0.999
to float32 (``test_bf16_stream``), its max abs difference reported beside it. Exit 1 when a check fails.

``summary`` prints what the JSON files of a run say (parity verdicts, Table 9 rows, the node benchmark).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "upstream_tiny_a"
FLOAT32_MAX_ABS = 1e-4
BF16_MIN_COSINE = 0.999


def _compare(got, want) -> dict[str, float]:
    import torch

    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    cosine = torch.nn.functional.cosine_similarity(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]))
    return {"max_abs": float((got - want).abs().max()), "min_cosine": float(cosine.min())}


def parity(device_name: str, dtype_name: str, fixture: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from omnistream_perception.model import OmniStreamModel, OmniStreamSession
    from omnistream_perception.model.streaming import as_dtype

    device, dtype = torch.device(device_name), as_dtype(dtype_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    reference = load_file(str(fixture / "reference_io.safetensors"))
    cpu_model = OmniStreamModel.from_pretrained(fixture).eval()
    model = OmniStreamModel.from_pretrained(fixture).to(device, dtype).eval()
    pixels = reference["pixel_values"].to(device, dtype)
    checks: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        full = model(pixels, output_hidden_states=True)
        checks["full_pass.last_hidden_state"] = _compare(full.last_hidden_state, reference["last_hidden_state"])
        checks["full_pass.pooler_output"] = _compare(full.pooler_output, reference["pooler_output"])
        for i, hidden in enumerate(full.hidden_states):
            checks[f"full_pass.hidden_states.{i}"] = _compare(hidden, reference[f"hidden_states.{i}"])
        stream = OmniStreamSession(model)
        streamed = torch.cat([stream.step(pixels[:, i]).last_hidden_state for i in range(pixels.shape[1])], dim=1)
        checks["stream.last_hidden_state"] = _compare(streamed, reference["last_hidden_state"])
        on_device, on_cpu = OmniStreamSession(model, window=4, sink=1), OmniStreamSession(cpu_model, window=4, sink=1)
        generator = torch.Generator().manual_seed(0)
        worst: dict[str, float] = {"max_abs": 0.0, "min_cosine": 1.0}
        for _ in range(12):
            frame = torch.randn(1, 3, 64, 64, generator=generator)
            got = on_device.step(frame.to(device, dtype)).last_hidden_state
            row = _compare(got, on_cpu.step(frame).last_hidden_state)
            worst = {"max_abs": max(worst["max_abs"], row["max_abs"]), "min_cosine": min(worst["min_cosine"], row["min_cosine"])}  # fmt: skip
        checks["window_4_stream_vs_cpu_float32.last_hidden_state"] = worst
    if dtype == torch.float32:
        rule = f"max_abs <= {FLOAT32_MAX_ABS:g}"
        failed = [name for name, c in checks.items() if not c["max_abs"] <= FLOAT32_MAX_ABS]
    else:
        rule = f"min_cosine >= {BF16_MIN_COSINE:g}"
        failed = [name for name, c in checks.items() if not c["min_cosine"] >= BF16_MIN_COSINE]
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": label,
        "dtype": dtype_name,
        "rule": rule,
        "passed": not failed,
        "failed": failed,
        "checks": checks,
    }


def summary(out: Path) -> list[str]:
    lines = []
    for path in sorted(out.glob("parity_*.json")):
        r = json.loads(path.read_text())
        worst_abs = max(c["max_abs"] for c in r["checks"].values())
        worst_cos = min(c["min_cosine"] for c in r["checks"].values())
        verdict = "PASS" if r["passed"] else f"FAIL ({', '.join(r['failed'])})"
        lines.append(f"parity {r['dtype']:<9} on {r['device']}: {verdict}; rule {r['rule']}; "
                     f"worst max abs {worst_abs:.3g}, worst cosine {worst_cos:.6f}")  # fmt: skip
    for path in sorted(out.glob("table9_*.json")):
        r = json.loads(path.read_text())
        lines.append(
            f"{path.stem}: {r['preset']} {r['resolution']}px {r['dtype']} window {r['window']} on {r['device']}"
        )
        for row in r["results"]:
            recompute = "-" if row.get("recompute_ms") is None else f"{row['recompute_ms']:.1f} ms"
            recompute_mb = "-" if row.get("recompute_peak_mb") is None else f"{row['recompute_peak_mb']:.0f} MB"
            lines.append(f"  T={row['frames']:>4}: stream {row['stream_ms']:.1f} ms, {row['stream_peak_mb']:.0f} MB; "
                         f"recompute {recompute}, {recompute_mb}")  # fmt: skip
    node = out / "bench_node.json"
    if node.is_file():
        r = json.loads(node.read_text())
        o = r.get("overhead", {})
        lines.append(f"bench node ({r.get('checkpoint')}, {r.get('device')}): bare step {o.get('bare_model_step_ms')} ms, "
                     f"node overhead {o.get('overhead_ms')} ms, within budget: {o.get('within_budget')}")  # fmt: skip
        if "realtime" in r:
            rt = r["realtime"]
            lines.append(f"  {rt['published']} frames at {rt['rate_hz']:g} Hz: processed {rt['processed']}, "
                         f"{rt['processed_rate_hz']} Hz, latency median {rt['latency_median_ms']} ms")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="the fixture's parity on a device")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--fixture", type=Path, default=FIXTURE)
    p.add_argument("--json", dest="json_path", type=Path, required=True)
    s = sub.add_parser("summary", help="print what a run's JSON files say")
    s.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "summary":
        print("\n".join(summary(args.out)))
        return 0
    if not (args.fixture / "reference_io.safetensors").is_file():
        print(f"gpu_check: the fixture is missing: {args.fixture}", file=sys.stderr)
        return 2
    result = parity(args.device, args.dtype, args.fixture)
    args.json_path.parent.mkdir(parents=True, exist_ok=True)
    args.json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"parity {args.dtype} on {result['device']}: {'PASS' if result['passed'] else 'FAIL'} ({result['rule']})")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
