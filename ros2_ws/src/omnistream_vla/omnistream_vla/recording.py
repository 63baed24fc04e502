"""Crash-safe rosbag2 recording without rosbag2: the rclpy-free core of ``recorder_node``.

A bag is a normal rosbag2 directory (``metadata.yaml`` + MCAP files) that ``ros2 bag info``/``play`` open,
written with ``rosbags`` (see ``../shared/specs/ros2-from-pypi.md``). It is *split* into chunk files the way
``ros2 bag record --max-bag-duration`` splits, for one reason: a killed writer leaves closed files behind.

* Messages are buffered in memory and written one chunk at a time (every ``chunk_duration_s``, when the
  buffer passes ``chunk_max_bytes``, and at every episode stop). A chunk is written into a hidden
  ``.incoming/`` folder, closed, moved next to the others, and only then listed in ``metadata.yaml``
  (replaced atomically). So ``metadata.yaml`` lists only complete files: after a crash or SIGKILL every
  completed chunk reads back; what is lost is the buffer of the chunk in progress.
* A failed write (disk full, unwritable path, free space under ``min_free_bytes``) raises
  ``RecordingError`` with a message saying what to fix; the buffer is kept, so a retry (after freeing
  space or pointing the recorder elsewhere) writes everything that was recorded in between.

Each topic's QoS is the one its publishers offered (``offered_qos_profiles`` in the MCAP channels and in
``metadata.yaml``, as ``ros2 bag record`` stores it), so a replay publishes a latched topic latched again.

Message definitions and type hashes come from the ``rosbags`` type store (standard types) or, for other
packages' types (``omnistream_msgs``...), from the ``.msg`` files that every ROS 2 install puts under
``share/<package>/msg`` on ``AMENT_PREFIX_PATH``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BAG_VERSION = 8  # rosbag2 metadata version that Jazzy and Kilted both read
EPISODE_EVENTS_TYPE = "std_msgs/msg/String"
EPISODES_SIDE_FILE = "episodes.json"


class RecordingError(RuntimeError):
    """Recording cannot write (disk full, unwritable path, ...). The recorder keeps its buffer for a retry."""


@functools.cache
def _typestore():
    """The rosbags type store of the standard types (building one takes ~50 ms: once per process)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def string_cdr(text: str) -> bytes:
    """A std_msgs/String serialized as on the wire (CDR), e.g. an episode event."""
    typestore = _typestore()
    String = typestore.types[EPISODE_EVENTS_TYPE]
    return bytes(typestore.serialize_cdr(String(data=text), EPISODE_EVENTS_TYPE))


def string_from_cdr(data: bytes) -> str:
    """The text of a serialized std_msgs/String (e.g. the instruction topic's last message)."""
    return _typestore().deserialize_cdr(data, EPISODE_EVENTS_TYPE).data


# ----------------------------------------------------------------------------------------------- QoS

_INFINITE_NS = 2**63 - 1


def qos_profile_dict(
    history: int,
    depth: int,
    reliability: int,
    durability: int,
    deadline_ns: int = _INFINITE_NS,
    lifespan_ns: int = _INFINITE_NS,
    liveliness: int = 1,
    liveliness_lease_duration_ns: int = _INFINITE_NS,
    avoid_ros_namespace_conventions: bool = False,
) -> dict[str, Any]:
    """One offered QoS profile as rosbag2 stores it (rmw enum values; durations as sec/nsec, infinite as
    RMW_DURATION_INFINITE = 9223372036 s 854775807 ns)."""

    def duration(ns: int) -> dict[str, int]:
        ns = min(int(ns), _INFINITE_NS)
        return {"sec": ns // 1_000_000_000, "nsec": ns % 1_000_000_000}

    return {
        "history": int(history),
        "depth": int(depth),
        "reliability": int(reliability),
        "durability": int(durability),
        "deadline": duration(deadline_ns),
        "lifespan": duration(lifespan_ns),
        "liveliness": int(liveliness),
        "liveliness_lease_duration": duration(liveliness_lease_duration_ns),
        "avoid_ros_namespace_conventions": bool(avoid_ros_namespace_conventions),
    }


# ----------------------------------------------------------------------------------------------- types


class TypeRegistry:
    """Message definitions (``msgdef``) and RIHS01 hashes for any ROS 2 message type name."""

    def __init__(self, share_dirs: Iterable[Path] | None = None):
        from rosbags.typesys import Stores, get_typestore

        self.typestore = get_typestore(Stores.ROS2_KILTED)
        if share_dirs is None:
            prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
            share_dirs = [Path(p) / "share" for p in prefixes]
        self.share_dirs = [Path(d) for d in share_dirs]
        self._lock = threading.Lock()

    def _msg_file(self, msgtype: str) -> Path | None:
        package, _, name = msgtype.split("/")
        for share in self.share_dirs:
            candidate = share / package / "msg" / f"{name}.msg"
            if candidate.is_file():
                return candidate
        return None

    def _register(self, msgtype: str, seen: set[str]) -> None:
        from rosbags.typesys import get_types_from_msg

        if msgtype in self.typestore.fielddefs or msgtype in seen:
            return
        seen.add(msgtype)
        path = self._msg_file(msgtype)
        if path is None:
            raise RecordingError(
                f"no definition for message type {msgtype!r}: not a standard type and no share/"
                f"{msgtype.split('/')[0]}/msg/{msgtype.split('/')[-1]}.msg on AMENT_PREFIX_PATH"
            )
        types = get_types_from_msg(path.read_text(), msgtype)
        # Register dependencies first (their names appear as field types in the parse tree).
        for _, fields in types.values():
            for _, desc in fields:
                for ref in _referenced_types(desc):
                    self._register(ref, seen)
        self.typestore.register(types)

    def definition(self, msgtype: str) -> tuple[str, str]:
        """(msgdef, rihs01) of ``msgtype`` ('pkg/msg/Name'); RecordingError when it cannot be found."""
        msgtype = normalize_type_name(msgtype)
        with self._lock:
            self._register(msgtype, set())
            msgdef, _ = self.typestore.generate_msgdef(msgtype, ros_version=2)
            return msgdef, self.typestore.hash_rihs01(msgtype)


def _referenced_types(spec: Any) -> list[str]:
    """Type names referenced by a rosbags field spec (nested tuples of (kind, payload))."""
    if isinstance(spec, str):
        return [spec] if spec.count("/") == 2 else []
    out: list[str] = []
    if isinstance(spec, (tuple, list)):
        for part in spec:
            out.extend(_referenced_types(part))
    return out


def normalize_type_name(msgtype: str) -> str:
    """'std_msgs/String' -> 'std_msgs/msg/String'; 'std_msgs/msg/String' unchanged."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        return f"{parts[0]}/msg/{parts[1]}"
    if len(parts) == 3 and all(parts):
        return msgtype
    raise ValueError(f"not a ROS 2 message type name: {msgtype!r} (expected 'package/msg/Name')")


# ----------------------------------------------------------------------------------------------- chunked bag


@dataclass
class BufferedMessage:
    topic: str
    timestamp_ns: int
    data: bytes


@dataclass
class TopicInfo:
    topic: str
    msgtype: str
    msgdef: str
    rihs01: str
    offered_qos: list[dict[str, Any]] = field(default_factory=list)  # qos_profile_dict() of each publisher

    def rosbags_qos(self) -> list[Any]:
        from rosbags.rosbag2.metadata import parse_qos

        return parse_qos(self.offered_qos)

    def qos_yaml(self) -> str:
        """``offered_qos_profiles`` of a version-8 metadata.yaml (a YAML string, as rosbag2 writes it)."""
        from rosbags.rosbag2.metadata import dump_qos_v8

        return dump_qos_v8(self.rosbags_qos())


def check_writable(directory: Path, min_free_bytes: int) -> None:
    """RecordingError naming the problem when ``directory`` cannot take a chunk."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RecordingError(f"cannot record to {directory}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RecordingError(f"cannot record to {directory}: {probe} is not writable (check permissions)")
    free = shutil.disk_usage(probe).free
    if free < min_free_bytes:
        raise RecordingError(
            f"disk full: {free / 1e6:.1f} MB free at {probe}, the recorder needs at least "
            f"{min_free_bytes / 1e6:.1f} MB (free space or set min_free_mb / output_dir)"
        )


class ChunkedBag:
    """A rosbag2 directory written one closed MCAP chunk at a time; ``metadata.yaml`` lists closed chunks only."""

    def __init__(self, path: Path, min_free_bytes: int = 0):
        self.path = Path(path)
        self.min_free_bytes = int(min_free_bytes)
        self.files: list[dict[str, Any]] = []
        self.topic_counts: dict[str, int] = {}
        self.topics: dict[str, TopicInfo] = {}
        self.custom_data: dict[str, str] = {}
        self.start_ns: int | None = None
        self.end_ns = 0

    @property
    def incoming(self) -> Path:
        return self.path / ".incoming"

    def write_chunk(self, messages: list[BufferedMessage], topics: dict[str, TopicInfo]) -> Path:
        """Write ``messages`` as the next chunk file and list it in metadata.yaml. Raises RecordingError."""
        from rosbags.rosbag2 import StoragePlugin, Writer

        if not messages:
            raise ValueError("write_chunk needs at least one message")
        check_writable(self.path, self.min_free_bytes)
        name = f"{self.path.name}_{len(self.files)}"
        staging = self.incoming / name
        try:
            self.incoming.mkdir(parents=True, exist_ok=True)
            if staging.exists():  # left by an earlier failed attempt
                shutil.rmtree(staging)
            writer = Writer(staging, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
            writer.open()
            connections = {}
            for topic in sorted({m.topic for m in messages} | set(self.topics)):
                info = topics.get(topic) or self.topics[topic]
                connections[topic] = writer.add_connection(
                    topic, info.msgtype, msgdef=info.msgdef, rihs01=info.rihs01, offered_qos_profiles=info.rosbags_qos()
                )
            for msg in sorted(messages, key=lambda m: m.timestamp_ns):
                writer.write(connections[msg.topic], msg.timestamp_ns, msg.data)
            writer.close()
            final = self.path / f"{name}.mcap"
            os.replace(staging / f"{name}.mcap", final)
            shutil.rmtree(staging, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            reason = "disk full" if exc.errno == 28 else "cannot write"
            raise RecordingError(f"{reason}: writing chunk {name} under {self.path} failed: {exc}") from exc
        except Exception as exc:  # rosbags raises its own WriterError for e.g. an existing path
            shutil.rmtree(staging, ignore_errors=True)
            raise RecordingError(f"writing chunk {name} under {self.path} failed: {exc}") from exc

        stamps = [m.timestamp_ns for m in messages]
        start, end = min(stamps), max(stamps)
        self.files.append(
            {
                "path": final.name,
                "starting_time": {"nanoseconds_since_epoch": start},
                "duration": {"nanoseconds": end - start},
                "message_count": len(messages),
            }
        )
        for topic in connections:
            self.topics[topic] = topics.get(topic) or self.topics[topic]  # the latest offered QoS
            self.topic_counts[topic] = self.topic_counts.get(topic, 0)
        for msg in messages:
            self.topic_counts[msg.topic] += 1
        self.start_ns = start if self.start_ns is None else min(self.start_ns, start)
        self.end_ns = max(self.end_ns, end)
        self.write_metadata()
        return final

    def write_metadata(self) -> None:
        """Replace metadata.yaml atomically (a reader never sees a half-written one)."""
        if not self.files:
            return
        info = {
            "version": BAG_VERSION,
            "storage_identifier": "mcap",
            "relative_file_paths": [f["path"] for f in self.files],
            "duration": {"nanoseconds": self.end_ns - (self.start_ns or 0)},
            "starting_time": {"nanoseconds_since_epoch": self.start_ns or 0},
            "message_count": sum(f["message_count"] for f in self.files),
            "topics_with_message_count": [
                {
                    "topic_metadata": {
                        "name": t.topic,
                        "type": t.msgtype,
                        "serialization_format": "cdr",
                        "offered_qos_profiles": t.qos_yaml(),
                        "type_description_hash": t.rihs01,
                    },
                    "message_count": self.topic_counts.get(t.topic, 0),
                }
                for t in self.topics.values()
            ],
            "compression_format": "",
            "compression_mode": "",
            "files": self.files,
            "custom_data": dict(self.custom_data) or None,
            "ros_distro": "kilted",
        }
        tmp = self.path / "metadata.yaml.tmp"
        try:
            tmp.write_text(yaml.safe_dump({"rosbag2_bagfile_information": info}, sort_keys=False))
            os.replace(tmp, self.path / "metadata.yaml")
        except OSError as exc:
            raise RecordingError(f"cannot write {self.path / 'metadata.yaml'}: {exc}") from exc


# ----------------------------------------------------------------------------------------------- recorder


@dataclass
class Episode:
    index: int
    instruction: str
    start_ns: int
    stop_ns: int | None = None
    success: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "episode_index": self.index,
            "instruction": self.instruction,
            "start_ns": self.start_ns,
            "stop_ns": self.stop_ns,
            "success": self.success,
            "notes": self.notes,
        }


class BagRecorder:
    """Buffers serialized messages and writes them as chunks of a bag; episodes as events + metadata.

    Thread-safe: ``add`` is called from subscription callbacks, ``flush`` from a timer or a service.
    A bag is opened (its directory created) at the first successful flush, under ``output_dir``.
    """

    def __init__(
        self,
        output_dir: Path,
        bag_name: str | None = None,
        chunk_duration_s: float = 5.0,
        chunk_max_bytes: int = 256 * 1024 * 1024,
        max_buffer_bytes: int = 2 * 1024 * 1024 * 1024,
        min_free_bytes: int = 64 * 1024 * 1024,
        events_topic: str = "/recorder/episode_events",
        registry: TypeRegistry | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.bag_name = bag_name
        self.chunk_duration_s = chunk_duration_s
        self.chunk_max_bytes = chunk_max_bytes
        self.max_buffer_bytes = max_buffer_bytes
        self.min_free_bytes = min_free_bytes
        self.events_topic = events_topic
        self.registry = registry or TypeRegistry()
        self.topics: dict[str, TopicInfo] = {}
        self.bag: ChunkedBag | None = None
        self.episodes: list[Episode] = []
        self.current: Episode | None = None
        self.last_error: str | None = None
        self.dropped = 0
        self._buffer: list[BufferedMessage] = []
        self._buffer_bytes = 0
        self._buffer_since = time.monotonic()
        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()
        # As the recorder node publishes them: keep-last 10, reliable, volatile.
        self.add_topic(events_topic, EPISODE_EVENTS_TYPE, [qos_profile_dict(1, 10, 1, 2)])

    # -- topics and messages

    def add_topic(self, topic: str, msgtype: str, offered_qos: list[dict[str, Any]] | None = None) -> TopicInfo:
        """Register (or update the offered QoS of) a topic; ``offered_qos`` as :func:`qos_profile_dict` gives."""
        msgtype = normalize_type_name(msgtype)
        msgdef, rihs01 = self.registry.definition(msgtype)
        info = TopicInfo(topic, msgtype, msgdef, rihs01, list(offered_qos or []))
        with self._lock:
            self.topics[topic] = info
        return info

    def add(self, topic: str, timestamp_ns: int, data: bytes) -> None:
        if topic not in self.topics:
            raise ValueError(f"topic {topic!r} was not added (add_topic first)")
        with self._lock:
            if not self._buffer:
                self._buffer_since = time.monotonic()
            self._buffer.append(BufferedMessage(topic, int(timestamp_ns), bytes(data)))
            self._buffer_bytes += len(data)
            # Bounded memory while the disk is failing: drop the oldest, count it, report it.
            while self._buffer_bytes > self.max_buffer_bytes and len(self._buffer) > 1:
                old = self._buffer.pop(0)
                self._buffer_bytes -= len(old.data)
                self.dropped += 1

    @property
    def buffered_messages(self) -> int:
        return len(self._buffer)

    def chunk_due(self) -> bool:
        with self._lock:
            if not self._buffer:
                return False
            return (
                self._buffer_bytes >= self.chunk_max_bytes
                or time.monotonic() - self._buffer_since >= self.chunk_duration_s
            )

    # -- episodes

    def _event(self, event: str, timestamp_ns: int) -> None:
        episode = self.current or (self.episodes[-1] if self.episodes else None)
        payload = {"event": event, **(episode.as_dict() if episode else {})}
        self.add(self.events_topic, timestamp_ns, string_cdr(json.dumps(payload)))

    def start_episode(self, instruction: str, timestamp_ns: int) -> Episode:
        with self._lock:
            if self.current is not None:
                raise ValueError(f"episode {self.current.index} is already running; stop it first")
            self.current = Episode(len(self.episodes), instruction, timestamp_ns)
            self.episodes.append(self.current)
            self._event("start", timestamp_ns)
            return self.current

    def stop_episode(self, timestamp_ns: int) -> Episode:
        with self._lock:
            if self.current is None:
                raise ValueError("no episode is running; start one first")
            episode, episode.stop_ns = self.current, timestamp_ns
            self._event("stop", timestamp_ns)
            self.current = None
            return episode

    def annotate(self, timestamp_ns: int, success: bool | None = None, note: str | None = None) -> Episode:
        """Mark the running episode (or, between episodes, the last one) successful/failed or add a note."""
        with self._lock:
            episode = self.current or (self.episodes[-1] if self.episodes else None)
            if episode is None:
                raise ValueError("no episode to annotate yet")
            if success is not None:
                episode.success = success
            if note:
                episode.notes.append(note)
            self._event("annotate", timestamp_ns)
            return episode

    # -- disk

    def _open_bag(self) -> ChunkedBag:
        check_writable(self.output_dir, self.min_free_bytes)
        name = self.bag_name or time.strftime("rosbag2_%Y_%m_%d-%H_%M_%S")
        path = self.output_dir / name
        suffix = 1
        while path.exists():
            path = self.output_dir / f"{name}_{suffix}"
            suffix += 1
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise RecordingError(f"cannot create the bag directory {path}: {exc}") from exc
        return ChunkedBag(path, self.min_free_bytes)

    def set_output_dir(self, output_dir: Path) -> None:
        """Record elsewhere from the next chunk on (a new bag there); the buffer is kept."""
        with self._lock:
            if Path(output_dir) != self.output_dir:
                self.output_dir = Path(output_dir)
                self.bag = None

    def flush(self) -> Path | None:
        """Write the buffer as one chunk. Returns the chunk file, None when empty; RecordingError keeps it."""
        with self._flush_lock:
            with self._lock:
                messages, self._buffer, self._buffer_bytes = self._buffer, [], 0
            if not messages:
                return None
            try:
                if self.bag is None:
                    self.bag = self._open_bag()
                self.bag.min_free_bytes = self.min_free_bytes
                self.bag.custom_data["omnistream.episodes"] = json.dumps([e.as_dict() for e in self.episodes])
                chunk = self.bag.write_chunk(messages, dict(self.topics))
                self._write_side_file()
            except RecordingError as exc:
                with self._lock:  # put them back in front of what arrived meanwhile
                    self._buffer = messages + self._buffer
                    self._buffer_bytes = sum(len(m.data) for m in self._buffer)
                self.last_error = str(exc)
                raise
            self.last_error = None
            return chunk

    def close(self, timestamp_ns: int) -> Path | None:
        """Stop the running episode (if any) and write the buffer. Safe to call more than once and from any
        thread: a second call finds nothing to stop and nothing buffered. RecordingError keeps the buffer."""
        with self._lock:
            if self.current is not None:
                self.stop_episode(timestamp_ns)
        return self.flush()

    def _write_side_file(self) -> None:
        assert self.bag is not None
        tmp = self.bag.path / f"{EPISODES_SIDE_FILE}.tmp"
        tmp.write_text(json.dumps([e.as_dict() for e in self.episodes], indent=2))
        os.replace(tmp, self.bag.path / EPISODES_SIDE_FILE)


def read_episode_events(bag_path: Path, events_topic: str | None = None) -> list[dict[str, Any]]:
    """Episodes of a bag from its events topic (the last event of each episode wins), oldest first."""
    from rosbags.highlevel import AnyReader

    episodes: dict[int, dict[str, Any]] = {}
    with AnyReader([Path(bag_path)]) as reader:
        conns = [
            c
            for c in reader.connections
            if (c.topic == events_topic if events_topic else c.topic.endswith("episode_events"))
            and c.msgtype == EPISODE_EVENTS_TYPE
        ]
        for conn, _, raw in reader.messages(connections=conns):
            payload = json.loads(reader.deserialize(raw, conn.msgtype).data)
            if "episode_index" in payload:
                episodes[int(payload["episode_index"])] = payload
    return [episodes[k] for k in sorted(episodes)]
