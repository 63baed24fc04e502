"""Shared test setup.

* ROS isolation: every test process gets its own ROS_DOMAIN_ID and localhost-only discovery, so parallel
  runs (and other machines) never see each other's topics.
* one OpenMP thread per process (tests use tiny models; timings are measured by benchmarks, not tests).
* layout: the folders mirror the code (``perception/``, ``vla/``, ``training/``, ``sim/``: library tests without
  ROS; ``ros/``: nodes over real rclpy; ``cli/``: the ``omnistream`` command); every folder is on ``sys.path`` so
  shared helpers (``ros_helpers``, ``calvin_split``) and another file's fixtures import by module name.
* ``--runslow`` enables tests marked ``slow`` (``make test-all``); without it they report SKIPPED with the reason.
* margins: a test whose verdict depends on a training run or a random draw takes the ``seed`` fixture and reports
  each checked value with ``margin(name, value, bound)``; ``scripts/measure_margins.py`` runs those tests
  (marker ``margin``) under several seeds and prints every value beside its bound. Seeds stand in for what another
  CPU does to a run (other kernels, other rounding, another trajectory).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
# Tiny test models: one intra-op thread avoids OpenMP oversubscription with ROS executor threads and
# parallel test processes (inherited by subprocesses, e.g. nodes and torchrun workers).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("AMENT_PREFIX_PATH", str(Path(os.sys.prefix)))

REPO = Path(__file__).resolve().parents[1]
TEST_FOLDERS = ("perception", "vla", "training", "sim", "ros", "cli")
for _folder in TEST_FOLDERS:
    sys.path.insert(0, str(Path(__file__).with_name(_folder)))
SHARED = REPO.parent / "shared"
FIXTURE_A = SHARED / "fixtures" / "upstream_tiny_a"


def run_torchrun(*argv: str, timeout: float = 600) -> None:
    """``torchrun --nproc-per-node 2 omnistream ARGV`` on a free port, one OpenMP thread per rank; fails the test
    with the tail of the output when a rank fails."""
    import shutil
    import socket
    import subprocess
    import sys

    def tool(name: str) -> str:
        return shutil.which(name) or str(Path(sys.executable).with_name(name))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [tool("torchrun"), "--nproc-per-node", "2", "--master-port", str(port), tool("omnistream"), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow (make test-all)")


def pytest_collection_modifyitems(config, items):
    # Wall-clock-sensitive node tests (control rates, stop deadlines, frame dropping) run first, before other
    # tests' ROS executors and torch thread pools have warmed the process up and can steal their time slices.
    items.sort(key=lambda item: 0 if "realtime" in item.keywords else 1)
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow check: run `make test-all` (pytest --runslow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixture_a() -> Path:
    if not FIXTURE_A.is_dir():
        pytest.fail(f"the upstream fixture is missing: {FIXTURE_A} (CI clones with ../shared beside the repo)")
    return FIXTURE_A


@pytest.fixture(scope="session")
def seed() -> int:
    """The seed of margin tests: ``OMNISTREAM_TEST_SEED`` (default 0), set by ``scripts/measure_margins.py``."""
    return int(os.environ.get("OMNISTREAM_TEST_SEED", "0"))


@pytest.fixture
def margin(request):
    """``margin(name, value, bound, higher_is_better=True, baseline=0)``: asserts ``value`` against ``bound``.

    ``baseline`` is the value of no effect (1 for a factor by which a loss falls, 0 for an error), so the margin
    rule of ``scripts/measure_margins.py`` reads "the bound asks for at most half the worst effect measured".
    With ``OMNISTREAM_MARGINS_FILE`` set, each call appends a JSON line (test, name, seed, value, bound) there.
    """
    path = os.environ.get("OMNISTREAM_MARGINS_FILE")

    def check(name: str, value: float, bound: float, higher_is_better: bool = True, baseline: float = 0.0) -> None:
        value = float(value)
        if path:
            row = {"test": request.node.nodeid, "name": name, "seed": int(os.environ.get("OMNISTREAM_TEST_SEED", "0")),
                   "value": value, "bound": bound, "higher_is_better": higher_is_better, "baseline": baseline}  # fmt: skip
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if higher_is_better:
            assert value >= bound, f"{name}: {value:.4g} < bound {bound:.4g}"
        else:
            assert value <= bound, f"{name}: {value:.4g} > bound {bound:.4g}"

    return check
