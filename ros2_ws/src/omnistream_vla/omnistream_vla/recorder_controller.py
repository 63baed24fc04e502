"""The recorder's behaviour, rclpy-free: which topics to subscribe with which QoS, episodes, retries, status.

``recorder_node`` is a thin adapter: it declares the parameters and owns the ROS entities; everything it decides
lives here and is tested without ROS. The node hands itself in as the :class:`RecorderPorts` (graph queries,
raw subscriptions, the events publisher, the clock).

* Topics are subscribed once they have a publisher, with QoS that hears every publisher (reliable if they all
  are, transient-local if they all are, so a latched instruction published before the recorder started is
  received). When a publisher appears that the subscription cannot hear, the topic is subscribed again; the
  offered profiles go into the bag (``offered_qos_profiles``) so a replay keeps them.
* The last message of every topic is kept, so an episode starting after its instruction was published still
  carries the instruction inside the bag.
* A failed write is retried every ``retry_period_s`` (the buffer is kept); the error is logged once per reason.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .recording import BagRecorder, RecordingError, string_from_cdr

INSTRUCTION_TYPE = "std_msgs/msg/String"
# rmw enum values, as qos_profile_dict stores them
RELIABLE, TRANSIENT_LOCAL = 1, 1
OK, WARN, ERROR = 0, 1, 2  # diagnostic levels


class RecorderPorts(Protocol):
    """What the controller asks of ROS; ``recorder_node`` implements it."""

    def resolve_topic_name(self, name: str) -> str: ...  # raises for an invalid name

    def get_topic_names_and_types(self) -> list[tuple[str, list[str]]]: ...

    def offered_qos(self, topic: str) -> list[dict[str, Any]]: ...  # one qos_profile_dict per publisher

    def subscribe(self, topic: str, msgtype: str, reliable: bool, latched: bool) -> None: ...  # replaces one

    def unsubscribe(self, topic: str) -> None: ...

    def publish_event(self, text: str) -> None: ...

    def publish_diagnostics(self) -> None: ...

    def now_ns(self) -> int: ...


def topic_names(value: str | list[str]) -> list[str]:
    """The topic list of the ``topics`` parameter: one name given as a string is a list of one; blanks go."""
    names = [value] if isinstance(value, str) else list(value)
    return [n.strip() for n in names if n.strip()]


def hearing_qos(offered: list[dict[str, Any]]) -> tuple[bool, bool]:
    """(reliable, transient_local) of a subscription that hears every publisher of ``offered``."""
    return (
        all(q["reliability"] == RELIABLE for q in offered),
        all(q["durability"] == TRANSIENT_LOCAL for q in offered),
    )


def _describe(qos: tuple[bool, bool]) -> str:
    return f"{'reliable' if qos[0] else 'best effort'}{', transient local' if qos[1] else ''}"


class RecorderController:
    """Topic subscriptions, episodes and disk writes of one recorder (``settings``: the parameters by name)."""

    def __init__(
        self,
        settings: Mapping[str, Any],
        ports: RecorderPorts,
        logger,
        events_topic: str,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ports, self.log, self._clock = ports, logger, clock
        self._lock = threading.RLock()
        self._given = (topic_names(settings["topics"]), settings["instruction_topic"].strip())
        self.wanted, self.instruction_topic = self.resolve_topics(*self._given)
        self.recorder = BagRecorder(Path(settings["output_dir"].strip()), bag_name=settings["bag_name"].strip() or None,
                                    events_topic=events_topic)  # fmt: skip
        self.record_always, self.retry_period_s = False, 1.0
        self.apply({k: v for k, v in settings.items() if k not in ("topics", "instruction_topic", "output_dir")})
        self.instruction = ""
        self.last_raw: dict[str, bytes] = {}  # the topics' last state survives episodes and write errors
        self.sub_qos: dict[str, tuple[bool, bool]] = {}  # topic -> (reliable, transient_local) subscribed with
        self.unrecordable: set[str] = set()  # logged once, not retried
        self._msgtypes: dict[str, str] = {}
        self._last_attempt = 0.0
        self._last_logged_error: str | None = None

    # -- parameters

    def resolve_topics(self, topics: list[str], instruction_topic: str) -> tuple[list[str], str]:
        """Fully qualified names (relative ones in the node's namespace, remappings applied); ValueError names a
        bad one."""

        def resolve(name: str) -> str:
            try:
                return self.ports.resolve_topic_name(name)
            except Exception as exc:  # rclpy raises RCLError (a RuntimeError) for an invalid name
                raise ValueError(f"invalid topic name {name!r}: {str(exc).split(',')[0]}") from exc

        wanted = list(dict.fromkeys(resolve(t) for t in topics))
        instruction = resolve(instruction_topic) if instruction_topic else ""
        if instruction and instruction not in wanted:
            wanted.append(instruction)
        return wanted, instruction

    def _topics_of(self, updates: Mapping[str, Any]) -> tuple[list[str], str]:
        topics = topic_names(updates.get("topics", self._given[0]))
        return topics, str(updates.get("instruction_topic", self._given[1])).strip()

    def topics_problem(self, updates: Mapping[str, Any]) -> str | None:
        """Why a change of ``topics`` / ``instruction_topic`` cannot be applied, or None."""
        if "topics" not in updates and "instruction_topic" not in updates:
            return None
        try:
            self.resolve_topics(*self._topics_of(updates))
        except ValueError as exc:
            return str(exc)
        return None

    def apply(self, updates: Mapping[str, Any]) -> None:
        """Apply checked parameter values (all of them together)."""
        if "topics" in updates or "instruction_topic" in updates:
            self._given = self._topics_of(updates)
            self.set_topics(*self.resolve_topics(*self._given))
        rec = self.recorder
        for name, value in updates.items():
            if name == "output_dir":
                rec.set_output_dir(Path(value.strip()))
            elif name == "min_free_mb":
                rec.min_free_bytes = int(value * 1e6)
            elif name == "chunk_max_mb":
                rec.chunk_max_bytes = int(value * 1e6)
            elif name == "chunk_duration_s":
                rec.chunk_duration_s = float(value)
            elif name == "retry_period_s":
                self.retry_period_s = float(value)
            elif name == "record_always":
                self.record_always = bool(value)

    def set_topics(self, wanted: list[str], instruction_topic: str) -> None:
        with self._lock:
            for topic in [t for t in [*self.sub_qos, *self.unrecordable] if t not in wanted]:
                if self.sub_qos.pop(topic, None) is not None:
                    self.ports.unsubscribe(topic)
                self.unrecordable.discard(topic)
                self.log.info(f"no longer recording {topic}")
            if instruction_topic != self.instruction_topic:
                self.instruction = ""
            self.wanted, self.instruction_topic = wanted, instruction_topic
        self.discover()
        self.log.info(f"recording {self.wanted}")

    # -- subscriptions on whatever type each topic has on the graph, with the QoS its publishers offer

    def discover(self) -> None:
        """Subscribe what has publishers now; subscribe again where a new publisher cannot be heard."""
        with self._lock:
            graph = dict(self.ports.get_topic_names_and_types())
            for topic in self.wanted:
                types = graph.get(topic)
                if topic in self.unrecordable or not types:
                    continue  # cannot be recorded (logged once), or not on the graph yet
                # The graph lists publishers in no fixed order.
                offered = sorted(self.ports.offered_qos(topic), key=lambda d: json.dumps(d, sort_keys=True))
                if not offered:
                    continue  # only subscribers so far: wait for a publisher to learn its QoS
                qos, current = hearing_qos(offered), self.sub_qos.get(topic)
                if current is None:
                    self._subscribe(topic, types[0], qos, offered)
                elif (current[0] and not qos[0]) or (current[1] and not qos[1]):
                    self._subscribe(topic, types[0], qos, offered, again=True)
                elif offered != self.recorder.topics[topic].offered_qos:
                    self.recorder.add_topic(topic, self._msgtypes[topic], offered)

    def _subscribe(self, topic: str, msgtype: str, qos: tuple[bool, bool], offered: list[dict], again=False) -> None:
        try:
            self.recorder.add_topic(topic, msgtype, offered)
            self.ports.subscribe(topic, msgtype, *qos)
        except (RecordingError, ImportError, AttributeError, ValueError) as exc:
            self.log.error(f"cannot record {topic} ({msgtype}): {exc}")
            self.unrecordable.add(topic)
            return
        if topic == self.instruction_topic and msgtype != INSTRUCTION_TYPE:
            self.log.error(
                f"instruction_topic {topic} has type {msgtype}, not {INSTRUCTION_TYPE}: recorded, but episodes get "
                "no instruction from it"
            )
        self._msgtypes[topic], self.sub_qos[topic] = msgtype, qos
        if again:
            self.log.warning(f"a new publisher on {topic} needs other QoS: subscribed again ({_describe(qos)})")
        else:
            self.log.info(f"recording {topic} [{msgtype}] ({_describe(qos)})")

    def on_message(self, topic: str, data: bytes) -> None:
        self.last_raw[topic] = data
        if topic == self.instruction_topic and self._msgtypes.get(topic) == INSTRUCTION_TYPE:
            self.instruction = string_from_cdr(data)
        if self.record_always or self.recorder.current is not None:
            self.recorder.add(topic, self.ports.now_ns(), data)

    # -- episodes: each returns (success, message) for the Trigger services

    def _publish_event(self, event: str) -> None:
        episode = self.recorder.current or (self.recorder.episodes[-1] if self.recorder.episodes else None)
        if episode is not None:
            self.ports.publish_event(json.dumps({"event": event, **episode.as_dict()}))

    def start(self) -> tuple[bool, str]:
        try:
            now = self.ports.now_ns()
            episode = self.recorder.start_episode(self.instruction, now)
        except ValueError as exc:
            return False, str(exc)
        # The instruction was usually published before the start: record it at the start so the episode
        # carries its instruction inside the bag (an unstamped message; its bag time is the start).
        if not self.record_always and self.instruction_topic in self.last_raw:
            self.recorder.add(self.instruction_topic, now, self.last_raw[self.instruction_topic])
        self._publish_event("start")
        message = f"episode {episode.index} started: {episode.instruction!r}"
        if self.recorder.last_error:
            message += f" (warning: last write failed: {self.recorder.last_error})"
        return True, message

    def stop(self) -> tuple[bool, str]:
        """Ends the episode and writes it to disk before answering."""
        try:
            episode = self.recorder.stop_episode(self.ports.now_ns())
        except ValueError as exc:
            return False, str(exc)
        self._publish_event("stop")
        try:
            chunk = self.recorder.flush()
        except RecordingError as exc:
            self._report_error(exc)
            return False, f"episode {episode.index} stopped but NOT yet on disk (kept for retry): {exc}"
        return True, f"episode {episode.index} stopped and written ({chunk.name if chunk else 'no data'})"

    def mark(self, success: bool) -> tuple[bool, str]:
        try:
            episode = self.recorder.annotate(self.ports.now_ns(), success=success)
        except ValueError as exc:
            return False, str(exc)
        self._publish_event("annotate")
        return True, f"episode {episode.index} marked {'success' if success else 'failure'}"

    def note(self, text: str) -> None:
        try:
            self.recorder.annotate(self.ports.now_ns(), note=text)
        except ValueError as exc:
            self.log.warning(f"note dropped: {exc}")

    # -- disk

    def flush_if_due(self) -> None:
        """Write a chunk when one is due; after a write error, retry every ``retry_period_s``."""
        due = self.recorder.chunk_due()
        if self.recorder.last_error is not None:
            due = self.recorder.buffered_messages > 0 and self._clock() - self._last_attempt >= self.retry_period_s
        if not due:
            return
        self._last_attempt = self._clock()
        try:
            self.recorder.flush()
        except RecordingError as exc:
            self._report_error(exc)
            return
        if self._last_logged_error is not None:
            self.log.info("recording recovered: the buffered messages are on disk")
            self._last_logged_error = None

    def _report_error(self, exc: Exception) -> None:
        if str(exc) != self._last_logged_error:
            self.log.error(f"{exc} ({self.recorder.buffered_messages} messages kept in memory)")
            self._last_logged_error = str(exc)
        self.ports.publish_diagnostics()

    def status(self) -> tuple[int, str, dict[str, str]]:
        """(level OK | WARN | ERROR, message, key/values) for /diagnostics."""
        rec = self.recorder
        if rec.last_error:
            level, message = ERROR, rec.last_error
        elif rec.dropped:
            level, message = WARN, f"{rec.dropped} messages dropped (buffer full)"
        else:
            level, message = OK, "recording" if rec.current else "idle"
        with self._lock:
            subscribed = list(self.sub_qos)
            waiting = [t for t in self.wanted if t not in self.sub_qos and t not in self.unrecordable]
        values = {
            "bag": str(rec.bag.path) if rec.bag else "",
            "chunks": str(len(rec.bag.files) if rec.bag else 0),
            "episodes": str(len(rec.episodes)),
            "buffered_messages": str(rec.buffered_messages),
            "dropped_messages": str(rec.dropped),
            "subscribed": ",".join(subscribed),
            "waiting_for_publishers": ",".join(waiting),
        }
        return level, message, values

    def shutdown(self) -> None:
        """Stop a running episode and write what is buffered (a clean exit loses nothing). Idempotent."""
        try:
            self.recorder.close(self.ports.now_ns())
        except RecordingError as exc:
            self.log.error(f"could not write the last chunk at shutdown: {exc}")
