"""Publish ``diagnostic_msgs/DiagnosticArray`` on ``/diagnostics`` without ``diagnostic_updater``.

``diagnostic_updater`` is not on PyPI (see ``../shared/specs/ros2-from-pypi.md``), so this is the small
part of it a node needs: thread-safe counters per stream (received, processed, dropped, errors, latency)
plus free-form key/values, turned into one ``DiagnosticStatus`` each and published on a timer.

    diag = DiagnosticsPublisher(node, period_s=1.0)
    stats = diag.stats("camera front")
    stats.received(); stats.processed(latency_s=0.012); stats.dropped(); stats.error("bad encoding 'yuv'")
    stats.set_value("cache_frames", 12)
    stats.set_level(DiagnosticStatus.WARN, "no geometry heads: publishing features only")

Level: the one set with ``set_level`` (default OK), raised to WARN while errors happened since the last
report. The message names the level's reason and the last error.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue


def _level(value: int | bytes) -> int:
    # DiagnosticStatus.level is a byte field; rclpy exposes the constants as bytes.
    return value[0] if isinstance(value, bytes | bytearray) else int(value)


# Plain ints (the message constants are bytes, which do not compare with ints).
OK = _level(DiagnosticStatus.OK)
WARN = _level(DiagnosticStatus.WARN)
ERROR = _level(DiagnosticStatus.ERROR)
STALE = _level(DiagnosticStatus.STALE)


class StreamStats:
    """Counters of one stream (one camera, one policy loop); every method is safe from any thread."""

    def __init__(self, name: str, latency_window: int = 100):
        self.name = name
        self._lock = threading.Lock()
        self._received = 0
        self._processed = 0
        self._dropped = 0
        self._errors = 0
        self._errors_since_report = 0
        self._last_error = ""
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._values: dict[str, Any] = {}
        self._level = OK
        self._level_message = ""
        self._last_report_time = time.monotonic()
        self._processed_at_last_report = 0

    # --- counters ---------------------------------------------------------------------------------------------
    def received(self, n: int = 1) -> None:
        with self._lock:
            self._received += n

    def processed(self, latency_s: float | None = None) -> None:
        with self._lock:
            self._processed += 1
            if latency_s is not None:
                self._latencies.append(float(latency_s))

    def dropped(self, n: int = 1) -> None:
        with self._lock:
            self._dropped += n

    def error(self, message: str) -> None:
        with self._lock:
            self._errors += 1
            self._errors_since_report += 1
            self._last_error = str(message)

    def set_value(self, key: str, value: Any) -> None:
        with self._lock:
            self._values[key] = value

    def set_level(self, level: int | bytes, message: str = "") -> None:
        """The standing state of the stream (e.g. WARN "features only: no geometry heads")."""
        with self._lock:
            self._level = _level(level)
            self._level_message = message

    # --- reading ----------------------------------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "received": self._received,
                "processed": self._processed,
                "dropped": self._dropped,
                "errors": self._errors,
            }

    def latency_ms(self) -> tuple[float, float] | None:
        """(mean, max) of the recent latencies in milliseconds, or None before the first one."""
        with self._lock:
            if not self._latencies:
                return None
            values = list(self._latencies)
        return 1000.0 * sum(values) / len(values), 1000.0 * max(values)

    def to_status(self, node_name: str, hardware_id: str = "") -> DiagnosticStatus:
        """A status for this report period; resets the per-period rate and error counters."""
        now = time.monotonic()
        latency = self.latency_ms()
        with self._lock:
            elapsed = max(now - self._last_report_time, 1e-9)
            rate = (self._processed - self._processed_at_last_report) / elapsed
            self._last_report_time, self._processed_at_last_report = now, self._processed
            level, reasons = self._level, [self._level_message] if self._level_message else []
            if self._errors_since_report:
                level = max(level, WARN)
                reasons.append(f"{self._errors_since_report} bad input(s), last: {self._last_error}")
            self._errors_since_report = 0
            values = {
                "rate_hz": f"{rate:.2f}",
                "received": self._received,
                "processed": self._processed,
                "dropped": self._dropped,
                "errors": self._errors,
                "last_error": self._last_error,
                **self._values,
            }
        if latency is not None:
            values["latency_mean_ms"] = f"{latency[0]:.2f}"
            values["latency_max_ms"] = f"{latency[1]:.2f}"
        status = DiagnosticStatus()
        status.level = bytes([level])
        status.name = f"{node_name}: {self.name}"
        status.hardware_id = hardware_id
        status.message = "; ".join(reasons) if reasons else "OK"
        status.values = [KeyValue(key=str(k), value=str(v)) for k, v in values.items()]
        return status


class DiagnosticsPublisher:
    """Owns the ``/diagnostics`` publisher of a node and the stats of its streams; publishes every ``period_s``."""

    def __init__(self, node, period_s: float = 1.0, hardware_id: str | None = None, topic: str = "/diagnostics"):
        if period_s <= 0:
            raise ValueError(f"diagnostics period must be > 0 s, got {period_s}")
        self._node = node
        self._hardware_id = hardware_id if hardware_id is not None else node.get_fully_qualified_name()
        self._streams: dict[str, StreamStats] = {}
        self._lock = threading.Lock()
        self._publisher = node.create_publisher(DiagnosticArray, topic, 10)
        self._timer = node.create_timer(period_s, self.publish)

    def stats(self, name: str) -> StreamStats:
        """The stats called ``name``, created on first use."""
        with self._lock:
            if name not in self._streams:
                self._streams[name] = StreamStats(name)
            return self._streams[name]

    def remove(self, name: str) -> None:
        with self._lock:
            self._streams.pop(name, None)

    def publish(self) -> DiagnosticArray:
        with self._lock:
            streams = list(self._streams.values())
        msg = DiagnosticArray()
        msg.header.stamp = self._node.get_clock().now().to_msg()
        msg.status = [s.to_status(self._node.get_name(), self._hardware_id) for s in streams]
        self._publisher.publish(msg)
        return msg

    def destroy(self) -> None:
        self._node.destroy_timer(self._timer)
        self._node.destroy_publisher(self._publisher)


def status_values(status: DiagnosticStatus) -> dict[str, str]:
    """The key/values of a ``DiagnosticStatus`` as a dict (handy in tests and tools)."""
    return {kv.key: kv.value for kv in status.values}
