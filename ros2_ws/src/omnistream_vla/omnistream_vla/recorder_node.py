"""``recorder_node``: records topics into a crash-safe rosbag2 (MCAP) for finetuning, with episodes.

Like ``ros2 bag record``, but episode-aware and without rosbag2 (not installable from PyPI): raw
(serialized) subscriptions feed :class:`omnistream_vla.recording.BagRecorder`, which writes closed MCAP
chunks and a real ``metadata.yaml`` (see that module for the crash-safety design).

Parameters (``ros__parameters``):
  topics             string[]  topics to record (any type: the type is looked up on the graph)
  instruction_topic  string    std_msgs/String with the current instruction (recorded too) ["/instruction"]
  output_dir         string    bags are created here (change it at runtime to retry elsewhere) ["bags"]
  bag_name           string    bag directory name ["" = rosbag2_<date>-<time>]
  record_always      bool      record between episodes too (otherwise only inside episodes) [false]
  chunk_duration_s   double    close a chunk file at least this often [5.0]
  chunk_max_mb       double    ... or when this much is buffered [256]
  min_free_mb        double    refuse to write with less free disk space (clear "disk full" error) [64]
  queue_depth        int       subscription queue depth (rides out stalls without losing messages) [1000]
  retry_period_s     double    after a write error, retry this often (the buffer is kept) [2.0]

Services (std_srvs/Trigger): ``~/start`` (new episode with the current instruction), ``~/stop`` (ends it
and writes it to disk before answering), ``~/mark_success``, ``~/mark_failure``; topic ``~/notes``
(std_msgs/String) adds an operator note to the episode. Episode events are recorded on
``~/episode_events`` (std_msgs/String JSON) inside the bag, and listed in ``episodes.json`` beside it and in
``metadata.yaml`` ``custom_data``. Status goes to ``/diagnostics``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import String
from std_srvs.srv import Trigger

from omnistream_perception.node_main import run_node

from .recording import BagRecorder, RecordingError


def message_class(msgtype: str):
    """The Python class of 'pkg/msg/Name' (what a raw subscription needs for its type support)."""
    package, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


class RecorderNode(Node):
    def __init__(self, **kwargs):
        super().__init__("recorder", **kwargs)
        declare = self.declare_parameter
        declare("topics", [""], ParameterDescriptor(description="topics to record (any type)"))
        declare("instruction_topic", "/instruction", ParameterDescriptor(description="std_msgs/String instruction"))
        declare("output_dir", "bags", ParameterDescriptor(description="directory the bags are created in"))
        declare("bag_name", "", ParameterDescriptor(description="bag directory name (default: date-time)"))
        declare("record_always", False, ParameterDescriptor(description="record between episodes too"))
        declare("chunk_duration_s", 5.0, ParameterDescriptor(description="close a chunk file this often"))
        declare("chunk_max_mb", 256.0, ParameterDescriptor(description="close a chunk past this size"))
        declare("min_free_mb", 64.0, ParameterDescriptor(description="minimum free disk space to write"))
        declare("queue_depth", 1000, ParameterDescriptor(description="subscription queue (survives stalls)"))
        declare("retry_period_s", 2.0, ParameterDescriptor(description="retry period after a write error"))
        param = self.get_parameter
        self.instruction_topic = param("instruction_topic").value
        self.record_always = bool(param("record_always").value)
        self.retry_period_s = float(param("retry_period_s").value)
        self.queue_depth = int(param("queue_depth").value)
        self.wanted = [t for t in param("topics").value if t]
        if self.instruction_topic and self.instruction_topic not in self.wanted:
            self.wanted.append(self.instruction_topic)
        self.recorder = BagRecorder(
            Path(param("output_dir").value),
            bag_name=param("bag_name").value or None,
            chunk_duration_s=float(param("chunk_duration_s").value),
            chunk_max_bytes=int(float(param("chunk_max_mb").value) * 1e6),
            min_free_bytes=int(float(param("min_free_mb").value) * 1e6),
            events_topic=self.resolve_topic_name("~/episode_events"),
        )
        self.instruction = ""
        self.last_raw: dict[str, bytes] = {}
        self.recorded_subscriptions: dict[str, object] = {}
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
        self.create_subscription(String, self.instruction_topic, self._on_instruction, 10)
        self.create_timer(0.5, self._discover)
        self.create_timer(0.2, self._flush_if_due, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0, self._publish_diagnostics)
        self._discover()
        self.get_logger().info(f"recording {self.wanted} into {self.recorder.output_dir}")

    # -- parameters

    def _on_parameters(self, params) -> SetParametersResult:
        for p in params:
            if p.name == "output_dir":
                if not str(p.value):
                    return SetParametersResult(successful=False, reason="output_dir must not be empty")
                self.recorder.set_output_dir(Path(p.value))
            elif p.name == "min_free_mb":
                if float(p.value) < 0:
                    return SetParametersResult(successful=False, reason="min_free_mb must be >= 0")
                self.recorder.min_free_bytes = int(float(p.value) * 1e6)
            elif p.name in ("chunk_duration_s", "retry_period_s", "chunk_max_mb") and float(p.value) <= 0:
                return SetParametersResult(successful=False, reason=f"{p.name} must be > 0")
            elif p.name == "chunk_duration_s":
                self.recorder.chunk_duration_s = float(p.value)
            elif p.name == "retry_period_s":
                self.retry_period_s = float(p.value)
            elif p.name == "record_always":
                self.record_always = bool(p.value)
        return SetParametersResult(successful=True)

    # -- subscriptions on whatever type each topic has on the graph

    def _discover(self) -> None:
        missing = [t for t in self.wanted if t not in self.recorded_subscriptions]
        if not missing:
            return
        graph = dict(self.get_topic_names_and_types())
        for topic in missing:
            types = graph.get(topic)
            if not types:
                continue  # not published yet; retried every 0.5 s
            msgtype = types[0]
            try:
                self.recorder.add_topic(topic, msgtype)
                cls = message_class(msgtype)
            except (RecordingError, ImportError, AttributeError, ValueError) as exc:
                self.get_logger().error(f"cannot record {topic} ({msgtype}): {exc}")
                self.recorded_subscriptions[topic] = None  # do not retry every 0.5 s
                continue
            publishers = self.get_publishers_info_by_topic(topic)
            reliable = publishers and all(p.qos_profile.reliability == ReliabilityPolicy.RELIABLE for p in publishers)
            # A deep queue: a recorder must ride out a stalled process (disk, CPU) without losing messages.
            qos = QoSProfile(
                depth=self.queue_depth,
                reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
            )
            self.recorded_subscriptions[topic] = self.create_subscription(
                cls, topic, lambda data, topic=topic: self._on_message(topic, data), qos, raw=True
            )
            self.get_logger().info(f"recording {topic} [{msgtype}] ({'reliable' if reliable else 'best effort'})")

    def _on_message(self, topic: str, data: bytes) -> None:
        self.last_raw[topic] = data  # the topics' last state survives episodes and write errors
        if self.record_always or self.recorder.current is not None:
            self.recorder.add(topic, self.get_clock().now().nanoseconds, data)

    def _on_instruction(self, msg: String) -> None:
        self.instruction = msg.data

    # -- episodes

    def _now(self) -> int:
        return self.get_clock().now().nanoseconds

    def _publish_event(self, event: str) -> None:
        episode = self.recorder.current or (self.recorder.episodes[-1] if self.recorder.episodes else None)
        if episode is not None:
            import json

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
        import time

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
        values = {
            "bag": str(rec.bag.path) if rec.bag else "",
            "chunks": str(len(rec.bag.files) if rec.bag else 0),
            "episodes": str(len(rec.episodes)),
            "buffered_messages": str(rec.buffered_messages),
            "dropped_messages": str(rec.dropped),
            "subscribed": ",".join(t for t, s in self.recorded_subscriptions.items() if s is not None),
        }
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(msg)

    def shutdown(self) -> None:
        """Stop a running episode and write what is buffered (a clean exit loses nothing)."""
        if self.recorder.current is not None:
            self.recorder.stop_episode(self._now())
        try:
            self.recorder.flush()
        except RecordingError as exc:
            self.get_logger().error(f"could not write the last chunk at shutdown: {exc}")


def main(args: list[str] | None = None) -> int:
    # A clean exit (Ctrl-C included) stops a running episode and writes the buffer: nothing recorded is lost.
    return run_node(RecorderNode, "recorder", args, num_threads=3, on_exit=RecorderNode.shutdown)


if __name__ == "__main__":
    raise SystemExit(main())
