"""vla_node's command output (a ROS helper of the node): each controller Command published once and in order, and
the control status on ``/diagnostics``.

The watchdog, the control timer and the services publish from several threads: a command older than one already
sent (a stop that overtook it) is dropped, and nothing goes out once output has ended (deactivated) except the
deactivation's own stop. One output per configure: its publishers are the node's lifecycle outputs.
"""

from __future__ import annotations

import threading

from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from ..controller import ERROR, OK, WARN, Command
from .vla_messages import TYPES, command_messages, output_topics

OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
_LEVEL = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}


class CommandOutput:
    """Publishes commands on ``node`` (a ``ManagedNode``) once ``active``; ``stats`` is the control StreamStats."""

    def __init__(self, node, stats, frame_id: str, dry_run: bool) -> None:
        self._node, self._stats, self._frame_id, self.dry_run = node, stats, frame_id, dry_run
        self._lock, self._published_seq = threading.Lock(), 0
        self.active = False
        self.pubs = {
            n: node.keep_output(node.create_publisher(TYPES[n], n, OUTPUT_QOS)) for n in output_topics(dry_run)
        }

    def publish(self, command: Command, counters: dict, force: bool = False) -> None:
        """Sends ``command`` unless superseded or output has ended (``force``: the last stop of a deactivation);
        ``counters`` (the controller's) go on /diagnostics with it."""
        with self._lock:
            if command.seq <= self._published_seq or not (self.active or force):
                return
            self._published_seq = command.seq
            self._send(command, counters)

    def _send(self, command: Command, counters: dict) -> None:
        stats, logger = self._stats, self._node.get_logger()
        if command.stop:
            if command.level == ERROR:  # one call site per severity (rclpy's rule for throttled logs)
                logger.error(f"{command.reason}: stop", throttle_duration_sec=2.0)
            else:
                logger.warning(f"{command.reason}: stop", throttle_duration_sec=2.0)
            if command.new_error:
                stats.error(command.reason)
            stats.set_level(_LEVEL[command.level], f"{command.reason}: stopped")
        else:
            stats.set_level(DiagnosticStatus.OK, "running")
        stats.processed(latency_s=command.latency_s)
        for key, value in counters.items():
            stats.set_value(key, value)
        stamp = self._node.get_clock().now().to_msg()
        for topic, msg in command_messages(command, stamp, self._frame_id, self.dry_run):
            self.pubs[topic].publish(msg)
