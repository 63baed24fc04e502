"""vla_node as a managed node and its execution features, with real rclpy topics and services: lifecycle
transitions through ``~/change_state`` / ``~/get_state``, the latched emergency stop services, ``dry_run``,
ensemble execution, clipped actions on /diagnostics and several cameras matched by stamp."""

from __future__ import annotations

import gc
import time
import weakref

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
torch = pytest.importorskip("torch")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rclpy.duration import Duration  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from test_vla_node import Harness  # noqa: E402

from omnistream_msgs.msg import EndEffectorAction, StreamFeatures  # noqa: E402
from omnistream_perception.features_codec import encode_patch_tokens  # noqa: E402
from omnistream_vla.policy import OmniStreamVLAConfig, OmniStreamVLAPolicy  # noqa: E402
from omnistream_vla.ros.vla_node import VLANode  # noqa: E402

pytestmark = pytest.mark.ros


def _policy(**overrides):
    torch.manual_seed(0)
    p = OmniStreamVLAPolicy(OmniStreamVLAConfig.preset("debug", backbone=None, **overrides)).eval()
    p.action_query.data.normal_()  # a non-zero query: actions depend on the inputs
    return p


@pytest.fixture(scope="module")
def policy():
    return _policy()


@pytest.fixture(scope="module", autouse=True)
def ros():
    rclpy.init()
    yield
    rclpy.try_shutdown()


def _call(h: Harness, srv_type, name: str, request):
    client = h.helper.create_client(srv_type, name)
    try:
        assert client.wait_for_service(timeout_sec=5.0), f"{name} not offered"
        future = client.call_async(request)
        assert h.wait_for(future.done, 30.0), f"{name} did not answer"
        return future.result()
    finally:
        h.helper.destroy_client(client)


def _state(h: Harness) -> str:
    return _call(h, GetState, "/vla_node/get_state", GetState.Request()).current_state.label


def _transition(h: Harness, transition_id: int) -> bool:
    return _call(
        h, ChangeState, "/vla_node/change_state", ChangeState.Request(transition=Transition(id=transition_id))
    ).success


def _publishers(h: Harness) -> set[str]:
    """The node's output topics that have a publisher now (by topic: earlier nodes of the same name may linger in
    the graph by name)."""
    topics = ("/vla_node/action", "/vla_node/twist", "/vla_node/gripper", "/vla_node/proposed_action")
    return {topic for topic in topics if h.helper.count_publishers(topic) > 0}


def test_lifecycle_transitions_through_the_services(tmp_path, monkeypatch):
    import test_vla_node

    directory = tmp_path / "policy"
    _policy().save_pretrained(directory)

    def from_directory(policy=None, parameter_overrides=()):  # the node loads its own policy at configure
        return VLANode(parameter_overrides=[*parameter_overrides, Parameter("policy", value=str(directory))])

    monkeypatch.setattr(test_vla_node, "VLANode", from_directory)
    h = Harness(_policy(), autostart=False)
    try:
        assert _state(h) == "unconfigured" and h.node.controller is None and h.node.policy is None
        assert "/vla_node/action" not in _publishers(h)
        assert _transition(h, Transition.TRANSITION_CONFIGURE) and _state(h) == "inactive"
        assert h.node.policy is not None and h.wait_for(lambda: "/vla_node/action" in _publishers(h), 5.0)
        h.start_features()
        h.instruct("open the drawer")
        time.sleep(0.5)
        assert h.actions == [], "inactive: no subscriptions, no output"
        assert _transition(h, Transition.TRANSITION_ACTIVATE) and _state(h) == "active"
        assert h.wait_for(lambda: any(not m.stop for _, m in h.actions), 10.0), "active: actions flow"
        assert h.node.controller.instruction == "open the drawer", "the latched instruction reaches the activated node"
        assert _transition(h, Transition.TRANSITION_DEACTIVATE) and _state(h) == "inactive"
        time.sleep(0.5)
        n = len(h.actions)
        assert n and h.actions[-1][1].stop, "deactivate sends a stop as its last command"
        assert h.node.controller.last_reason == "deactivated"
        time.sleep(0.5)
        assert len(h.actions) == n, "nothing after deactivation"
        loaded = weakref.ref(h.node.policy)
        assert _transition(h, Transition.TRANSITION_CLEANUP) and _state(h) == "unconfigured"
        gc.collect()
        assert h.node.policy is None and loaded() is None, "cleanup frees the policy"
        assert h.wait_for(lambda: "/vla_node/action" not in _publishers(h), 5.0)
        assert _transition(h, Transition.TRANSITION_CONFIGURE) and _transition(h, Transition.TRANSITION_ACTIVATE)
        assert h.wait_for(lambda: len(h.actions) > n and not h.actions[-1][1].stop, 10.0), "a second life works"
    finally:
        h.close()


def test_a_failed_configure_stays_unconfigured_and_autostart_raises(policy, tmp_path):
    h = Harness(policy, autostart=False, action_execution="ensemble", query_period=9)  # chunk_size is 4
    try:
        assert not _transition(h, Transition.TRANSITION_CONFIGURE)
        assert _state(h) == "unconfigured" and h.node.controller is None
    finally:
        h.close()
    with pytest.raises(ValueError, match="query_period"):
        VLANode(policy=policy, parameter_overrides=[Parameter("query_period", value=9),
                                                    Parameter("action_execution", value="ensemble")])  # fmt: skip


def test_autostart_is_active_at_once(harness_default):
    assert _state(harness_default) == "active"
    assert harness_default.node.lifecycle_state == "active"


@pytest.fixture
def harness_default(policy):
    h = Harness(policy)
    yield h
    h.close()


def test_the_emergency_stop_service_latches_until_cleared(harness_default):
    h = harness_default
    h.start_features()
    h.instruct("open the drawer")
    assert h.wait_for(lambda: any(not m.stop for _, m in h.actions), 5.0)
    assert _call(h, Trigger, "/vla_node/emergency_stop", Trigger.Request()).success
    latched_at = len(h.actions)
    assert h.wait_for(lambda: len(h.actions) > latched_at, 2.0)
    h.instruct("lift the red block")
    assert h.reset().success
    time.sleep(0.6)
    after = [m for _, m in h.actions[latched_at:]]
    assert len(after) >= 3 and all(m.stop for m in after), "stops only: instructions and resets keep the latch"
    status = h.node.control_stats.to_status("vla_node")
    assert status.level == bytes([2]) and "emergency" in status.message
    assert _call(h, Trigger, "/vla_node/clear_emergency_stop", Trigger.Request()).success
    assert h.wait_for(lambda: not h.actions[-1][1].stop, 5.0), "motion resumes once cleared"
    assert not _call(h, Trigger, "/vla_node/clear_emergency_stop", Trigger.Request()).success, "nothing latched"


def test_dry_run_publishes_proposed_actions_and_nothing_on_the_command_topics(policy):
    h = Harness(policy, dry_run=True)
    proposed: list[EndEffectorAction] = []
    h.helper.create_subscription(EndEffectorAction, "/vla_node/proposed_action", proposed.append, 50)
    try:
        h.start_features()
        h.instruct("open the drawer")
        assert h.wait_for(lambda: sum(not m.stop for m in proposed) >= 5, 10.0)
        assert h.actions == [] and h.twists == [] and h.grippers == []
        published = _publishers(h)
        assert "/vla_node/proposed_action" in published
        assert not {"/vla_node/action", "/vla_node/twist", "/vla_node/gripper"} & published
    finally:
        h.close()


def test_ensemble_execution_queries_the_policy_every_step(policy):
    h = Harness(policy, action_execution="ensemble", ensemble_m=0.01)
    try:
        h.start_features()
        h.instruct("open the drawer")
        assert h.wait_for(lambda: sum(not m.stop for _, m in h.actions) >= 8, 10.0)
        moving = sum(not m.stop for _, m in h.actions)
        assert h.calls >= moving - 1, "one chunk per step (the queue would need one per 4 steps)"
        assert h.node.control_stats.to_status("vla_node").values  # reported
        values = {kv.key: kv.value for kv in h.node.control_stats.to_status("vla_node").values}
        assert values["execution"] == "ensemble"
    finally:
        h.close()


def test_clipped_actions_are_counted_on_diagnostics(policy):
    h = Harness(policy, max_translation_step=1e-6, diagnostics_period=0.2)
    reports: list[DiagnosticArray] = []
    h.helper.create_subscription(DiagnosticArray, "/diagnostics", reports.append, 20)
    try:
        h.start_features()
        h.instruct("open the drawer")
        assert h.wait_for(lambda: sum(not m.stop for _, m in h.actions) >= 3, 10.0)
        moving = [m for _, m in h.actions if not m.stop]
        assert all(np.linalg.norm([m.translation.x, m.translation.y, m.translation.z]) <= 1e-6 + 1e-12 for m in moving)

        def clipped() -> int:
            for report in reversed(reports):
                for status in report.status:
                    values = {kv.key: kv.value for kv in status.values}
                    if "clipped_translation" in values:
                        return int(values["clipped_translation"])
            return 0

        assert h.wait_for(lambda: clipped() >= 2, 5.0)
        # a workspace box with min > max is refused at runtime; a valid one is applied
        result = h.node.set_parameters([Parameter("workspace_min", value=[2.0, 2.0, 2.0])])[0]
        assert not result.successful and "workspace" in result.reason
    finally:
        h.close()


def test_two_cameras_desynchronised_or_missing_give_stops_and_counts():
    policy = _policy(cameras=("static", "wrist"))
    h = Harness(policy, camera_sync_tolerance=0.02, max_feature_age=2.0)
    static = h.helper.create_publisher(StreamFeatures, "static/features", 10)
    wrist = h.helper.create_publisher(StreamFeatures, "wrist/features", 10)

    def send(pub, stamp):
        msg = encode_patch_tokens(np.ones((2, 2, 64), np.float32), StreamFeatures(), "float32")
        msg.header.stamp = stamp.to_msg()
        pub.publish(msg)

    try:
        h.instruct("open the drawer")
        for _ in range(10):  # only one camera: missing
            send(static, h.node.get_clock().now())
            time.sleep(0.05)
        assert h.wait_for(lambda: h.node.controller.missing_stops >= 2, 5.0)
        assert all(m.stop for _, m in h.actions)
        for _ in range(10):  # wrist 0.8 s behind, beyond the static frames kept for matching: out of sync
            now = h.node.get_clock().now()
            send(static, now)
            send(wrist, now - Duration(seconds=0.8))
            time.sleep(0.05)
        assert h.wait_for(lambda: h.node.controller.desync_stops >= 2, 5.0)
        assert all(m.stop for _, m in h.actions)
        n = len(h.actions)
        for _ in range(20):  # the same stamp on both: motion
            now = h.node.get_clock().now()
            send(static, now)
            send(wrist, now)
            time.sleep(0.05)
        assert any(not m.stop for _, m in h.actions[n:])
        values = {kv.key: kv.value for kv in h.node.control_stats.to_status("vla_node").values}
        assert int(values["desync_camera_stops"]) >= 2 and int(values["missing_camera_stops"]) >= 2
    finally:
        h.close()


def test_the_workspace_box_reads_the_end_effector_from_ee_pose(policy):
    from geometry_msgs.msg import PoseStamped

    box = {"workspace_enabled": True, "workspace_min": [-0.5, -0.5, -0.5], "workspace_max": [0.3, 0.3, 0.3]}
    h = Harness(policy, ee_pose_topic="ee_pose", max_feature_age=1.0, **box)
    pose_pub = h.helper.create_publisher(PoseStamped, "ee_pose", 10)
    try:
        h.start_features()
        h.instruct("open the drawer")
        assert h.wait_for(lambda: len(h.actions) >= 3, 5.0)
        assert all(m.stop for _, m in h.actions) and "end effector" in h.node.controller.last_reason
        wrong = PoseStamped()
        wrong.header.frame_id = "camera"  # not the actions' frame: dropped with an error
        pose_pub.publish(wrong)
        assert h.wait_for(lambda: h.node.control_stats.counts["errors"] >= 1, 5.0)
        n = len(h.actions)
        for _ in range(40):  # at the box's corner: every step leads outside, clipped to stay in
            pose = PoseStamped()
            pose.header.frame_id = "base_link"
            pose.pose.position.x = pose.pose.position.y = pose.pose.position.z = 0.3
            pose.pose.orientation.w = 1.0
            pose_pub.publish(pose)
            time.sleep(0.05)
            if sum(not m.stop for _, m in h.actions[n:]) >= 3:
                break
        moving = [m for _, m in h.actions[n:] if not m.stop]
        assert moving and all(max(m.translation.x, m.translation.y, m.translation.z) <= 1e-12 for m in moving)
        assert h.node.controller.clipped["workspace"] >= 1
    finally:
        h.close()


def test_an_emergency_stop_before_configure_holds_after_activation(policy):
    h = Harness(policy, autostart=False)
    try:
        assert _call(h, Trigger, "/vla_node/emergency_stop", Trigger.Request()).success
        assert _transition(h, Transition.TRANSITION_CONFIGURE) and _transition(h, Transition.TRANSITION_ACTIVATE)
        h.start_features()
        h.instruct("open the drawer")
        assert h.wait_for(lambda: len(h.actions) >= 4, 5.0)
        assert all(m.stop for _, m in h.actions) and h.node.controller.emergency_stopped
        assert _call(h, Trigger, "/vla_node/clear_emergency_stop", Trigger.Request()).success
        assert h.wait_for(lambda: not h.actions[-1][1].stop, 5.0)
    finally:
        h.close()
