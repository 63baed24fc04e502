"""vla_node with real rclpy pub/sub in one process: rate, idle, stale features, NaN, reset, instructions, bad input.

The node runs on a SingleThreadedExecutor in a background thread; a second node plays perception (publishing
StreamFeatures) and the user (instruction, reset). The policy is the tiny debug policy (features only).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
torch = pytest.importorskip("torch")

from geometry_msgs.msg import TwistStamped  # noqa: E402
from rclpy.duration import Duration  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from std_msgs.msg import Float32, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from omnistream_msgs.msg import EndEffectorAction, StreamFeatures  # noqa: E402
from omnistream_perception.features_codec import encode_patch_tokens  # noqa: E402
from omnistream_vla.policy import OmniStreamVLAConfig, OmniStreamVLAPolicy  # noqa: E402
from omnistream_vla.ros.vla_node import VLANode  # noqa: E402

pytestmark = pytest.mark.ros
INSTRUCTION_QOS = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    p = OmniStreamVLAPolicy(OmniStreamVLAConfig.preset("debug", backbone=None)).eval()
    p.action_query.data.normal_()  # a non-zero query: actions depend on the inputs
    return p


@pytest.fixture(scope="module", autouse=True)
def ros():
    rclpy.init()
    yield
    rclpy.try_shutdown()


class Harness:
    """vla_node + a helper node, both spinning in the background; records everything the node publishes."""

    def __init__(self, policy, **params):
        self.calls = 0
        original = policy.predict_action_chunk

        def counting(observation, normalized=False):
            self.calls += 1
            return original(observation, normalized=normalized)

        policy.predict_action_chunk = counting
        self.policy, self._original = policy, original
        overrides = [Parameter(k, value=v) for k, v in {"control_rate": 20.0, "max_feature_age": 0.3, **params}.items()]
        self.node = VLANode(policy=policy, parameter_overrides=overrides)
        self.helper = rclpy.create_node("vla_test_helper")
        self.actions: list[tuple[float, EndEffectorAction]] = []
        self.grippers: list[float] = []
        self.twists: list[TwistStamped] = []
        self.features_pub = self.helper.create_publisher(StreamFeatures, "features", 10)
        self.instruction_pub = self.helper.create_publisher(String, "instruction", INSTRUCTION_QOS)
        self.helper.create_subscription(
            EndEffectorAction, "/vla_node/action", lambda m: self.actions.append((time.monotonic(), m)), 50
        )
        self.helper.create_subscription(Float32, "/vla_node/gripper", lambda m: self.grippers.append(m.data), 50)
        self.helper.create_subscription(TwistStamped, "/vla_node/twist", self.twists.append, 50)
        self.reset_client = self.helper.create_client(Trigger, "/vla_node/reset")
        self.executor = SingleThreadedExecutor()  # a 4-thread executor on 2 cores ran the 20 Hz timer at 2-3 Hz
        self.executor.add_node(self.node)
        self.executor.add_node(self.helper)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()
        self._feeding = threading.Event()
        self._feeder: threading.Thread | None = None
        self.feature_dtype = "float16"

    def features(self, tokens=None, age: float = 0.0) -> StreamFeatures:
        """Features stamped ``age`` seconds before now (a camera image's stamp)."""
        rng = np.random.default_rng(len(self.actions))
        grid = tokens if tokens is not None else rng.standard_normal((2, 2, 64)).astype(np.float32)
        msg = encode_patch_tokens(grid, StreamFeatures(), self.feature_dtype)
        msg.header.stamp = (self.node.get_clock().now() - Duration(seconds=age)).to_msg()
        return msg

    def start_features(self, hz: float = 30.0, age: float = 0.0) -> None:
        self._feeding.set()

        def feed():
            while self._feeding.is_set():
                self.features_pub.publish(self.features(age=age))
                time.sleep(1.0 / hz)

        self._feeder = threading.Thread(target=feed, daemon=True)
        self._feeder.start()

    def stop_features(self) -> float:
        self._feeding.clear()
        if self._feeder is not None:
            self._feeder.join()
        return time.monotonic()

    def instruct(self, text: str) -> None:
        self.instruction_pub.publish(String(data=text))

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.02)
        return False

    def reset(self) -> Trigger.Response:
        assert self.reset_client.wait_for_service(timeout_sec=5.0)
        future = self.reset_client.call_async(Trigger.Request())
        assert self.wait_for(future.done, 5.0)
        return future.result()

    def close(self) -> None:
        self.stop_features()
        self.executor.shutdown()
        self._thread.join(timeout=5)
        self.node.destroy_node()
        self.helper.destroy_node()
        self.policy.predict_action_chunk = self._original
        self.policy.reset()


@pytest.fixture
def harness(policy, request):
    params = getattr(request, "param", {})
    h = Harness(policy, **params)
    yield h
    h.close()


# Flaky on the 2-core CI machine (the node's 20 Hz timer has been measured at 2-3 Hz there while passing alone
# elsewhere): kept in `make test-all` until the cause is found; the safety rules are covered by the tests below.
@pytest.mark.slow
@pytest.mark.realtime
def test_actions_at_the_control_rate_then_stop_when_features_go_stale(harness):
    harness.start_features()
    time.sleep(0.5)
    assert harness.actions == [], "no instruction yet: the node must stay idle"
    harness.instruct("open the drawer")
    assert harness.wait_for(lambda: len(harness.actions) >= 3)
    start, n0 = time.monotonic(), len(harness.actions)
    time.sleep(2.0)
    rate = (len(harness.actions) - n0) / (time.monotonic() - start)
    assert 12.0 <= rate <= 24.0, f"expected about 20 Hz, measured {rate:.1f} Hz"
    moving = [m for _, m in harness.actions if not m.stop]
    assert moving and all(m.mode == "relative" and m.gripper in (1.0, -1.0) for m in moving)
    assert any(abs(m.translation.x) > 0 for m in moving)
    # ~/twist carries the same motion as a velocity (delta x control rate), ~/gripper the gripper command.
    assert harness.wait_for(lambda: len(harness.twists) >= len(harness.actions) - 2)
    velocities = {round(t.twist.linear.x / 20.0, 4) for t in harness.twists}
    assert {round(m.translation.x, 4) for m in moving[-5:]} <= velocities
    assert set(harness.grippers) <= {1.0, -1.0}
    # The chunk queue: one LLM forward per chunk_size (4) actions.
    assert harness.calls <= len(moving) // 4 + 2
    stopped_at = harness.stop_features()
    assert harness.wait_for(lambda: harness.actions[-1][1].stop, 2.0)
    first_stop = next(t for t, m in harness.actions if m.stop and t > stopped_at)
    assert first_stop - stopped_at <= 0.3 + 0.05 + 0.25, "stop later than max_feature_age + one period (+ slack)"
    sequence = [m for _, m in harness.actions]
    first = next(i for i, (t, m) in enumerate(harness.actions) if m.stop and t > stopped_at)
    stop, last_moving = sequence[first], next(m for m in reversed(sequence[:first]) if not m.stop)
    assert (stop.translation.x, stop.translation.y, stop.translation.z) == (0.0, 0.0, 0.0)
    assert stop.gripper == last_moving.gripper, "a stop action holds the gripper"
    # WARN while features are stale (a message still in flight when publishing stopped may briefly refresh them)
    assert harness.wait_for(lambda: harness.node.control_stats.to_status("vla_node").level == bytes([1]), 2.0)
    # Fresh features again: motion resumes with a NEW chunk (nothing planned on old features).
    calls = harness.calls
    harness.start_features()
    assert harness.wait_for(lambda: not harness.actions[-1][1].stop, 3.0)
    assert harness.calls > calls


def test_no_features_yet_gives_stop_actions(harness):
    harness.instruct("push the block left")
    assert harness.wait_for(lambda: len(harness.actions) >= 2)
    assert all(m.stop for _, m in harness.actions)
    assert harness.grippers and harness.grippers[-1] == 1.0  # initial_gripper, held


def test_new_instruction_and_reset_clear_the_chunk_queue(harness):
    harness.node.set_parameters([Parameter("control_rate", value=4.0)])
    harness.start_features()
    harness.instruct("open the drawer")
    assert harness.wait_for(lambda: harness.calls >= 1 and len(harness.actions) >= 1)
    calls = harness.calls
    assert harness.reset().success
    assert harness.policy.queued_actions == 0
    assert harness.wait_for(lambda: harness.calls > calls, 3.0), "after ~/reset the next action needs a new chunk"
    calls = harness.calls
    harness.instruct("lift the pink block")
    assert harness.wait_for(lambda: harness.node.controller.instruction == "lift the pink block", 3.0)
    assert harness.wait_for(lambda: harness.calls > calls, 3.0), "a new instruction needs a new chunk"
    calls, n = harness.calls, len(harness.actions)
    harness.instruct("lift the pink block")  # the same text again: the queue stays
    assert harness.wait_for(lambda: len(harness.actions) >= n + 2, 3.0)
    assert harness.calls <= calls + 1


def test_empty_instruction_rejected_and_long_one_truncated(harness):
    harness.node.set_parameters([Parameter("max_instruction_chars", value=20)])
    harness.instruct("open the drawer")
    assert harness.wait_for(lambda: harness.node.controller.instruction == "open the drawer", 3.0)
    harness.instruct("   \n ")
    time.sleep(0.3)
    assert harness.node.controller.instruction == "open the drawer"
    assert harness.node.control_stats.counts["errors"] >= 1
    harness.instruct("pick up the red block and place it in the drawer")
    assert harness.wait_for(lambda: harness.node.controller.instruction != "open the drawer", 3.0)
    assert len(harness.node.controller.instruction) <= 20
    assert "pick up the red".startswith(harness.node.controller.instruction[:15])


def test_nan_from_the_policy_gives_a_stop_and_an_error(harness):
    harness.start_features()
    harness.instruct("open the drawer")
    assert harness.wait_for(lambda: any(not m.stop for _, m in harness.actions), 5.0)
    bias = harness.policy.action_head.arm[-1].bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.fill_(float("nan"))
        harness.reset()
        n = len(harness.actions)
        assert harness.wait_for(lambda: len(harness.actions) >= n + 3, 3.0)
        assert all(m.stop for _, m in harness.actions[n + 1 :])
        status = harness.node.control_stats.to_status("vla_node")
        assert status.level == bytes([2]) and "NaN" in status.message
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert harness.wait_for(lambda: not harness.actions[-1][1].stop, 3.0), "recovers once the policy is finite"


def test_malformed_features_are_dropped_and_the_node_keeps_running(harness):
    harness.instruct("open the drawer")
    bad = [
        encode_patch_tokens(np.zeros((2, 2, 64), np.float32), StreamFeatures(), "float32"),
        encode_patch_tokens(np.zeros((2, 2, 32), np.float32), StreamFeatures(), "float32"),  # wrong width
        encode_patch_tokens(np.full((2, 2, 64), np.nan, np.float32), StreamFeatures(), "float32"),  # NaN
    ]
    bad[0].grid_height = 3  # byte count no longer matches the grid
    unknown = encode_patch_tokens(np.zeros((2, 2, 64), np.float32), StreamFeatures(), "float32")
    unknown.dtype = "bfloat17"
    bad.append(unknown)
    for i, msg in enumerate(bad, start=1):  # one at a time: the features subscription keeps only the newest
        harness.features_pub.publish(msg)
        assert harness.wait_for(lambda i=i: harness.node.feature_stats.counts["dropped"] >= i, 5.0)
    assert harness.node.feature_stats.counts["processed"] == 0
    time.sleep(0.2)
    assert all(m.stop for _, m in harness.actions), "no valid features yet: only stop actions"
    harness.start_features()
    assert harness.wait_for(lambda: any(not m.stop for _, m in harness.actions), 5.0)


def test_a_late_node_still_gets_the_instruction(policy):
    rclpy_node = rclpy.create_node("early_publisher")
    pub = rclpy_node.create_publisher(String, "instruction", INSTRUCTION_QOS)
    pub.publish(String(data="turn on the light"))
    try:
        h = Harness(policy)
        try:
            assert h.wait_for(lambda: h.node.controller.instruction == "turn on the light", 5.0)
        finally:
            h.close()
    finally:
        rclpy_node.destroy_node()


def test_bad_parameters_are_refused(policy):
    with pytest.raises(ValueError, match="control_rate"):
        VLANode(policy=policy, parameter_overrides=[Parameter("control_rate", value=0.0)])
    node = VLANode(policy=policy)
    try:
        result = node.set_parameters([Parameter("max_feature_age", value=-1.0)])[0]
        assert not result.successful and "max_feature_age" in result.reason
        assert node.get_parameter("max_feature_age").value == 0.5
    finally:
        node.destroy_node()


def test_safety_parameters_are_validated_at_start_and_on_change(policy):
    for name, value in (("max_feature_age", float("inf")), ("control_rate", 0.001), ("max_clock_skew", -1.0)):
        with pytest.raises(ValueError, match=name):
            VLANode(policy=policy, parameter_overrides=[Parameter(name, value=value)])
    node = VLANode(policy=policy, parameter_overrides=[Parameter("control_rate", value=10)])  # an integer
    try:
        assert node.get_parameter("control_rate").value == 10 and node.controller.settings.control_rate == 10.0
        for name, value in (("max_feature_age", float("inf")), ("control_rate", 0.001), ("control_rate", "fast")):
            result = node.set_parameters([Parameter(name, value=value)])[0]
            assert not result.successful and name in result.reason
        assert node.get_parameter("max_feature_age").value == 0.5
        assert node.set_parameters([Parameter("control_rate", value=25)])[0].successful
        assert node.controller.settings.control_rate == 25.0
        assert node.set_parameters([Parameter("max_feature_age", value=2)])[0].successful
        assert node.controller.settings.max_feature_age == 2.0
    finally:
        node.destroy_node()


def test_a_configuration_contradicting_the_policy_convention_is_refused(policy):
    with pytest.raises(ValueError, match="translation_scale 1 .*0.02"):
        VLANode(policy=policy, parameter_overrides=[Parameter("translation_scale", value=1.0)])
    with pytest.raises(ValueError, match="action_mode absolute"):
        VLANode(policy=policy, parameter_overrides=[Parameter("action_mode", value="absolute")])


def test_features_stamped_in_the_past_are_not_acted_on(harness):
    harness.node.set_parameters([Parameter("max_feature_age", value=0.5)])
    harness.start_features(age=2.0)
    harness.instruct("open the drawer")
    assert harness.wait_for(lambda: len(harness.actions) >= 4, 5.0)
    assert harness.node.feature_stats.counts["processed"] >= 1
    assert all(m.stop for _, m in harness.actions), "features stamped 2 s ago with max_feature_age 0.5"
    assert "old" in harness.node.controller.last_reason


def test_a_feature_grid_the_policy_was_not_trained_on_stops_with_an_error(harness):
    harness.start_features()
    harness.instruct("open the drawer")
    assert harness.wait_for(lambda: any(not m.stop for _, m in harness.actions), 5.0)
    harness.stop_features()
    harness.features_pub.publish(harness.features(np.zeros((3, 5, 64), np.float32)))
    assert harness.wait_for(lambda: harness.actions[-1][1].stop, 3.0)
    status = harness.node.control_stats.to_status("vla_node")
    assert status.level == bytes([2]) and "3x5" in status.message and "2x2" in status.message
    assert harness.node.feature_stats.counts["dropped"] >= 1


def test_control_status_counts_received_features_and_every_published_command(harness):
    harness.instruct("open the drawer")
    assert harness.wait_for(lambda: len(harness.actions) >= 2, 5.0)  # stops: no features yet
    harness.start_features()
    assert harness.wait_for(lambda: any(not m.stop for _, m in harness.actions), 5.0)
    harness.stop_features()
    values = {kv.key: kv.value for kv in harness.node.control_stats.to_status("vla_node").values}
    assert int(values["received"]) == harness.node.feature_stats.counts["received"] > 0
    assert int(values["stops"]) >= 2 and int(values["actions"]) >= 1
    assert int(values["processed"]) == int(values["stops"]) + int(values["actions"])


@pytest.mark.realtime
@pytest.mark.parametrize("harness", [{"control_rate": 0.5, "max_feature_age": 0.3}], indirect=True)
def test_the_watchdog_stops_within_max_feature_age_whatever_the_control_rate(harness):
    harness.start_features()
    harness.instruct("open the drawer")
    assert harness.wait_for(lambda: any(not m.stop for _, m in harness.actions), 5.0)
    stopped_at = harness.stop_features()
    assert harness.wait_for(lambda: harness.actions[-1][1].stop, 2.0), "a 0.5 Hz control timer must not delay it"
    first_stop = next(t for t, m in harness.actions if m.stop and t > stopped_at)
    assert first_stop - stopped_at < 1.9, "the stop came with the control timer (2 s), not the watchdog"


def test_the_shipped_vla_yaml_starts_with_a_calvin_units_policy(policy):
    import yaml

    from omnistream_vla.action_convention import policy_convention

    path = Path(__file__).resolve().parents[2] / "ros2_ws/src/omnistream_vla/config/vla.yaml"
    values = yaml.safe_load(path.read_text())["/**/vla_node"]["ros__parameters"]
    values.pop("policy")
    node = VLANode(policy=policy, parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
    try:
        settings, convention = node.controller.settings, policy_convention(policy)
        assert (settings.translation_scale, settings.rotation_scale) == (0.02, 0.05) == (
            convention.translation_scale, convention.rotation_scale)  # fmt: skip
        assert settings.mode == "relative"
    finally:
        node.destroy_node()


def test_absolute_mode_publishes_no_twist_and_a_stop_never_reads_as_the_origin(policy):
    absolute = {"translation_scale": 0.02, "rotation_scale": 0.05, "mode": "absolute", "source": "test"}
    policy.config.action_convention = absolute
    try:
        h = Harness(policy)
        try:
            h.start_features()
            h.instruct("open the drawer")
            assert h.wait_for(lambda: any(not m.stop for _, m in h.actions), 5.0)
            h.stop_features()
            assert h.wait_for(lambda: h.actions[-1][1].stop, 3.0)
            last_target = next(m for _, m in reversed(h.actions) if not m.stop)
            stops = [m for _, m in h.actions if m.stop]
            assert all(m.mode == "absolute" for _, m in h.actions) and not h.twists
            assert all(
                (m.translation.x, m.translation.y, m.translation.z)
                == (last_target.translation.x, last_target.translation.y, last_target.translation.z)
                for m in stops
            ), "a stop repeats the last commanded target"
            assert (last_target.translation.x, last_target.translation.y) != (0.0, 0.0)
        finally:
            h.close()
    finally:
        policy.config.action_convention = None
