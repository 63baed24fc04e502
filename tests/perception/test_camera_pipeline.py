"""The camera pipeline controller without ROS: stamp checks, restarts, output gating, the bounded path, received vs
expected frames, transport notices, log throttling, the newest-frame worker, the node's parameter rules, and
memory that stays flat at the node's default settings."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from omnistream_perception.camera_pipeline import (
    SILENT_PUBLISHER_S,
    ArrivalCounter,
    CameraPipeline,
    LatestFrameWorker,
    LogThrottle,
    Wanted,
    subscription_reliability,
)
from omnistream_perception.perception import PerceptionConfig, PerceptionSession
from omnistream_perception.ros.perception_parameters import PARAMETERS, validate_parameter

SEC = 1_000_000_000
NOW = 1_700_000_000 * SEC  # the node's clock in these tests


class FakeClock:
    """A settable monotonic clock (seconds)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def node_default_config(checkpoint) -> PerceptionConfig:
    return PerceptionConfig.from_node_parameters(
        {name: spec.default for name, spec in PARAMETERS.items()} | {"checkpoint": str(checkpoint)}
    )


@pytest.fixture
def session(fixture_a):
    return PerceptionSession.from_config(node_default_config(fixture_a))


def frame(h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- received vs expected -------------------------------------------------------------------------------------------
def test_arrival_counter_counts_lost_frames_from_stamps():
    counter = ArrivalCounter()
    period = SEC // 15
    kept = [i for i in range(45) if i % 3 != 1]  # a third lost on the way
    for i in kept:
        counter.add(NOW + i * period)
    assert counter.received == 30
    assert counter.expected == 45
    assert counter.period_s == pytest.approx(1 / 15)


def test_arrival_counter_takes_the_middlewares_lost_samples_when_stamps_cannot_tell():
    counter = ArrivalCounter()
    for i in range(0, 45, 3):  # every third frame arrives, evenly: the stamps alone look like a 5 Hz camera
        counter.add(NOW + i * SEC // 15)
    assert counter.expected == 15
    counter.add_lost(28)  # the middleware saw the sequence-number gaps
    assert counter.received == 15 and counter.expected == 43


def test_arrival_counter_restarts_pauses_and_duplicates_are_not_losses():
    counter = ArrivalCounter()
    for i in range(10):
        counter.add(NOW + i * SEC // 10)
    counter.add(NOW + 60 * SEC)  # the camera paused for a minute: not 590 frames lost
    counter.add(NOW + 60 * SEC)  # the same frame twice
    counter.new_sequence()
    for i in range(5):
        counter.add(NOW - SEC + i * SEC // 10)  # a looping bag starts again
    assert counter.received == 17 and counter.expected == 17


def test_arrival_counter_memory_is_bounded():
    counter = ArrivalCounter(history=50)
    for i in range(10_000):
        counter.add(NOW + i * SEC // 30 + (SEC // 30 if i % 10 == 0 else 0) * (i // 10))
    assert len(counter._deltas) == 50 and counter.received == 10_000
    assert counter.expected > 10_000


# -- stamps and restarts --------------------------------------------------------------------------------------------
def test_a_frame_stamped_years_ahead_is_dropped_and_the_next_normal_one_is_no_looping_bag(session):
    pipeline = CameraPipeline("cam", session, max_stamp_ahead_s=10.0)
    assert pipeline.check_arrival(NOW, NOW) is None
    assert pipeline.prepare(NOW, (32, 48)) == []
    ten_years = NOW + 10 * 365 * 86400 * SEC
    reason = pipeline.check_arrival(ten_years, NOW + SEC // 10)
    assert reason is not None and "ahead" in reason and "max_stamp_ahead" in reason
    assert pipeline.check_arrival(NOW + SEC // 5, NOW + SEC // 5) is None
    assert pipeline.prepare(NOW + SEC // 5, (32, 48)) == []  # no "time went backwards"
    assert pipeline.restarts == 0 and pipeline.arrivals.received == 2
    # within the tolerance, and with the check off, a frame ahead is taken
    assert pipeline.check_arrival(NOW + 9 * SEC, NOW) is None
    pipeline.max_stamp_ahead_s = 0.0
    assert pipeline.check_arrival(ten_years, NOW) is None


def test_time_going_backwards_and_a_new_resolution_restart_the_stream(session):
    pipeline = CameraPipeline("cam", session)
    session.reset()
    wanted = Wanted(features=True)
    indices = []
    for stamp, size in [(10, (32, 48)), (11, (32, 48)), (5, (32, 48)), (6, (64, 32)), (7, (64, 32))]:
        reasons = pipeline.prepare(stamp * SEC, size)
        indices.append(pipeline.run(frame(*size), wanted).frame_index)
        assert len(reasons) == (1 if stamp in (5, 6) else 0)
    assert indices == [0, 1, 0, 0, 1] and pipeline.restarts == 2
    pipeline.reset_on_time_jump = False
    assert pipeline.prepare(1 * SEC, (64, 32)) == [] and pipeline.restarts == 2


def test_a_restart_asked_during_a_frame_is_applied_before_the_next_one(session):
    pipeline = CameraPipeline("cam", session)
    pipeline.prepare(1 * SEC, (32, 48))
    pipeline.run(frame(), Wanted(features=True))
    with pipeline.lock:  # a frame in flight
        assert pipeline.request_restart() is False  # answered at once, not blocked
        assert session.frames_seen == 1
    pipeline.prepare(2 * SEC, (32, 48))
    assert session.frames_seen == 0 and pipeline.run(frame(), Wanted(features=True)).frame_index == 0
    assert pipeline.request_restart() is True and session.frames_seen == 0


def test_outputs_nobody_listens_to_are_not_computed():
    assert not Wanted.from_listened({}).any()
    w = Wanted.from_listened({"depth_info": True})
    assert w.depth and w.model_depth and not w.model_pose
    w = Wanted.from_listened({"points": True})
    assert w.model_depth and w.model_pose and w.points
    w = Wanted.from_listened({"path": True})
    assert w.model_pose and not w.model_depth


def test_the_path_is_bounded(session):
    pipeline = CameraPipeline("cam", session, max_path_length=3)
    for i in range(10):
        path = pipeline.add_pose(i)
    assert path == [7, 8, 9]
    pipeline.restart()
    assert pipeline.path == []


# -- transport ------------------------------------------------------------------------------------------------------
def test_subscription_reliability_follows_the_publishers():
    assert subscription_reliability([], "reliable") == "reliable"
    assert subscription_reliability(["reliable"], "best_effort") == "reliable"
    assert subscription_reliability(["best_effort"], "reliable") == "best_effort"
    assert subscription_reliability(["reliable", "best_effort"], "reliable") == "best_effort"


def test_a_silent_best_effort_publisher_gets_one_notice(session):
    clock = FakeClock()
    pipeline = CameraPipeline("cam", session, topic="/camera/image", clock=clock)
    pipeline.observe_publishers(["best_effort"], "best_effort")
    assert pipeline.transport_notice() is None  # not yet: the camera may not have started
    clock.t += SILENT_PUBLISHER_S
    notice = pipeline.transport_notice()
    assert notice is not None and "/camera/image" in notice and "best-effort" in notice
    assert "FASTDDS_DEFAULT_PROFILES_FILE=" in notice and "reliable" in notice
    clock.t += 100
    assert pipeline.transport_notice() is None  # once
    assert pipeline.diagnostics_values()["publisher_reliability"] == "best_effort"


def test_a_lossy_best_effort_publisher_gets_a_notice_with_the_counts(session):
    pipeline = CameraPipeline("cam", session, topic="/image", clock=FakeClock())
    for i in range(30):  # frames of a reliable camera before: no loss, they do not count for the new one
        pipeline.check_arrival(NOW + i * SEC // 15, NOW)
    pipeline.observe_publishers(["best_effort"], "best_effort")
    start = NOW + 10 * SEC
    for i in [0, 1, 4, 5, 9, 12, 13, 17, 20, 21, 25, 29, 30, 33, 37, 40, 41, 44]:  # most lost, irregularly
        pipeline.check_arrival(start + i * SEC // 15, start + i * SEC // 15, nbytes=921_600)
    notice = pipeline.transport_notice()
    assert notice is not None and "of about" in notice and "0.9 MB" in notice
    values = pipeline.diagnostics_values()
    assert values["frames_received"] == 48 and values["frames_expected"] == 30 + 45


def test_a_reliable_publisher_gets_no_notice_and_a_mismatch_is_named(session):
    clock = FakeClock()
    pipeline = CameraPipeline("cam", session, clock=clock)
    pipeline.observe_publishers(["reliable"], "reliable")
    clock.t += 60
    assert pipeline.transport_notice() is None
    pipeline.observe_publishers(["best_effort"], "reliable")  # image_reliability: reliable set by hand
    notice = pipeline.transport_notice()
    assert notice is not None and "does not match" in notice


# -- logs -----------------------------------------------------------------------------------------------------------
def test_log_throttle_lets_one_line_per_kind_through_and_counts_the_rest():
    clock = FakeClock()
    throttle = LogThrottle(interval_s=5.0, clock=clock)
    allowed = [throttle.allow("cam/restart")[0] for _ in range(39)]
    assert allowed.count(True) == 1
    assert throttle.allow("cam/bad_image") == (True, 0)  # another kind has its own budget
    clock.t += 5.0
    assert throttle.allow("cam/restart") == (True, 38)


# -- the worker -----------------------------------------------------------------------------------------------------
def test_worker_processes_the_newest_item_and_stop_waits_for_the_one_in_flight():
    started, release = threading.Event(), threading.Event()
    done: list = []

    def process(key, item):
        started.set()
        release.wait(5)
        done.append((key, item))

    worker = LatestFrameWorker(process)
    worker.put("cam", 1)
    assert started.wait(5)
    assert worker.put("cam", 2) is False and worker.put("cam", 3) is True  # 3 supersedes 2
    release.set()
    deadline = time.monotonic() + 5
    while len(done) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [("cam", 1), ("cam", 3)]

    started.clear()
    release.clear()
    worker.put("cam", 4)
    assert started.wait(5)
    worker.put("cam", 5)  # waiting when the stop comes: never processed
    threading.Timer(0.2, release.set).start()
    assert worker.stop(timeout=5) and not worker.alive
    assert done[-1] == ("cam", 4) and ("cam", 5) not in done


# -- parameters -----------------------------------------------------------------------------------------------------
def test_safe_defaults_and_parameter_types():
    assert PARAMETERS["window"].default == 16 and PARAMETERS["sink"].default == 1
    assert PARAMETERS["max_side"].default == 224 and PARAMETERS["max_input_pixels"].default >= 7680 * 4320
    assert PARAMETERS["image_reliability"].default == "auto"
    assert validate_parameter("window", "abc") == "window must be an integer, got 'abc'"
    assert "finite number" in validate_parameter("max_stamp_ahead", "soon")
    assert validate_parameter("max_stamp_ahead", 5) is None  # an integer for a float is fine
    assert validate_parameter("max_stamp_ahead", float("inf")) is not None
    assert validate_parameter("image_reliability", "sometimes") is not None
    assert validate_parameter("max_input_pixels", 10) is not None
    assert all(validate_parameter(n, s.default) is None for n, s in PARAMETERS.items() if n != "checkpoint")


# -- memory at the defaults -----------------------------------------------------------------------------------------
def _stream(pipeline: CameraPipeline, frames: int, rgb: np.ndarray, first: int = 0) -> None:
    wanted = Wanted(features=True)
    for i in range(first, first + frames):
        stamp = NOW + i * SEC // 30
        assert pipeline.check_arrival(stamp, stamp) is None
        pipeline.prepare(stamp, rgb.shape[:2])
        pipeline.run(rgb, wanted)
        pipeline.add_pose(i)


def test_memory_stays_flat_at_the_node_defaults(fixture_a):
    from omnistream_perception.memory import resident_bytes

    session = PerceptionSession.from_config(node_default_config(fixture_a))
    pipeline = CameraPipeline("cam", session)
    rgb = frame(32, 32)
    _stream(pipeline, 100, rgb)
    cache, rss = session.cache_bytes, resident_bytes()
    _stream(pipeline, 900, rgb, first=100)
    assert session.cached_frames == 16 and session.cache_bytes == cache  # the window is full and stays so
    assert len(pipeline.path) <= PARAMETERS["max_path_length"].default
    assert len(pipeline.arrivals._deltas) <= 200
    assert resident_bytes() - rss < 20 * 2**20, "resident memory grew over 900 frames"


@pytest.mark.slow
def test_memory_stays_flat_over_10000_frames_at_the_node_defaults(fixture_a):
    from omnistream_perception.memory import resident_bytes

    session = PerceptionSession.from_config(node_default_config(fixture_a))
    pipeline = CameraPipeline("cam", session)
    rgb = frame(32, 32)
    _stream(pipeline, 500, rgb)
    cache, rss = session.cache_bytes, resident_bytes()
    _stream(pipeline, 9_500, rgb, first=500)
    assert session.frames_seen == 10_000 and session.cache_bytes == cache
    assert len(pipeline.path) == PARAMETERS["max_path_length"].default
    assert resident_bytes() - rss < 20 * 2**20, "resident memory grew over 10,000 frames"


# -- the shipped transport settings ---------------------------------------------------------------------------------
def test_large_data_env_points_at_the_shipped_profile_and_respects_the_users():
    from pathlib import Path

    from omnistream_perception.transport import large_data_env

    env = large_data_env({})
    assert list(env) == ["FASTDDS_DEFAULT_PROFILES_FILE"]
    profile = Path(env["FASTDDS_DEFAULT_PROFILES_FILE"])
    assert profile.is_file() and "<segment_size>" in profile.read_text()
    assert list(large_data_env({"ROS_DISTRO": "jazzy"})) == ["FASTRTPS_DEFAULT_PROFILES_FILE"]  # Fast DDS 2
    assert large_data_env({"FASTDDS_DEFAULT_PROFILES_FILE": "/site/fastdds.xml"}) == {}
    assert large_data_env({"FASTRTPS_DEFAULT_PROFILES_FILE": "/site/fastdds.xml"}) == {}
