"""perception_node and vla_node as SEPARATE processes (debug checkpoints): images + an instruction in,
EndEffectorAction out; when the images stop, stop actions follow within max_feature_age + one control period."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from omnistream_msgs.msg import EndEffectorAction, StreamFeatures  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.realtime]
MAX_FEATURE_AGE = 0.5
CONTROL_RATE = 10  # given as an integer on the command line, as users type it
# Scheduling slack on a loaded 2-core machine (two model processes plus the test).
SLACK = 0.25


def _perception_available() -> bool:
    try:
        import omnistream_perception.ros.perception_node  # noqa: F401
    except ImportError:
        return False
    return True


def _start(module: str, *ros_args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, "--ros-args", *ros_args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_perception_and_vla_processes_turn_images_into_actions_and_stop(tmp_path, fixture_a):
    if not _perception_available():
        pytest.skip("omnistream_perception.ros.perception_node is not in this checkout (perception issue)")
    from omnistream_perception.ros.image import rgb_to_image
    from omnistream_vla.policy.factory import init_policy

    policy_dir = tmp_path / "policy"
    init_policy(policy_dir, preset="debug", backbone=None, seed=0)  # features only: perception runs the backbone
    perception = _start(
        "omnistream_perception.ros.perception_node", "-p", f"checkpoint:={fixture_a}", log=tmp_path / "perception.log"
    )
    vla = _start(
        "omnistream_vla.ros.vla_node",
        "-p", f"policy:={policy_dir}",
        "-p", f"control_rate:={CONTROL_RATE}",
        "-p", f"max_feature_age:={MAX_FEATURE_AGE}",
        "-r", "features:=/perception_node/features",
        log=tmp_path / "vla.log",
    )  # fmt: skip
    rclpy.init()
    node = rclpy.create_node("vla_process_tester")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        actions: list[tuple[float, EndEffectorAction]] = []
        feature_times: list[float] = []
        node.create_subscription(
            EndEffectorAction, "/vla_node/action", lambda m: actions.append((time.monotonic(), m)), 50
        )
        node.create_subscription(
            StreamFeatures, "/perception_node/features", lambda m: feature_times.append(time.monotonic()), 10
        )
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        node.create_publisher(String, "/instruction", qos).publish(String(data="pick up the red block"))
        images = node.create_publisher(Image, "/image", 10)

        def logs() -> str:
            return "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.log"))

        deadline = time.monotonic() + 90  # two processes import torch/transformers and load models
        frame = 0
        while not any(not m.stop for _, m in actions):
            assert time.monotonic() < deadline, "no action computed from the perception features" + logs()
            assert perception.poll() is None and vla.poll() is None, "a node exited" + logs()
            frame += 1
            msg = rgb_to_image(np.random.default_rng(frame).integers(0, 256, (64, 64, 3), dtype=np.uint8))
            msg.header.stamp = node.get_clock().now().to_msg()  # the features' age is measured from this stamp
            images.publish(msg)
            time.sleep(0.1)
        moving = [m for _, m in actions if not m.stop]
        assert all(m.gripper in (1.0, -1.0) and m.mode == "relative" for m in moving)
        # The images stop: stop actions must follow within max_feature_age + one control period.
        time.sleep(0.3)  # let the last frames through
        last_features = feature_times[-1]
        deadline = time.monotonic() + 5
        while not any(m.stop and t > last_features for t, m in actions):
            assert time.monotonic() < deadline, "no stop action after the images stopped" + logs()
            time.sleep(0.02)
        first_stop = next(t for t, m in actions if m.stop and t > last_features)
        delay = first_stop - last_features
        print(f"first stop action {delay:.3f} s after the last features (limit {MAX_FEATURE_AGE + 1 / CONTROL_RATE} s)")
        assert delay <= MAX_FEATURE_AGE + 1.0 / CONTROL_RATE + SLACK, f"stop {delay:.3f} s after the last features"
        assert delay >= MAX_FEATURE_AGE - 0.1, f"stopped too early ({delay:.3f} s): features were still fresh"
        time.sleep(0.3)
        later = [m for t, m in actions if t > first_stop]
        assert later and all(m.stop for m in later)
        assert all(m.translation.x == m.translation.y == m.translation.z == 0.0 for m in later)
    finally:
        executor.shutdown()
        spinner.join(timeout=5)
        node.destroy_node()
        rclpy.try_shutdown()
        _stop(vla)
        _stop(perception)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (["max_feature_age:=.inf"], "max_feature_age must be a finite number"),
        (["control_rate:=0.001"], "control_rate must be in [0.5, 1000]"),
        (["translation_scale:=1.0"], "contradicts the policy"),
    ],
)
def test_bad_vla_configurations_end_with_one_fatal_line_and_exit_2(tmp_path, params, message):
    from omnistream_vla.policy.factory import init_policy

    init_policy(tmp_path / "policy", preset="debug", backbone=None, seed=0)
    args = [arg for p in [f"policy:={tmp_path / 'policy'}", *params] for arg in ("-p", p)]
    result = subprocess.run(
        [sys.executable, "-m", "omnistream_vla.ros.vla_node", "--ros-args", *args],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and message in output, output
    assert len([line for line in output.splitlines() if "FATAL" in line]) == 1, output
