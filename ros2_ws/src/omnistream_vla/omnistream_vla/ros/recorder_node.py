"""``recorder_node``: records topics into a crash-safe rosbag2 (MCAP) for finetuning, with episodes.

Like ``ros2 bag record``, but episode-aware and without rosbag2 (not installable from PyPI): raw
(serialized) subscriptions feed :class:`omnistream_vla.recording.BagRecorder`, which writes closed MCAP
chunks and a real ``metadata.yaml`` (see that module for the crash-safety design).

A topic is subscribed once it has a publisher, with the QoS its publishers offer (reliable if they all are,
transient-local if they all are, so a latched instruction published before the recorder started is received);
the offered profiles go into the bag (``offered_qos_profiles``) so a replay keeps them. When a publisher appears
that the subscription could not hear (best-effort or volatile), the topic is subscribed again with QoS that
hears every publisher. Topic names are resolved like any ROS name: relative ones in the node's namespace.

Parameters (``ros__parameters``; every one validated at start and on change, see ``RECORDER_PARAMETERS``):
  topics             string[]  topics to record (any type: the type is looked up on the graph); changeable
  instruction_topic  string    std_msgs/String with the current instruction (recorded too) ["/instruction"]
  output_dir         string    bags are created here (change it at runtime to retry elsewhere) ["bags"]
  bag_name           string    bag directory name, read-only ["" = rosbag2_<date>-<time>]
  record_always      bool      record between episodes too (otherwise only inside episodes) [false]
  chunk_duration_s   double    close a chunk file at least this often [5.0]
  chunk_max_mb       double    ... or when this much is buffered [256]
  min_free_mb        double    refuse to write with less free disk space (clear "disk full" error) [64]
  queue_depth        int       subscription queue depth, read-only (rides out stalls without losing messages) [1000]
  retry_period_s     double    after a write error, retry this often (the buffer is kept) [2.0]

Services (std_srvs/Trigger): ``~/start`` (new episode with the current instruction), ``~/stop`` (ends it
and writes it to disk before answering), ``~/mark_success``, ``~/mark_failure``; topic ``~/notes``
(std_msgs/String) adds an operator note to the episode. Episode events are recorded on
``~/episode_events`` (std_msgs/String JSON) inside the bag, and listed in ``episodes.json`` beside it and in
``metadata.yaml`` ``custom_data``. Status goes to ``/diagnostics``. On exit (SIGINT, SIGTERM, shutdown) the
running episode is stopped and the buffer written.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
from pathlib import Path

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from std_msgs.msg import String
from std_srvs.srv import Trigger

from omnistream_perception.ros.node_main import run_node

from ..recording import (
    RECORDER_PARAMETERS,
    BagRecorder,
    RecordingError,
    qos_profile_dict,
    validate_recorder_parameter,
)

NODE_NAME = "recorder_node"  # the executable's name: `/**/recorder_node` in config/recorder.yaml matches it
INSTRUCTION_TYPE = "std_msgs/msg/String"


def message_class(msgtype: str):
    """The Python class of 'pkg/msg/Name' (what a raw subscription needs for its type support)."""
    package, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


class RecorderNode(Node):
    """The recorder; construct it in any process (``parameter_overrides`` for tests and bring-up)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        for name, spec in RECORDER_PARAMETERS.items():
            # Types are checked by validate_recorder_parameter (`chunk_max_mb: 10` is a number too), so a wrong
            # type is one clear error instead of rclpy's exception.
            descriptor = ParameterDescriptor(description=spec.description, read_only=spec.read_only)
            descriptor.dynamic_typing = True
            self.declare_parameter(name, spec.default, descriptor)
        values, problems = {}, []
        for name in RECORDER_PARAMETERS:
            value, problem = validate_recorder_parameter(name, self.get_parameter(name).value)
            values[name] = value
            if problem:
                problems.append(problem)
        if not problems:
            try:
                self.wanted, self.instruction_topic = self._resolve(values["topics"], values["instruction_topic"])
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError(f"bad {node_name} parameters: " + "; ".join(problems))
        self.record_always = values["record_always"]
        self.retry_period_s = values["retry_period_s"]
        self.queue_depth = values["queue_depth"]
        self.recorder = BagRecorder(
            Path(values["output_dir"]),
            bag_name=values["bag_name"] or None,
            chunk_duration_s=values["chunk_duration_s"],
            chunk_max_bytes=int(values["chunk_max_mb"] * 1e6),
            min_free_bytes=int(values["min_free_mb"] * 1e6),
            events_topic=self.resolve_topic_name("~/episode_events"),
        )
        self.instruction = ""
        self.last_raw: dict[str, bytes] = {}
        self.recorded_subscriptions: dict[str, object] = {}  # topic -> subscription (None: cannot be recorded)
        self._sub_qos: dict[str, tuple[bool, bool]] = {}  # topic -> (reliable, transient_local) subscribed with
        self._msgtypes: dict[str, str] = {}
        self._topics_lock = threading.RLock()
        self._last_attempt = 0.0
        self._last_logged_error: str | None = None
        self.add_on_set_parameters_callback(self._on_parameters)

        self.events_pub = self.create_publisher(String, "~/episode_events", 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        services = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, "~/start", self._on_start, callback_group=services)
        self.create_service(Trigger, "~/stop", self._on_stop, callback_group=services)
        self.create_service(Trigger, "~/mark_success", self._on_mark(True), callback_group=services)
        self.create_service(Trigger, "~/mark_failure", self._on_mark(False), callback_group=services)
        self.create_subscription(String, "~/notes", self._on_note, 10)
        self.create_timer(0.5, self._discover)
        self.create_timer(0.2, self._flush_if_due, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0, self._publish_diagnostics)
        self._discover()
        self.get_logger().info(f"recording {self.wanted} into {self.recorder.output_dir}")

    # -- parameters

    def _resolve(self, topics: list[str], instruction_topic: str) -> tuple[list[str], str]:
        """Fully qualified names (relative ones in the node's namespace, remappings applied), as ROS resolves them."""

        def resolve(name: str) -> str:
            try:
                return self.resolve_topic_name(name)
            except Exception as exc:  # rclpy raises RCLError (a RuntimeError) for an invalid name
                raise ValueError(f"invalid topic name {name!r}: {str(exc).split(',')[0]}") from exc

        wanted = list(dict.fromkeys(resolve(t) for t in topics))
        instruction = resolve(instruction_topic) if instruction_topic else ""
        if instruction and instruction not in wanted:
            wanted.append(instruction)
        return wanted, instruction

    def _on_parameters(self, params) -> SetParametersResult:
        updates = {}
        for p in params:
            value, problem = validate_recorder_parameter(p.name, p.value)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
            updates[p.name] = value
        if "topics" in updates or "instruction_topic" in updates:
            topics = updates.get("topics")
            if topics is None:
                topics = validate_recorder_parameter("topics", self.get_parameter("topics").value)[0]
            instruction = updates.get("instruction_topic", self.instruction_topic)
            try:
                wanted, instruction_topic = self._resolve(topics, instruction)
            except ValueError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            self._set_topics(wanted, instruction_topic)
        for name, value in updates.items():  # all valid: apply them together
            if name == "output_dir":
                self.recorder.set_output_dir(Path(value))
            elif name == "min_free_mb":
                self.recorder.min_free_bytes = int(value * 1e6)
            elif name == "chunk_max_mb":
                self.recorder.chunk_max_bytes = int(value * 1e6)
            elif name == "chunk_duration_s":
                self.recorder.chunk_duration_s = value
            elif name == "retry_period_s":
                self.retry_period_s = value
            elif name == "record_always":
                self.record_always = value
        return SetParametersResult(successful=True)

    def _set_topics(self, wanted: list[str], instruction_topic: str) -> None:
        with self._topics_lock:
            for topic in [t for t in self.recorded_subscriptions if t not in wanted]:
                sub = self.recorded_subscriptions.pop(topic)
                self._sub_qos.pop(topic, None)
                if sub is not None:
                    self.destroy_subscription(sub)
                self.get_logger().info(f"no longer recording {topic}")
            if instruction_topic != self.instruction_topic:
                self.instruction = ""
            self.wanted, self.instruction_topic = wanted, instruction_topic
        self._discover()
        self.get_logger().info(f"recording {self.wanted}")

    # -- subscriptions on whatever type each topic has on the graph, with the QoS its publishers offer

    def _publisher_qos(self, topic: str) -> tuple[tuple[bool, bool] | None, list[dict]]:
        """((reliable, transient_local) that hears every publisher, the offered profiles); None: no publisher."""
        publishers = self.get_publishers_info_by_topic(topic)
        if not publishers:
            return None, []
        profiles = [p.qos_profile for p in publishers]
        reliable = all(q.reliability == ReliabilityPolicy.RELIABLE for q in profiles)
        latched = all(q.durability == DurabilityPolicy.TRANSIENT_LOCAL for q in profiles)
        offered = [
            qos_profile_dict(
                q.history, q.depth, q.reliability, q.durability, q.deadline.nanoseconds, q.lifespan.nanoseconds,
                q.liveliness, q.liveliness_lease_duration.nanoseconds, q.avoid_ros_namespace_conventions,
            )
            for q in profiles
        ]  # fmt: skip
        offered.sort(key=lambda d: json.dumps(d, sort_keys=True))  # the graph lists publishers in no fixed order
        return (reliable, latched), offered

    def _discover(self) -> None:
        with self._topics_lock:
            graph = dict(self.get_topic_names_and_types())
            for topic in self.wanted:
                if self.recorded_subscriptions.get(topic, False) is None:
                    continue  # cannot be recorded (logged once)
                types = graph.get(topic)
                if not types:
                    continue  # not on the graph yet; retried every 0.5 s
                wanted_qos, offered = self._publisher_qos(topic)
                if wanted_qos is None:
                    continue  # only subscribers so far: wait for a publisher to learn its QoS
                current = self._sub_qos.get(topic)
                if current is not None:
                    # Re-subscribe only when a publisher appeared that the subscription cannot hear.
                    if (current[0] and not wanted_qos[0]) or (current[1] and not wanted_qos[1]):
                        self._subscribe(topic, types[0], wanted_qos, offered, again=True)
                    elif offered != self.recorder.topics[topic].offered_qos:
                        self.recorder.add_topic(topic, self._msgtypes[topic], offered)
                    continue
                self._subscribe(topic, types[0], wanted_qos, offered)

    def _subscribe(self, topic: str, msgtype: str, qos: tuple[bool, bool], offered: list[dict], again=False) -> None:
        reliable, latched = qos
        try:
            self.recorder.add_topic(topic, msgtype, offered)
            cls = message_class(msgtype)
        except (RecordingError, ImportError, AttributeError, ValueError) as exc:
            self.get_logger().error(f"cannot record {topic} ({msgtype}): {exc}")
            self.recorded_subscriptions[topic] = None  # do not retry every 0.5 s
            return
        if topic == self.instruction_topic and msgtype != INSTRUCTION_TYPE:
            self.get_logger().error(
                f"instruction_topic {topic} has type {msgtype}, not {INSTRUCTION_TYPE}: recorded, but episodes get "
                "no instruction from it"
            )
        self._msgtypes[topic] = msgtype
        # A deep queue: a recorder must ride out a stalled process (disk, CPU) without losing messages.
        profile = QoSProfile(
            depth=self.queue_depth,
            reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
        )
        old = self.recorded_subscriptions.get(topic)
        # The new subscription exists before the old one goes, so no message falls between them.
        self.recorded_subscriptions[topic] = self.create_subscription(
            cls, topic, lambda data, topic=topic: self._on_message(topic, data), profile, raw=True
        )
        self._sub_qos[topic] = qos
        if old is not None:
            self.destroy_subscription(old)
        described = f"{'reliable' if reliable else 'best effort'}{', transient local' if latched else ''}"
        if again:
            self.get_logger().warning(f"a new publisher on {topic} needs other QoS: subscribed again ({described})")
        else:
            self.get_logger().info(f"recording {topic} [{msgtype}] ({described})")

    def _on_message(self, topic: str, data: bytes) -> None:
        self.last_raw[topic] = data  # the topics' last state survives episodes and write errors
        if topic == self.instruction_topic and self._msgtypes.get(topic) == INSTRUCTION_TYPE:
            self.instruction = deserialize_message(data, String).data
        if self.record_always or self.recorder.current is not None:
            self.recorder.add(topic, self.get_clock().now().nanoseconds, data)

    # -- episodes

    def _now(self) -> int:
        return self.get_clock().now().nanoseconds

    def _publish_event(self, event: str) -> None:
        episode = self.recorder.current or (self.recorder.episodes[-1] if self.recorder.episodes else None)
        if episode is not None:
            self.events_pub.publish(String(data=json.dumps({"event": event, **episode.as_dict()})))

    def _on_start(self, request, response):
        try:
            now = self._now()
            episode = self.recorder.start_episode(self.instruction, now)
        except ValueError as exc:
            response.success, response.message = False, str(exc)
            return response
        # The instruction was usually published before the start: record it at the start so the episode
        # carries its instruction inside the bag (an unstamped message; its bag time is the start).
        if not self.record_always and self.instruction_topic in self.last_raw:
            self.recorder.add(self.instruction_topic, now, self.last_raw[self.instruction_topic])
        self._publish_event("start")
        response.success = True
        response.message = f"episode {episode.index} started: {episode.instruction!r}"
        if self.recorder.last_error:
            response.message += f" (warning: last write failed: {self.recorder.last_error})"
        return response

    def _on_stop(self, request, response):
        try:
            episode = self.recorder.stop_episode(self._now())
        except ValueError as exc:
            response.success, response.message = False, str(exc)
            return response
        self._publish_event("stop")
        try:  # make the finished episode durable before answering
            chunk = self.recorder.flush()
        except RecordingError as exc:
            self._report_error(exc)
            response.success = False
            response.message = f"episode {episode.index} stopped but NOT yet on disk (kept for retry): {exc}"
            return response
        response.success = True
        response.message = f"episode {episode.index} stopped and written ({chunk.name if chunk else 'no data'})"
        return response

    def _on_mark(self, success: bool):
        def handler(request, response):
            try:
                episode = self.recorder.annotate(self._now(), success=success)
            except ValueError as exc:
                response.success, response.message = False, str(exc)
                return response
            self._publish_event("annotate")
            response.success = True
            response.message = f"episode {episode.index} marked {'success' if success else 'failure'}"
            return response

        return handler

    def _on_note(self, msg: String) -> None:
        try:
            self.recorder.annotate(self._now(), note=msg.data)
        except ValueError as exc:
            self.get_logger().warning(f"note dropped: {exc}")

    # -- disk

    def _flush_if_due(self) -> None:
        due = self.recorder.chunk_due()
        if self.recorder.last_error is not None:
            due = self.recorder.buffered_messages > 0 and time.monotonic() - self._last_attempt >= self.retry_period_s
        if not due:
            return
        self._last_attempt = time.monotonic()
        try:
            self.recorder.flush()
        except RecordingError as exc:
            self._report_error(exc)
            return
        if self._last_logged_error is not None:
            self.get_logger().info("recording recovered: the buffered messages are on disk")
            self._last_logged_error = None

    def _report_error(self, exc: Exception) -> None:
        if str(exc) != self._last_logged_error:
            self.get_logger().error(f"{exc} ({self.recorder.buffered_messages} messages kept in memory)")
            self._last_logged_error = str(exc)
        self._publish_diagnostics()

    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus(name="omnistream: recorder", hardware_id="recorder")
        rec = self.recorder
        if rec.last_error:
            status.level, status.message = DiagnosticStatus.ERROR, rec.last_error
        elif rec.dropped:
            status.level, status.message = DiagnosticStatus.WARN, f"{rec.dropped} messages dropped (buffer full)"
        else:
            status.level = DiagnosticStatus.OK
            status.message = "recording" if rec.current else "idle"
        with self._topics_lock:
            subscribed = [t for t, s in self.recorded_subscriptions.items() if s is not None]
            waiting = [t for t in self.wanted if t not in self.recorded_subscriptions]
        values = {
            "bag": str(rec.bag.path) if rec.bag else "",
            "chunks": str(len(rec.bag.files) if rec.bag else 0),
            "episodes": str(len(rec.episodes)),
            "buffered_messages": str(rec.buffered_messages),
            "dropped_messages": str(rec.dropped),
            "subscribed": ",".join(subscribed),
            "waiting_for_publishers": ",".join(waiting),
        }
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(msg)

    def shutdown(self) -> None:
        """Stop a running episode and write what is buffered (a clean exit loses nothing). Idempotent: the
        shared node main may call it after a signal and again on the way out."""
        try:
            self.recorder.close(self._now())
        except RecordingError as exc:
            self.get_logger().error(f"could not write the last chunk at shutdown: {exc}")


def main(args: list[str] | None = None) -> int:
    # A clean exit (Ctrl-C, SIGTERM included) stops a running episode and writes the buffer: nothing recorded is lost.
    return run_node(RecorderNode, NODE_NAME, args, num_threads=3, on_exit=RecorderNode.shutdown)


if __name__ == "__main__":
    raise SystemExit(main())
