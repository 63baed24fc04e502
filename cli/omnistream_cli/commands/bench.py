"""`omnistream bench ...`: benchmarks that print a table and write JSON."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="speed and memory benchmarks (table + JSON)")
    group = bench.add_subparsers(dest="bench", metavar="BENCH")
    group.required = True

    p = group.add_parser(
        "stream",
        help="latency/memory of the T-th frame: streaming step vs recomputing all T frames (paper Table 9)",
    )
    p.add_argument("--preset", default="small", help="backbone preset: debug|small|base|large (default small)")
    p.add_argument("--checkpoint", default=None, help="load a checkpoint instead of a random preset")
    p.add_argument("--resolution", type=int, default=224, help="square input size in pixels (default 224)")
    p.add_argument("--frames", default="16,32,64,128", help="comma-separated context lengths T")
    p.add_argument("--window", type=int, default=None, help="bounded cache of W frames (default unbounded)")
    p.add_argument("--sink", type=int, default=1, help="sink frames kept with --window (default 1)")
    p.add_argument("--dtype", default="float32", help="float32|bfloat16|float16 (default float32)")
    p.add_argument("--cache-dtype", default=None, help="KV cache dtype (default: the model dtype)")
    p.add_argument("--device", default=None, help="cpu|cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per point; the median is reported")
    p.add_argument("--no-recompute", action="store_true", help="skip the recompute baseline (long streams)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="onnxruntime: also time the exported float32 step (onnxruntime) beside torch",
    )
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.set_defaults(handler=_stream)

    # --- vla (omnistream_vla) ---
    p = group.add_parser("vla", help="VLA policy latency per control step: the full prompt vs the reused prefix")
    p.add_argument("--preset", default="debug,demo",
                   help="debug | demo | qwen2.5-0.5b | ..., comma-separated (random weights of that shape)")  # fmt: skip
    p.add_argument("--checkpoint", default=None, help="time a policy directory instead of a random preset")
    p.add_argument("--images", action="store_true", help="include the backbone (raw images, as in-process sim)")
    p.add_argument("--dtype", default="float32", help="LLM dtype: float32|bfloat16|float16 (default float32)")
    p.add_argument("--device", default=None, help="cpu|cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measure; the median is reported")
    p.add_argument("--chunks", type=int, default=3, help="action chunks of select_action calls to time")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.set_defaults(handler=_vla)

    # -- node: the perception node's overhead and real-time behaviour (issue 3) --
    p = group.add_parser(
        "node",
        help="perception_node: publish->features/depth latency vs the bare model step, and a 30 Hz camera",
    )
    p.add_argument("--preset", default="small", help="backbone preset with random weights (default small)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory instead of a random preset")
    p.add_argument("--no-heads", action="store_true", help="random preset without geometry heads (features only)")
    p.add_argument("--image-size", default="640x480", help="camera image WIDTHxHEIGHT (default 640x480)")
    p.add_argument("--frames", type=int, default=10, help="timed frames for the overhead (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed frames first (default 2)")
    p.add_argument("--stream-frames", type=int, default=300, help="frames at --rate (default 300; 0 skips)")
    p.add_argument("--null-frames", type=int, default=50, help="frames for the node-alone measurement (default 50)")
    p.add_argument("--rate", type=float, default=30.0, help="camera rate in Hz for the real-time part (default 30)")
    p.add_argument("--extra-model-ms", type=float, default=0.0, help="make the model slower by this much per frame")
    p.add_argument("--window", type=int, default=None, help="KV cache window in frames (default: the node's, 16)")
    p.add_argument("--device", default=None, help="cpu|cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="float32|bfloat16|float16 (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")

    def _node(args: argparse.Namespace) -> int:
        from omnistream_cli.benchmarks.node import run_node_benchmark

        return run_node_benchmark(args)

    p.set_defaults(handler=_node)

    p = group.add_parser(
        "contention",
        help="each workload quiet and beside busy competing processes, side by side: loaded/quiet ratios",
    )
    p.add_argument("--workloads", default="pretrain,perception,vla", help="subset of pretrain,perception,vla")
    p.add_argument("--competitors", type=int, default=1, help="busy processes competing for the cores (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="quiet/loaded pairs per workload (default 3)")
    p.add_argument("--preset", default="small", help="backbone preset of the perception workload (default small)")
    p.add_argument("--resolution", type=int, default=224, help="perception input size (default 224)")
    p.add_argument("--limit", type=float, default=2.2, help="ratio reported as within budget (default 2.2)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.set_defaults(handler=_contention)


def _contention(args: argparse.Namespace) -> int:
    from omnistream_cli.benchmarks.contention import run_contention_benchmark

    return run_contention_benchmark(args)


def _stream(args: argparse.Namespace) -> int:
    from omnistream_cli.benchmarks.stream import run_stream_benchmark

    return run_stream_benchmark(args)


def _vla(args: argparse.Namespace) -> int:
    from omnistream_cli.benchmarks.vla import run_vla_benchmark

    return run_vla_benchmark(args)
