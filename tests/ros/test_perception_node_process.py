"""perception_node across two processes, started exactly as a user would:

    perception_node --ros-args -p checkpoint:=<../shared/fixtures/upstream_tiny_a>

It must publish one StreamFeatures per good image with the image's stamp and a growing frame_index, survive a
burst of bad messages (reported on /diagnostics) and keep serving, and exit cleanly on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy is not installed (make setup)")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from test_perception_node import bad_messages, wait_for  # noqa: E402

from omnistream_msgs.msg import StreamFeatures  # noqa: E402
from omnistream_perception.ros.diagnostics import status_values  # noqa: E402
from omnistream_perception.ros.image import rgb_to_image  # noqa: E402

pytestmark = pytest.mark.ros


def _perception_node_command() -> str:
    script = Path(sys.executable).parent / "perception_node"
    found = str(script) if script.exists() else shutil.which("perception_node")
    if found is None:
        pytest.fail("the perception_node console script is not installed (pip install -e ros2_ws/src/...)")
    return found


def _image(seed: int, sec: int) -> Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    msg = rgb_to_image(rgb)
    msg.header.stamp.sec, msg.header.frame_id = sec, "camera"
    return msg


def test_node_process_serves_features_survives_bad_burst_and_exits_cleanly(fixture_a, tmp_path):
    log = open(tmp_path / "perception_node.log", "w+")  # noqa: SIM115 - read back on failure
    command = [_perception_node_command(), "--ros-args", "-p", f"checkpoint:={fixture_a}"]
    command += ["-p", "diagnostics_period:=0.25"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    context = rclpy.Context()
    rclpy.init(context=context)
    tester = rclpy.create_node("process_tester", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(tester)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        features: list = []
        diagnostics: list = []
        tester.create_subscription(StreamFeatures, "/perception_node/features", features.append, 10)
        tester.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
        image_pub = tester.create_publisher(Image, "/image", 10)
        publishers = {"image": image_pub}

        def started() -> bool:
            if process.poll() is not None:
                log.seek(0)
                raise AssertionError(f"perception_node exited with {process.returncode}:\n{log.read()}")
            return image_pub.get_subscription_count() > 0 and tester.count_publishers("/perception_node/features") > 0

        wait_for(started, timeout=90, what="perception_node to start (imports torch, loads the checkpoint)")
        time.sleep(0.5)  # let the node's publisher see our subscription too

        stamps = []
        for i in range(5):
            image_pub.publish(_image(i, sec=1000 + i))
            stamps.append(1000 + i)
            wait_for(lambda i=i: len(features) == i + 1, what=f"features of good frame {i}")

        bad = bad_messages()
        for topic, msg in bad:  # a burst: as fast as we can publish
            if topic not in publishers:
                publishers[topic] = tester.create_publisher(type(msg), "/" + topic, 10)
                wait_for(lambda t=topic: publishers[t].get_subscription_count() > 0)
            publishers[topic].publish(msg)
        time.sleep(0.5)
        assert process.poll() is None, "perception_node died on bad input"

        for i in range(5, 8):
            image_pub.publish(_image(i, sec=1000 + i))
            stamps.append(1000 + i)
            wait_for(lambda i=i: len(features) == i + 1, what=f"features of good frame {i} after the bad burst")

        assert [f.header.stamp.sec for f in features] == stamps
        assert [f.frame_index for f in features] == list(range(8))
        assert all(f.header.frame_id == "camera" and f.dim == 64 for f in features)

        def last_report() -> dict | None:
            for array in reversed(diagnostics):
                for status in array.status:
                    if status.name.startswith("perception_node") and status_values(status)["processed"] == "8":
                        return status_values(status)
            return None

        wait_for(lambda: last_report() is not None, what="/diagnostics after the last frame")
        report = last_report()
        errors, dropped, received = int(report["errors"]), int(report["dropped"]), int(report["received"])
        assert errors >= 1 and "last_error" in report and report["last_error"]
        # every received message is accounted for: processed, superseded by a newer one, or rejected
        assert received == 8 + dropped + errors
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            returncode = process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = "killed after 15 s"
        executor.shutdown()
        tester.destroy_node()
        rclpy.try_shutdown(context=context)
        log.seek(0)
        output = log.read()
        log.close()
    assert returncode == 0, f"perception_node did not exit cleanly on SIGINT ({returncode}):\n{output}"


@pytest.mark.realtime
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_node_stops_cleanly_on_a_signal_while_a_slow_frame_is_processed(fixture_a, tmp_path, signum):
    """A large frame at full resolution (max_side 0) keeps the worker busy for a while; the signal comes in the
    middle of it. The node finishes that frame, then exits 0 within 2 s, without a traceback or an abort."""
    log = open(tmp_path / "perception_node.log", "w+")  # noqa: SIM115 - read back below
    command = [_perception_node_command(), "--ros-args", "-p", f"checkpoint:={fixture_a}", "-p", "max_side:=0"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    context = rclpy.Context()
    rclpy.init(context=context)
    tester = rclpy.create_node("stop_tester", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(tester)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        features: list = []
        tester.create_subscription(StreamFeatures, "/perception_node/features", features.append, 10)
        image_pub = tester.create_publisher(Image, "/image", 10)
        wait_for(
            lambda: (
                process.poll() is None
                and image_pub.get_subscription_count() > 0
                and tester.count_publishers("/perception_node/features") > 0
            ),
            timeout=90,
            what="perception_node to start",
        )
        time.sleep(0.5)
        big = rgb_to_image(np.random.default_rng(0).integers(0, 256, (960, 1280, 3), dtype=np.uint8))
        started = time.monotonic()
        big.header.stamp.sec = 1
        image_pub.publish(big)
        wait_for(lambda: len(features) == 1, timeout=60, what="the first large frame")
        first_frame_s = time.monotonic() - started
        big.header.stamp.sec = 2
        image_pub.publish(big)  # attends over two frames: longer than the first
        time.sleep(min(0.3, first_frame_s / 2))
        assert len(features) == 1, "the second frame was done before the signal: the test needs a slower frame"
        sent = time.monotonic()
        process.send_signal(signum)
        returncode = process.wait(timeout=60)
        stop_s = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
        executor.shutdown()
        tester.destroy_node()
        rclpy.try_shutdown(context=context)
        log.seek(0)
        output = log.read()
        log.close()
    assert returncode == 0, f"exit code {returncode} on {signum.name}:\n{output}"
    assert "Traceback" not in output and "terminate called" not in output and "ERROR" not in output, output
    # the frame in flight (at most ~3x the first one, it attends over two frames) plus 2 s
    assert stop_s < 2.0 + 3 * first_frame_s, f"stopped after {stop_s:.1f} s (first frame {first_frame_s:.1f} s)"
