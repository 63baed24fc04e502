"""The recorder's behaviour without ROS: QoS that hears every publisher, topic changes, instruction, episodes,
retries after a write error, status. ``Graph`` stands where recorder_node gives the controller the ROS graph."""

from __future__ import annotations

import json
import logging
import re

import pytest

from omnistream_vla.recorder_controller import ERROR, OK, RecorderController, hearing_qos, topic_names
from omnistream_vla.recording import qos_profile_dict, read_episode_events, string_cdr

STRING = "std_msgs/msg/String"
LATCHED = qos_profile_dict(history=1, depth=1, reliability=1, durability=1)  # reliable, transient local
BEST_EFFORT = qos_profile_dict(history=1, depth=10, reliability=2, durability=2)  # best effort, volatile
RELIABLE = qos_profile_dict(history=1, depth=10, reliability=1, durability=2)  # reliable, volatile


class Graph:
    """The ports of the controller: a graph of topics with their publishers' QoS, in the namespace /robot."""

    def __init__(self):
        self.publishers: dict[str, tuple[str, list[dict]]] = {}  # topic -> (type, offered QoS)
        self.subscriptions: dict[str, tuple[bool, bool]] = {}
        self.events: list[dict] = []
        self.diagnostics = 0
        self.clock_ns = 1_000

    def resolve_topic_name(self, name: str) -> str:
        if not re.fullmatch(r"[~/A-Za-z0-9_]+", name):
            raise RuntimeError(f"topic name is invalid, at {name}")
        return name if name.startswith("/") else f"/robot/{name}"

    def get_topic_names_and_types(self):
        return [(topic, [msgtype]) for topic, (msgtype, _) in self.publishers.items()]

    def offered_qos(self, topic):
        return list(self.publishers[topic][1])

    def subscribe(self, topic, msgtype, reliable, latched):
        if msgtype.startswith("nonexistent_pkg/"):
            raise ImportError(f"no module named {msgtype.split('/')[0]}")
        self.subscriptions[topic] = (reliable, latched)

    def unsubscribe(self, topic):
        del self.subscriptions[topic]

    def publish_event(self, text):
        self.events.append(json.loads(text))

    def publish_diagnostics(self):
        self.diagnostics += 1

    def now_ns(self):
        self.clock_ns += 1_000
        return self.clock_ns


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


SETTINGS = {"topics": ["/x"], "instruction_topic": "/instruction", "output_dir": "bags", "bag_name": "b",
            "record_always": False, "chunk_duration_s": 600.0, "chunk_max_mb": 256.0, "min_free_mb": 0.0,
            "queue_depth": 10, "retry_period_s": 2.0}  # fmt: skip


def _controller(tmp_path, graph=None, clock=None, **settings):
    values = {**SETTINGS, "output_dir": str(tmp_path / "bags"), **settings}
    args = {"clock": clock} if clock else {}
    return RecorderController(
        values, graph or Graph(), logging.getLogger("recorder"), "/recorder/episode_events", **args
    )


def test_topic_names_and_qos_rules():
    assert topic_names(" /a ") == ["/a"] and topic_names(["", "/a", " /b"]) == ["/a", "/b"]
    assert hearing_qos([LATCHED]) == (True, True)
    assert hearing_qos([LATCHED, RELIABLE]) == (True, False)
    assert hearing_qos([LATCHED, BEST_EFFORT]) == (False, False)


def test_relative_names_resolve_and_bad_names_are_refused(tmp_path):
    control = _controller(tmp_path, Graph(), topics=["joint_cmd", "/x", "joint_cmd"], instruction_topic="task")
    assert control.wanted == ["/robot/joint_cmd", "/x", "/robot/task"] and control.instruction_topic == "/robot/task"
    assert "invalid topic name 'bad name!'" in control.topics_problem({"topics": ["bad name!"]})
    assert control.topics_problem({"chunk_max_mb": 1.0}) is None
    with pytest.raises(ValueError, match="invalid topic name"):
        _controller(tmp_path, Graph(), topics=["bad name!"])


def test_subscribes_once_published_and_again_for_a_publisher_it_cannot_hear(tmp_path, caplog):
    graph = Graph()
    control = _controller(tmp_path, graph, instruction_topic="")
    control.discover()
    assert graph.subscriptions == {} and control.status()[2]["waiting_for_publishers"] == "/x"
    graph.publishers["/x"] = (STRING, [])  # on the graph, but only subscribers so far
    control.discover()
    assert graph.subscriptions == {}
    graph.publishers["/x"] = (STRING, [LATCHED])
    control.discover()
    assert graph.subscriptions == {"/x": (True, True)} and control.sub_qos == {"/x": (True, True)}
    graph.publishers["/x"] = (STRING, [LATCHED, RELIABLE])  # reliable volatile: not heard by transient local
    with caplog.at_level(logging.WARNING):
        control.discover()
    assert graph.subscriptions["/x"] == (True, False) and "subscribed again" in caplog.text
    graph.publishers["/x"] = (STRING, [RELIABLE, LATCHED])  # same publishers, listed in another order
    control.discover()
    assert graph.subscriptions["/x"] == (True, False)
    graph.publishers["/x"] = (STRING, [RELIABLE])  # one left: the subscription still hears it, QoS stored anew
    control.discover()
    assert graph.subscriptions["/x"] == (True, False) and control.recorder.topics["/x"].offered_qos == [RELIABLE]
    assert control.status()[2]["subscribed"] == "/x" and control.status()[2]["waiting_for_publishers"] == ""


def test_a_topic_that_cannot_be_recorded_is_logged_once(tmp_path, caplog):
    graph = Graph()
    graph.publishers["/x"] = ("nonexistent_pkg/msg/Thing", [RELIABLE])
    control = _controller(tmp_path, graph, instruction_topic="")
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            control.discover()
    assert caplog.text.count("cannot record /x") == 1 and graph.subscriptions == {}
    assert control.status()[2]["waiting_for_publishers"] == ""


def test_topic_change_unsubscribes_and_forgets_the_old_instruction(tmp_path):
    graph = Graph()
    graph.publishers = {"/x": (STRING, [RELIABLE]), "/instruction": (STRING, [LATCHED])}
    control = _controller(tmp_path, graph)
    control.discover()
    control.on_message("/instruction", string_cdr("wave"))
    assert control.instruction == "wave" and set(graph.subscriptions) == {"/x", "/instruction"}
    control.apply({"topics": ["/y"], "instruction_topic": "task", "chunk_max_mb": 1e-4, "record_always": True})
    assert control.wanted == ["/y", "/robot/task"] and graph.subscriptions == {} and control.instruction == ""
    assert control.recorder.chunk_max_bytes == 100 and control.record_always
    control.apply({"instruction_topic": ""})  # the topics stay as last given
    assert control.wanted == ["/y"] and control.instruction_topic == ""


def test_episode_carries_the_instruction_published_before_it(tmp_path):
    graph = Graph()
    graph.publishers = {"/x": (STRING, [RELIABLE]), "/instruction": (STRING, [LATCHED])}
    control = _controller(tmp_path, graph)
    control.discover()
    assert control.stop() == (False, "no episode is running; start one first")
    control.on_message("/instruction", string_cdr("stack the cups"))
    control.on_message("/x", string_cdr("before"))  # between episodes: not recorded
    ok, message = control.start()
    assert ok and "stack the cups" in message
    assert control.start()[0] is False
    control.on_message("/x", string_cdr("inside"))
    control.note("clean grasp")
    assert control.mark(True) == (True, "episode 0 marked success")
    ok, message = control.stop()
    assert ok and "written (b_0.mcap)" in message and control.recorder.buffered_messages == 0
    assert [e["event"] for e in graph.events] == ["start", "annotate", "stop"]
    (episode,) = read_episode_events(tmp_path / "bags" / "b")
    assert episode["instruction"] == "stack the cups" and episode["success"] and episode["notes"] == ["clean grasp"]
    assert control.recorder.bag.topic_counts == {"/instruction": 1, "/recorder/episode_events": 4, "/x": 1}


def test_write_error_is_reported_once_and_retried_after_the_period(tmp_path, caplog):
    graph, clock = Graph(), Clock()
    graph.publishers = {"/x": (STRING, [RELIABLE])}
    (tmp_path / "a_file").write_text("not a directory")
    control = _controller(tmp_path, graph, clock, output_dir=str(tmp_path / "a_file" / "bags"), instruction_topic="")
    control.discover()
    control.start()
    control.on_message("/x", string_cdr("kept"))
    with caplog.at_level(logging.ERROR):
        ok, message = control.stop()
        assert not ok and "is a file" in message and "kept for retry" in message
        level, reason, values = control.status()
        assert level == ERROR and "is a file" in reason and values["buffered_messages"] == "3"  # start, x, stop
        clock.t = 1.0
        control.flush_if_due()  # within retry_period_s (2 s) of the start: not yet
        assert graph.diagnostics == 1
        clock.t = 2.5
        control.flush_if_due()  # retried, fails again: reported, not logged again
        assert graph.diagnostics == 2
        control.apply({"output_dir": str(tmp_path / "elsewhere")})
        clock.t = 3.0
        control.flush_if_due()  # 0.5 s after the last attempt: not yet
        assert control.recorder.buffered_messages == 3
    assert caplog.text.count("is a file") == 1
    clock.t = 4.5
    control.flush_if_due()
    assert control.recorder.buffered_messages == 0 and control.status()[0] == OK
    (episode,) = read_episode_events(tmp_path / "elsewhere" / "b")
    assert episode["stop_ns"] is not None


def test_shutdown_stops_the_episode_and_writes_the_buffer(tmp_path):
    graph = Graph()
    graph.publishers = {"/x": (STRING, [RELIABLE])}
    control = _controller(tmp_path, graph, record_always=True, instruction_topic="")
    control.discover()
    control.on_message("/x", string_cdr("between episodes"))
    control.start()
    control.shutdown()
    control.shutdown()  # idempotent
    (episode,) = read_episode_events(tmp_path / "bags" / "b")
    assert episode["stop_ns"] is not None and control.recorder.buffered_messages == 0
