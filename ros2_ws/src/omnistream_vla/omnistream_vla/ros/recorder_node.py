"""``recorder_node``: records topics into a crash-safe rosbag2 (MCAP) for finetuning, with episodes.

Like ``ros2 bag record``, but episode-aware and without rosbag2 (not installable from PyPI): raw
(serialized) subscriptions feed :class:`omnistream_vla.recording.BagRecorder`, which writes closed MCAP
chunks and a real ``metadata.yaml`` (see that module for the crash-safety design). What to subscribe, with
which QoS (the one its publishers offer, latched topics too), episodes and retries are decided by
:class:`omnistream_vla.recorder_controller.RecorderController`; this node owns the ROS entities only. Topic
names are resolved like any ROS name: relative ones in the node's namespace.

Parameters (``ros__parameters``; every one checked at start and on change, see ``recorder_parameters.py``):
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
from functools import partial

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String
from std_srvs.srv import Trigger

from omnistream_perception.ros.node_main import run_node
from omnistream_perception.ros.node_params import declare_parameters, parameter_value

from ..recorder_controller import RecorderController
from ..recording import qos_profile_dict
from .recorder_parameters import PARAMETERS

NODE_NAME = "recorder_node"  # the executable's name: `/**/recorder_node` in config/recorder.yaml matches it


def message_class(msgtype: str):
    """The Python class of 'pkg/msg/Name' (what a raw subscription needs for its type support)."""
    package, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def _one_topic_as_list(params: list[Parameter]) -> list[Parameter]:
    """`topics: /camera/image_raw` (one name, a string) is a list of one, at start and at runtime."""
    return [
        Parameter(p.name, value=[p.value]) if p.name == "topics" and isinstance(p.value, str) else p for p in params
    ]


class RecorderNode(Node):
    """The recorder; construct it in any process (``parameter_overrides`` for tests and bring-up). It is the
    controller's :class:`~omnistream_vla.recorder_controller.RecorderPorts`."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        self._parameter_overrides.update((p.name, p) for p in _one_topic_as_list([*self._parameter_overrides.values()]))
        declare_parameters(self, PARAMETERS)
        self.queue_depth = parameter_value(self, "queue_depth", PARAMETERS)
        self.recorded_subscriptions: dict[str, object] = {}  # topic -> raw subscription
        settings = {name: parameter_value(self, name, PARAMETERS) for name in PARAMETERS}
        try:
            self.control = RecorderController(
                settings, self, self.get_logger(), self.resolve_topic_name("~/episode_events")
            )
        except ValueError as exc:  # a topic name that does not resolve
            raise ValueError(f"bad {node_name} parameters: {exc}") from exc
        self.add_pre_set_parameters_callback(_one_topic_as_list)
        self.add_on_set_parameters_callback(self._check_topics)
        self.add_post_set_parameters_callback(lambda params: self.control.apply(self._values(params)))

        self.events_pub = self.create_publisher(String, "~/episode_events", 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        services = MutuallyExclusiveCallbackGroup()
        handlers = {"start": self.control.start, "stop": self.control.stop,
                    "mark_success": partial(self.control.mark, True), "mark_failure": partial(self.control.mark, False)}  # fmt: skip
        for name, handler in handlers.items():
            self.create_service(Trigger, f"~/{name}", partial(self._on_trigger, handler), callback_group=services)
        self.create_subscription(String, "~/notes", lambda msg: self.control.note(msg.data), 10)
        self.create_timer(0.5, self.control.discover)
        self.create_timer(0.2, self.control.flush_if_due, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0, self.publish_diagnostics)
        self.control.discover()
        self.get_logger().info(f"recording {self.control.wanted} into {self.control.recorder.output_dir}")

    # -- parameters

    @staticmethod
    def _values(params: list[Parameter]) -> dict:
        """The changed values, numbers as floats where the parameter is one (``chunk_max_mb:=10`` is 10.0)."""
        floats = {name for name, spec in PARAMETERS.items() if isinstance(spec.default, float)}
        return {p.name: float(p.value) if p.name in floats else p.value for p in params}

    def _check_topics(self, params: list[Parameter]) -> SetParametersResult:
        reason = self.control.topics_problem({p.name: p.value for p in params})
        return SetParametersResult(successful=reason is None, reason=reason or "")

    # -- RecorderPorts

    def offered_qos(self, topic: str) -> list[dict]:
        return [
            qos_profile_dict(
                q.history, q.depth, q.reliability, q.durability, q.deadline.nanoseconds, q.lifespan.nanoseconds,
                q.liveliness, q.liveliness_lease_duration.nanoseconds, q.avoid_ros_namespace_conventions,
            )
            for q in (p.qos_profile for p in self.get_publishers_info_by_topic(topic))
        ]  # fmt: skip

    def subscribe(self, topic: str, msgtype: str, reliable: bool, latched: bool) -> None:
        # A deep queue: a recorder must ride out a stalled process (disk, CPU) without losing messages.
        profile = QoSProfile(
            depth=self.queue_depth,
            reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
        )
        cls, old = message_class(msgtype), self.recorded_subscriptions.get(topic)
        # The new subscription exists before the old one goes, so no message falls between them.
        self.recorded_subscriptions[topic] = self.create_subscription(
            cls, topic, lambda data, topic=topic: self.control.on_message(topic, data), profile, raw=True
        )
        if old is not None:
            self.destroy_subscription(old)

    def unsubscribe(self, topic: str) -> None:
        sub = self.recorded_subscriptions.pop(topic, None)
        if sub is not None:
            self.destroy_subscription(sub)

    def publish_event(self, text: str) -> None:
        self.events_pub.publish(String(data=text))

    def now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def publish_diagnostics(self) -> None:
        level, message, values = self.control.status()
        status = DiagnosticStatus(name="omnistream: recorder", hardware_id="recorder", message=message)
        status.level = bytes([level])
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(msg)

    # -- services

    @staticmethod
    def _on_trigger(handler, request, response):
        response.success, response.message = handler()
        return response

    def shutdown(self) -> None:
        """Stop a running episode and write what is buffered (a clean exit loses nothing). Idempotent: the
        shared node main may call it after a signal and again on the way out."""
        self.control.shutdown()


def main(args: list[str] | None = None) -> int:
    # A clean exit (Ctrl-C, SIGTERM included) stops a running episode and writes the buffer: nothing recorded is lost.
    return run_node(RecorderNode, NODE_NAME, args, num_threads=3, on_exit=RecorderNode.shutdown)


if __name__ == "__main__":
    raise SystemExit(main())
