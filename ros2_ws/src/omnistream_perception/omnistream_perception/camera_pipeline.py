"""What perception_node does with a camera's frames, rclpy-free (the node keeps parameters, topics and timers).

* :class:`LatestFrameWorker`: one thread runs the model; a frame that arrives while it is busy supersedes the
  one waiting (the newest frame wins, no backlog); stopping waits for the frame in flight only.
* :class:`CameraPipeline`: one camera's stream: frames stamped too far in the future are dropped, time going
  backwards (a looping bag) or a resolution change restarts the stream, outputs nobody listens to are not
  computed, the path is bounded, a restart asked while a frame is in flight is applied before the next one; its
  :class:`~omnistream_perception.depth_units.StreamGeometry` makes the published depth, points and pose what they
  claim to be (metres or scale-free, NaN where invalid, the first camera frame as the world, the CameraInfo's lens).
* :class:`ArrivalCounter`: frames received vs expected from the header stamps (the transport's losses).
* transport checks: the image subscription's reliability follows the camera publisher's, and a best-effort
  publisher whose frames go missing gets one clear notice of what to change.
* :class:`LogThrottle`: one line per kind of event per interval, with the count of the lines held back.
* :class:`CameraStream`: a pipeline with the node's handles for it (publishers, subscriptions, counters).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .depth_units import FrameGeometry, StreamGeometry, UnitsConfig
from .transport import best_effort_advice

# A pause longer than this between two stamps is the camera (or bag) pausing, not frames lost on the way.
STAMP_GAP_S = 2.0
# A best-effort publisher this long matched without a single frame arriving: its frames are lost on the way.
SILENT_PUBLISHER_S = 3.0
# Received / expected below this (after MIN_EXPECTED frames) is reported as transport loss.
LOSS_REPORT_RATIO = 0.95
MIN_EXPECTED = 10


class ArrivalCounter:
    """Frames received vs expected: the larger of two lower bounds. From header stamps: the camera period is the
    typical gap between two consecutive arrivals, and a gap of k periods means k - 1 frames lost (when most
    frames are lost, the smallest gap seen may itself span several periods). From the middleware: the samples
    it reports lost (gaps in the publisher's sequence numbers, ``add_lost``)."""

    def __init__(self, history: int = 200, gap_s: float = STAMP_GAP_S) -> None:
        self.received = 0
        self.lost = 0  # reported by the middleware
        self._gap_s = gap_s
        self._deltas: deque[float] = deque()
        self._history = history
        self._settled = 0  # expected frames of the deltas that left the history (and sequence starts)
        self._last_ns: int | None = None

    def add(self, stamp_ns: int) -> None:
        self.received += 1
        if self._last_ns is None or stamp_ns < self._last_ns:
            self._settled += 1  # the first frame of a sequence (start, restart, looping bag)
        elif stamp_ns > self._last_ns:
            self._deltas.append((stamp_ns - self._last_ns) / 1e9)
            if len(self._deltas) > self._history:
                self._settled += self._frames(self._deltas.popleft(), self.period_s)
        self._last_ns = stamp_ns

    def add_lost(self, count: int) -> None:
        self.lost += max(0, int(count))

    def new_sequence(self) -> None:
        """The next stamp starts a new sequence (the stream restarted)."""
        self._last_ns = None

    @property
    def period_s(self) -> float | None:
        if not self._deltas:
            return None
        shortest = min(self._deltas)
        return statistics.median(d for d in self._deltas if d <= 1.5 * shortest)

    @property
    def expected(self) -> int:
        period = self.period_s
        from_stamps = self._settled + sum(self._frames(d, period) for d in self._deltas)
        return max(self.received + self.lost, from_stamps)

    def _frames(self, delta_s: float, period_s: float | None) -> int:
        if period_s is None or period_s <= 0 or delta_s > self._gap_s:
            return 1
        return max(1, round(delta_s / period_s))


class LogThrottle:
    """At most one line per key every ``interval_s``; ``allow`` returns (log it?, lines held back before it)."""

    def __init__(self, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self._clock = interval_s, clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> tuple[bool, int]:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return False, 0
            self._last[key] = now
            return True, self._held.pop(key, 0)


# Output key -> the node parameter that switches it on (depth_info goes with depth).
OUTPUT_SWITCHES = {
    "features": "publish_features",
    "depth": "publish_depth",
    "depth_info": "publish_depth",
    "pose": "publish_pose",
    "path": "publish_path",
    "points": "publish_points",
}


@dataclass(frozen=True)
class Wanted:
    """Which outputs of one frame have a listener (publishing enabled and at least one subscriber)."""

    features: bool = False
    depth: bool = False
    pose: bool = False
    path: bool = False
    points: bool = False

    @classmethod
    def from_listened(cls, listened: Mapping[str, bool]) -> Wanted:
        """``listened``: output key (features, depth, depth_info, pose, path, points) -> has a listener."""
        return cls(
            features=listened.get("features", False),
            depth=listened.get("depth", False) or listened.get("depth_info", False),
            pose=listened.get("pose", False),
            path=listened.get("path", False),
            points=listened.get("points", False),
        )

    def any(self) -> bool:
        return self.features or self.depth or self.pose or self.path or self.points

    @property
    def model_depth(self) -> bool:
        return self.depth or self.points

    @property
    def model_pose(self) -> bool:
        return self.pose or self.path or self.points


class CameraPipeline:
    """One camera: its perception session, stamp and size checks, restarts, path and transport state.

    ``check_arrival`` runs in the subscription callback; ``run`` in the worker with ``lock`` held (a restart
    takes the same lock, so it never lands in the middle of a frame)."""

    def __init__(
        self,
        name: str,
        session: Any,
        topic: str = "image",
        reset_on_time_jump: bool = True,
        max_stamp_ahead_s: float = 10.0,
        max_path_length: int = 2000,
        clock: Callable[[], float] = time.monotonic,
        units: UnitsConfig | None = None,
    ) -> None:
        self.name, self.session, self.topic = name, session, topic
        self.reset_on_time_jump = reset_on_time_jump
        self.max_stamp_ahead_s = max_stamp_ahead_s
        self.max_path_length = max_path_length
        self.lock = threading.Lock()
        self.arrivals = ArrivalCounter()
        self.last_stamp_ns: int | None = None
        self.input_size: tuple[int, int] | None = None
        self.path: list[Any] = []
        self.restarts = 0
        self.idle_skipped = 0
        self.image_bytes: int | None = None
        self._restart_requested = False
        self._clock = clock
        self._best_effort_since: float | None = None
        self._baseline = (0, 0)  # (received, expected) when a best-effort publisher appeared
        self.publisher_reliability: str | None = None
        self.subscription_reliability: str | None = None
        self.advice: str | None = None  # the transport notice, once given
        self.geometry = StreamGeometry(units)

    # -- arrival (subscription callback) -------------------------------------------------------------------------
    def check_arrival(self, stamp_ns: int, now_ns: int, nbytes: int | None = None) -> str | None:
        """Counts an arriving frame; returns why it must be dropped (stamped too far ahead), or None."""
        ahead_s = (stamp_ns - now_ns) / 1e9
        if self.max_stamp_ahead_s > 0 and now_ns > 0 and ahead_s > self.max_stamp_ahead_s:
            return (
                f"frame stamped {ahead_s:.1f} s ahead of this node's clock (more than max_stamp_ahead = "
                f"{self.max_stamp_ahead_s:g} s): dropped; check the camera's clock or time source"
            )
        self.arrivals.add(stamp_ns)
        if nbytes is not None:
            self.image_bytes = nbytes
        return None

    # -- processing (worker, lock held) --------------------------------------------------------------------------
    def prepare(self, stamp_ns: int, size: tuple[int, int]) -> list[str]:
        """Restarts the stream when needed before this frame; returns the reasons (one line each)."""
        reasons = []
        if self._restart_requested:
            self._restart_requested = False
            self.restart()
        if self.last_stamp_ns is not None and stamp_ns < self.last_stamp_ns and self.reset_on_time_jump:
            reasons.append("image time went backwards (looping bag?): restarting the stream")
        if self.input_size is not None and self.input_size != tuple(size):
            old, new = self.input_size, size
            reasons.append(f"resolution changed from {old[1]}x{old[0]} to {new[1]}x{new[0]}: restarting the stream")
        if reasons:
            self.restart()
        self.last_stamp_ns, self.input_size = stamp_ns, tuple(size)
        return reasons

    def run(self, rgb, wanted: Wanted):
        """The session's result for this frame (call ``prepare`` first, ``finish`` after: points are made there,
        from the valid depth and the camera's lens). The camera head (a small MLP) also runs for the first frame of
        a stream (its pose is the world frame) and with depth (its intrinsics go out with the depth when the camera
        has no CameraInfo); ``depth_topic`` units need the model's depth for the scale whenever the pose goes out."""
        geometry = self.geometry
        return self.session.process(
            rgb,
            want_depth=wanted.model_depth or geometry.needs_depth(wanted.model_pose),
            want_pose=wanted.model_pose or wanted.depth or geometry.needs_anchor,
            want_points=False,
        )

    def finish(self, result, camera_info: Any, size: tuple[int, int], stamp_ns: int) -> FrameGeometry:
        """The published depth, pose and camera of ``run``'s result for an image of ``size`` (H, W); ``camera_info``:
        the camera's latest CameraInfo (used when it fits the image), or None."""
        return self.geometry.finish(result, camera_info, size, stamp_ns)

    def add_pose(self, pose: Any) -> list[Any]:
        """Appends to the bounded path and returns it."""
        self.path.append(pose)
        del self.path[: max(0, len(self.path) - self.max_path_length)]
        return self.path

    def restart(self) -> None:
        """Resets the model stream and everything tied to it (call with ``lock`` held)."""
        self.session.reset()
        self.last_stamp_ns = None
        self.input_size = None
        self.path = []
        self.restarts += 1
        self.arrivals.new_sequence()
        self.geometry.reset()

    def request_restart(self) -> bool:
        """Restarts now when no frame is in flight (True), else before the next frame (False). Never blocks."""
        if self.lock.acquire(blocking=False):
            try:
                self._restart_requested = False
                self.restart()
            finally:
                self.lock.release()
            return True
        self._restart_requested = True
        return False

    # -- transport -----------------------------------------------------------------------------------------------
    def observe_publishers(self, reliabilities: Sequence[str], subscription: str) -> None:
        """The reliabilities of the camera's publishers (from the ROS graph) and of our image subscription."""
        best_effort = "best_effort" in reliabilities
        if reliabilities:  # the last one seen stays on /diagnostics after the camera has gone
            self.publisher_reliability = "best_effort" if best_effort else "reliable"
        self.subscription_reliability = subscription
        if reliabilities and not best_effort:
            self._best_effort_since = None
        elif best_effort and self._best_effort_since is None:  # counted from here on (kept while it is away)
            self._best_effort_since = self._clock()
            self._baseline = (self.arrivals.received, self.arrivals.expected)

    def transport_notice(self) -> str | None:
        """Once per camera: what to change when a best-effort publisher's frames go missing."""
        if self.advice is not None or self._best_effort_since is None:
            return None
        if self.subscription_reliability == "reliable":
            self.advice = (
                f"the publisher of {self.topic} is best-effort and does not match our reliable subscription: set "
                "image_reliability to auto or best_effort, or the camera driver's QoS reliability to reliable"
            )
            return self.advice
        received = self.arrivals.received - self._baseline[0]
        expected = self.arrivals.expected - self._baseline[1]
        silent = received == 0 and self._clock() - self._best_effort_since >= SILENT_PUBLISHER_S
        lossy = expected >= MIN_EXPECTED and received < LOSS_REPORT_RATIO * expected
        if not (silent or lossy):
            return None
        self.advice = best_effort_advice(self.topic, self.image_bytes, received, expected if received else None)
        return self.advice

    def frame_values(self, result) -> dict[str, Any]:
        """What /diagnostics shows about the last processed frame: its index, the cache, the step's timings."""
        values = {
            "frame_index": result.frame_index,
            "cache_frames": self.session.cached_frames,
            "cache_mb": f"{self.session.cache_bytes / 2**20:.1f}",
        }
        return values | {key: f"{ms:.2f}" for key, ms in result.timings.items()}

    def diagnostics_values(self) -> dict[str, Any]:
        received, expected = self.arrivals.received, self.arrivals.expected
        period = self.arrivals.period_s
        return {
            "frames_received": received,
            "frames_expected": expected,
            "frames_lost_in_transport": expected - received,
            "camera_period_ms": f"{period * 1e3:.1f}" if period else "",
            "publisher_reliability": self.publisher_reliability or "",
            "subscription_reliability": self.subscription_reliability or "",
            "stream_restarts": self.restarts,
            "idle_skipped": self.idle_skipped,
        } | self.geometry.diagnostics_values()


@dataclass
class CameraStream:
    """One camera in the node: its pipeline, counters (``StreamStats``), publishers, image subscriptions and latest
    CameraInfo (the node's handles, opaque here)."""

    name: str
    pipeline: CameraPipeline
    stats: Any
    world_frame_id: str
    inputs: str
    publishers: dict[str, Any] = field(default_factory=dict)
    subscriptions: dict[str, tuple[Any, str]] = field(default_factory=dict)  # key -> (subscription, reliability)
    camera_info: Any = None

    @property
    def session(self):
        return self.pipeline.session


def subscription_reliability(publishers: Sequence[str], current: str) -> str:
    """The image subscription's reliability that receives every publisher: reliable unless one of them is
    best-effort (a reliable subscription does not match a best-effort publisher); ``current`` while none."""
    if not publishers:
        return current
    return "best_effort" if "best_effort" in publishers else "reliable"


class LatestFrameWorker:
    """One worker thread for all cameras: ``put(key, item)`` stores the newest item of a key (superseding one
    still waiting), the thread calls ``process(key, item)``. ``stop()`` waits for the item in flight only."""

    def __init__(self, process: Callable[[str, Any], None], name: str = "worker") -> None:
        self._process = process
        self._cond = threading.Condition()
        self._pending: dict[str, Any] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, key: str, item: Any) -> bool:
        """Stores ``item`` as the next for ``key``; True when it superseded an unprocessed one."""
        with self._cond:
            superseded = key in self._pending
            self._pending[key] = item
            self._cond.notify()
        return superseded

    def discard(self, key: str) -> None:
        with self._cond:
            self._pending.pop(key, None)

    def stop(self, timeout: float | None = None) -> bool:
        """Asks the thread to end after the item in flight; True when it has ended within ``timeout``."""
        with self._cond:
            self._stopping = True
            self._pending.clear()
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._pending:
                    self._cond.wait()
                if self._stopping:
                    return
                jobs = list(self._pending.items())
                self._pending.clear()
            for key, item in jobs:
                with self._cond:
                    if self._stopping:
                        return
                self._process(key, item)


def restart_streams(cameras: Sequence[CameraStream], worker: LatestFrameWorker | None) -> str:
    """``~/reset``: restarts every camera's stream (now, or before its next frame when one is in flight: never
    blocks) and drops the frames waiting for the worker; returns the answer."""
    deferred = [cam.name for cam in cameras if not cam.pipeline.request_restart()]
    for cam in cameras:
        if worker is not None:
            worker.discard(cam.name)
    answer = f"restarted {len(cameras)} stream(s)"
    return answer + (f" ({', '.join(deferred)}: after the frame in flight)" if deferred else "")
