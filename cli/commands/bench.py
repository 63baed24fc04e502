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
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.set_defaults(handler=_stream)


def _stream(args: argparse.Namespace) -> int:
    from omnistream_perception.bench import run_stream_benchmark

    return run_stream_benchmark(args)
