"""perception_node as a managed node, driven through its real lifecycle services (``~/change_state``,
``~/get_state``) with real rclpy topics: configure loads the model, activate subscribes and features flow,
deactivate ends output, cleanup frees the model, a second configure/activate works; ``autostart`` (default)
reaches active by itself; a failed configure leaves the node unconfigured and serving its services."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy is not installed (make setup)")

from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from ros_helpers import wait_for  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from test_perception_node import Harness, image  # noqa: E402

from omnistream_msgs.msg import StreamFeatures  # noqa: E402
from omnistream_perception.ros.diagnostics import status_values  # noqa: E402
from omnistream_perception.ros.perception_node import PerceptionNode  # noqa: E402

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def ros_context():
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


@pytest.fixture
def harness(ros_context):
    made = []

    def make(checkpoint, **params):
        made.append(Harness(ros_context, checkpoint, **params))
        return made[-1]

    yield make
    for h in made:
        h.close()


def _call(h: Harness, srv_type, name: str, request):
    client = h.tester.create_client(srv_type, h.topic(name))
    try:
        assert client.wait_for_service(timeout_sec=10.0), f"{name} not offered"
        future = client.call_async(request)
        wait_for(future.done, 60.0, what=f"{name} to answer")
        return future.result()
    finally:
        h.tester.destroy_client(client)


def _state(h: Harness) -> str:
    return _call(h, GetState, "get_state", GetState.Request()).current_state.label


def _transition(h: Harness, transition_id: int) -> bool:
    return _call(h, ChangeState, "change_state", ChangeState.Request(transition=Transition(id=transition_id))).success


def _reported_state(h: Harness) -> str:
    return status_values(h.node.diagnostics.stats("camera").to_status(h.name))["lifecycle_state"]


def test_lifecycle_transitions_through_the_services(harness, fixture_a):
    h = harness(fixture_a, autostart=False)
    features = h.subscribe("features", StreamFeatures)
    camera = h.tester.create_publisher(Image, "image", 10)

    def send(first: int, n: int = 3) -> None:
        for i in range(first, first + n):
            camera.publish(image(i, sec=1 + i))
            time.sleep(0.05)

    assert _state(h) == "unconfigured" and h.node.cameras == {} and _reported_state(h) == "unconfigured"
    assert h.tester.count_publishers(h.topic("features")) == 0, "unconfigured: no outputs"
    assert _call(h, Trigger, "reset", Trigger.Request()).success, "~/reset answers in every state"

    assert _transition(h, Transition.TRANSITION_CONFIGURE) and _state(h) == "inactive"
    loaded = weakref.ref(h.node.cameras["camera"].session.model)
    assert loaded() is not None and _reported_state(h) == "inactive"
    h.wait_matched()
    assert camera.get_subscription_count() == 0, "inactive: no image subscription"
    send(0)
    time.sleep(0.5)
    assert features == [] and h.node.cameras["camera"].session.frames_seen == 0

    assert _transition(h, Transition.TRANSITION_ACTIVATE) and _state(h) == "active"
    wait_for(lambda: camera.get_subscription_count() > 0, what="the image subscription")
    for i in range(2):
        camera.publish(image(10 + i, sec=20 + i))
        wait_for(lambda i=i: len(features) == i + 1, what=f"features of frame {i}")
    assert [f.frame_index for f in features] == [0, 1] and _reported_state(h) == "active"

    assert _transition(h, Transition.TRANSITION_DEACTIVATE) and _state(h) == "inactive"
    wait_for(lambda: camera.get_subscription_count() == 0, what="the image subscription to go")
    send(30)
    time.sleep(1.0)
    assert len(features) == 2, "deactivated: no output for published images"
    assert h.node.cameras["camera"].session.frames_seen == 2, "deactivated: the model does not run"

    assert _transition(h, Transition.TRANSITION_CLEANUP) and _state(h) == "unconfigured"
    gc.collect()
    assert h.node.cameras == {} and loaded() is None, "cleanup frees the model"
    wait_for(lambda: h.tester.count_publishers(h.topic("features")) == 0, what="the outputs to go")

    assert _transition(h, Transition.TRANSITION_CONFIGURE) and _transition(h, Transition.TRANSITION_ACTIVATE)
    wait_for(lambda: camera.get_subscription_count() > 0, what="the image subscription of the second life")
    camera.publish(image(40, sec=50))
    wait_for(lambda: len(features) == 3, what="features of the second life")
    assert features[-1].frame_index == 0, "a fresh stream on a freshly loaded model"


def test_autostart_is_active_at_once(harness, fixture_a):
    h = harness(fixture_a)
    assert h.node.lifecycle_state == "active" and _state(h) == "active"
    features = h.subscribe("features", StreamFeatures)
    h.wait_matched()
    h.publish(image(0, sec=1))
    wait_for(lambda: len(features) == 1, what="features from an autostarted node")


def test_a_failed_configure_stays_unconfigured_and_autostart_raises(harness, ros_context, tmp_path):
    missing = tmp_path / "no_checkpoint"
    missing.mkdir()
    h = harness(missing, autostart=False)
    assert not _transition(h, Transition.TRANSITION_CONFIGURE)
    assert _state(h) == "unconfigured" and h.node.cameras == {}
    assert _call(h, Trigger, "reset", Trigger.Request()).success, "the node keeps serving"
    with pytest.raises(OSError, match="missing config.json"):  # run_node: one FATAL line, exit 2
        PerceptionNode(
            node_name="perception_autostart_fails",
            context=ros_context,
            parameter_overrides=[rclpy.parameter.Parameter("checkpoint", value=str(missing))],
        )
