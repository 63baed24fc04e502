"""The VLA node's behaviour without ROS: features + instruction (+ robot state) -> one command per control step.

``VLAController`` holds every safety rule; ``vla_node`` only feeds it messages and publishes what it returns,
so each rule is unit-tested without rclpy (``tests/vla/test_vla_controller.py``). Times are seconds of one clock
(the node's ROS clock, so simulated time works too): the caller passes ``now``; the optional ``clock`` re-reads
it after an inference.

Rules (a stop = zero motion in relative mode, the last commanded target in absolute mode, gripper held,
``stop=True``; after a stop the chunk queue is cleared so nothing planned on old inputs is executed):
* no instruction yet -> idle (``step`` returns None: nothing is published);
* features of a camera missing or older than ``max_feature_age`` -> stop. The age is taken from the features'
  header stamp (the camera image's) AND from their arrival, whichever is older: a delayed or replayed frame
  is as stale as its stamp says. A stamp more than ``max_clock_skew`` ahead of this clock is refused (clocks
  out of sync); within it, it counts as "now";
* features whose grid or width differ from the policy's (``expected_grid``) -> refused, ERROR, stop until
  matching features arrive;
* a policy reading the robot state: a missing name, NaN/inf or a state older than ``max_feature_age`` -> stop;
* the policy fails or outputs NaN/inf -> stop (ERROR);
* features that went stale while the policy ran -> the action is discarded, stop;
* ``watchdog(now)`` (the node runs it on its own timer, apart from the control timer): once features are
  stale while the last command was a motion, it returns a stop at once, so a stop follows within
  ``max_feature_age`` plus the watchdog period whatever the control rate or the policy's inference time.

Execution (``execution``): ``queue`` executes the policy's chunks in turn; ``ensemble`` queries the policy every
``query_period`` steps and executes ACT's temporal ensemble of the overlapping chunks
(:mod:`omnistream_vla.action_execution`, weights ``exp(-ensemble_m * i)``, i = 0 the oldest prediction).

Several cameras: each camera's last few features are kept; a control step uses one set matched by header stamp:
the camera whose newest features are the oldest sets the time, every other camera contributes its features
nearest to it, and any of them further than ``camera_sync_tolerance`` -> stop (counted in ``desync_stops``);
a camera never heard from -> stop (``missing_stops``). The age rule applies to the matched set.

Limits (``limits``, :class:`action_execution.ActionLimits`, metres and radians after scaling): per-step
translation and rotation caps and a workspace box; each action they change is counted in ``clipped``. The
end effector's pose they may need comes from ``on_ee_pose`` (the node's ``ee_pose`` topic) or from the
joint_states entries named by ``ee_position_joints`` (x, y, z); missing or older than ``max_feature_age`` -> stop.

Emergency stop: ``emergency_stop()`` returns a stop at once and latches: every step is a stop (the policy is not
run) until ``clear_emergency_stop()``; new instructions and ``reset()`` do not clear it.

Actions: the policy's output in its units x ``translation_scale`` (m/unit) / ``rotation_scale`` (rad/unit);
gripper by :func:`action_convention.gripper_to_sign` (0 counts as open). Relative mode also gives the twist:
linear = delta x rate, angular = the rotation vector of the roll-pitch-yaw delta x rate (a true angular
velocity). Absolute mode gives no twist (a target pose times a rate is not a velocity).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from omnistream_perception.features_codec import batch_entry, batch_key

from .action_convention import gripper_to_sign, rpy_to_rotation_vector
from .action_execution import EXECUTIONS, ActionLimits, EndEffector, LimitError, TemporalEnsembler

OK, WARN, ERROR = 0, 1, 2


@dataclass(frozen=True)
class ControllerSettings:
    control_rate: float = 10.0  # Hz
    max_feature_age: float = 0.5  # s
    max_clock_skew: float = 0.05  # s a stamp may be ahead of this clock
    translation_scale: float = 0.02  # m per policy unit
    rotation_scale: float = 0.05  # rad per policy unit
    mode: str = "relative"  # relative | absolute
    initial_gripper: float = 1.0
    max_instruction_chars: int = 512
    features_pooled: bool = True
    execution: str = "queue"  # queue | ensemble
    ensemble_m: float = 0.01  # ensemble weights exp(-m * i), i = 0 the oldest prediction (ACT's value)
    query_period: int = 1  # ensemble: steps between policy queries, in [1, chunk_size]
    limits: ActionLimits = ActionLimits()
    camera_sync_tolerance: float = 0.05  # s between the matched cameras' stamps
    ee_position_joints: tuple[str, ...] = ()  # joint_states names holding the end effector's x, y, z


@dataclass(frozen=True)
class Command:
    """One control step's output. ``publish_action`` False: nothing to send on ``~/action`` (an absolute-mode
    stop before any target was commanded: there is no pose to hold, and zeros would read as the origin)."""

    stop: bool
    reason: str
    level: int
    mode: str
    translation: np.ndarray  # m: a delta (relative) or a target (absolute)
    rotation: np.ndarray  # rad, roll-pitch-yaw
    gripper: float  # +1 open, -1 close
    linear_velocity: np.ndarray | None = None  # m/s, relative mode only
    angular_velocity: np.ndarray | None = None  # rad/s rotation vector rate, relative mode only
    publish_action: bool = True
    latency_s: float | None = None
    clipped: tuple[str, ...] = ()  # limits that changed this action
    new_error: bool = False  # an ERROR stop whose reason differs from the last command's (count it once)
    seq: int = 0  # issue order: a command older than one already published is superseded (the node drops it)


@dataclass
class InstructionUpdate:
    text: str | None  # the instruction now in force
    changed: bool = False
    warnings: list[str] = field(default_factory=list)
    error: str | None = None  # rejected (the previous one stays)


@dataclass
class _Features:
    tokens: np.ndarray
    stamp: float
    arrival: float


def expected_grid(config, pooled: bool = True) -> tuple[int, int]:
    """The (h, w) patch grid the policy was trained on (square ``image_size`` frames; pooled or not)."""
    grid = config.grid_size
    side = -(-grid // config.pool) if pooled else grid
    return side, side


# features kept per camera for stamp matching (several cameras): a few frames at camera rate
FEATURE_HISTORY = 8


class VLAController:
    """Thread-safe: inputs may arrive on other threads than ``step`` and ``watchdog``."""

    def __init__(self, policy, settings: ControllerSettings, clock=None) -> None:
        self.policy = policy
        self._check(settings)
        self.settings = settings
        self._clock = clock  # re-reads the time after inference (seconds, same clock as ``now``)
        config = policy.config
        self.cameras = list(config.cameras)
        self.state_names = list(getattr(config, "state_names", ()))
        self._lock = threading.Lock()
        self._policy_lock = threading.Lock()  # a queue reset never interleaves with an inference
        self._instruction: str | None = None
        self._features: dict[str, deque[_Features]] = {}
        self._mismatch: dict[str, str] = {}
        self._joint: tuple[list[str], list[float], float] | None = None
        self._gripper = float(settings.initial_gripper)
        self._target: tuple[np.ndarray, np.ndarray] | None = None  # last absolute target
        self._moving = False  # the last command was a motion
        self._queue_stale = False  # the watchdog stopped: clear the queue before the next inference
        self._seq = 0
        self._ensembler = TemporalEnsembler(settings.ensemble_m)
        self._since_query = 0
        self._ee: tuple[EndEffector, float] | None = None  # (pose, time) from ee_pose
        self._estop: str | None = None  # the latched emergency stop's reason
        self.received = 0
        self.actions = 0
        self.stops = 0
        self.missing_stops = 0
        self.desync_stops = 0
        self.clipped = {"translation": 0, "rotation": 0, "workspace": 0}
        self.clipped_actions = 0
        self.last_reason = ""

    # -- configuration ------------------------------------------------------------------------------------------
    def _check(self, s: ControllerSettings) -> None:
        if s.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {s.execution!r}")
        chunk = self.policy.config.chunk_size
        if s.execution == "ensemble" and not 1 <= s.query_period <= chunk:
            raise ValueError(f"query_period must be in [1, chunk_size={chunk}] (steps between policy queries)")

    def update(self, **changes: Any) -> None:
        with self._lock:
            settings = replace(self.settings, **changes)
            self._check(settings)
            self.settings = settings
            self._ensembler.m = float(settings.ensemble_m)

    def expected_grid(self) -> tuple[int, int]:
        return expected_grid(self.policy.config, self.settings.features_pooled)

    # -- inputs -------------------------------------------------------------------------------------------------
    def on_features(self, camera: str, tokens: np.ndarray, stamp: float, now: float) -> str | None:
        """Stores one camera's decoded (h, w, D) features; returns why they were refused, or None."""
        with self._lock:
            self.received += 1
            if camera not in self.cameras:
                return f"features for unknown camera {camera!r} (the policy reads {self.cameras})"
            h, w, dim = tokens.shape
            want_h, want_w = self.expected_grid()
            width = self.policy.config.vision_hidden_size
            if (h, w) != (want_h, want_w) or dim != width:
                config = self.policy.config
                reason = (
                    f"features of {camera} are a {h}x{w} grid of width {dim}; the policy was trained on "
                    f"{want_h}x{want_w} of width {width} ({config.image_size} px square frames, patch "
                    f"{config.patch_size}, pool {config.pool if self.settings.features_pooled else 1}): run "
                    f"perception_node with max_side:={config.image_size} feature_pooling:={config.pool} on square "
                    "images and the policy's backbone"
                )
                self._mismatch[camera] = reason
                self._features.pop(camera, None)
                return reason
            skew = stamp - now
            if skew > self.settings.max_clock_skew:
                return (
                    f"features of {camera} stamped {skew:.3f} s ahead of this clock (more than max_clock_skew "
                    f"{self.settings.max_clock_skew} s): synchronise the camera's and this machine's clocks"
                )
            self._mismatch.pop(camera, None)
            self._features.setdefault(camera, deque(maxlen=FEATURE_HISTORY)).append(_Features(tokens, stamp, now))
            return None

    def on_instruction(self, text: str) -> InstructionUpdate:
        from .policy.processor_omnistream_vla import sanitize_instruction

        try:
            cleaned, warnings = sanitize_instruction(text)
        except ValueError as exc:
            return InstructionUpdate(self._instruction, error=f"{exc}; keeping {self._instruction!r}")
        limit = self.settings.max_instruction_chars
        if len(cleaned) > limit:
            warnings.append(f"instruction of {len(cleaned)} characters truncated to {limit}")
            cleaned = cleaned[:limit].rstrip()
        if self.policy.processor.encode_instruction(cleaned).truncated:
            warnings.append(f"instruction truncated to the policy's {self.policy.config.max_instruction_tokens} tokens")
        with self._lock:
            changed = cleaned != self._instruction
            self._instruction = cleaned
        if changed:
            self.reset()
        return InstructionUpdate(cleaned, changed, warnings)

    def on_joint_state(self, names: list[str], positions: list[float], now: float) -> None:
        with self._lock:
            self._joint = (list(names), list(positions), now)

    def on_ee_pose(self, position, rpy, now: float) -> None:
        """The end effector's current pose (m, rad roll-pitch-yaw or None) in the action frame."""
        ee = EndEffector(np.asarray(position, dtype=np.float64), None if rpy is None else np.asarray(rpy, float))
        with self._lock:
            self._ee = (ee, now)

    def reset(self) -> None:
        """Clears the chunk queue and the ensemble (waits for an inference in progress); keeps an emergency stop."""
        with self._policy_lock:
            self._reset_execution()

    def _reset_execution(self) -> None:
        self.policy.reset()
        self._ensembler.reset()
        self._since_query = 0
        self._queue_stale = False

    # -- emergency stop -----------------------------------------------------------------------------------------
    def emergency_stop(self, reason: str = "emergency stop") -> Command:
        """Latches the stop and returns the stop command to send now."""
        with self._lock:
            self._estop = reason
            self._queue_stale = True  # nothing planned before it is executed after it is cleared
            return self._stop_locked(self._estop_reason_locked(), ERROR)

    def clear_emergency_stop(self) -> bool:
        """Releases a latched emergency stop; True if one was latched."""
        with self._lock:
            latched, self._estop = self._estop is not None, None
            return latched

    def counters(self) -> dict[str, Any]:
        """What /diagnostics reports about the commands issued so far."""
        with self._lock:
            return {
                "actions": self.actions, "stops": self.stops, "last_stop_reason": self.last_reason,
                "clipped_actions": self.clipped_actions, "missing_camera_stops": self.missing_stops,
                "desync_camera_stops": self.desync_stops, **{f"clipped_{k}": v for k, v in self.clipped.items()},
                "emergency_stop": self._estop is not None,
            }  # fmt: skip

    @property
    def emergency_stopped(self) -> bool:
        return self._estop is not None

    def _estop_reason_locked(self) -> str:
        return f"{self._estop} (latched until ~/clear_emergency_stop)"

    def stop_now(self, reason: str) -> Command:
        """A stop to send at once (e.g. before output ends); clears the queue."""
        return self._stop(reason, WARN, clear=True)

    @property
    def instruction(self) -> str | None:
        return self._instruction

    # -- decisions ----------------------------------------------------------------------------------------------
    def stop_reason(self, now: float) -> tuple[str, int] | None:
        """Why the features cannot be acted on at ``now`` (reason, level), or None when they all can."""
        with self._lock:
            return self._stop_reason_locked(now)

    def _stop_reason_locked(self, now: float) -> tuple[str, int] | None:
        _, problem, _ = self._match_locked(now)
        return problem

    def _match_locked(self, now: float) -> tuple[dict[str, _Features], tuple[str, int] | None, str]:
        """The features to act on, one per camera matched by stamp; else (.., (reason, level), kind of problem)."""
        for cam in self.cameras:
            if cam in self._mismatch:
                return {}, (self._mismatch[cam], ERROR), "mismatch"
            if not self._features.get(cam):
                return {}, (f"no features from {cam} yet", WARN), "missing"
        if len(self.cameras) == 1:
            chosen = {self.cameras[0]: self._features[self.cameras[0]][-1]}
        else:
            tol = self.settings.camera_sync_tolerance
            ref = min(self.cameras, key=lambda c: self._features[c][-1].stamp)  # the camera furthest behind
            t = self._features[ref][-1].stamp
            chosen = {}
            for cam in self.cameras:
                best = min(self._features[cam], key=lambda f: abs(f.stamp - t))
                if abs(best.stamp - t) > tol:
                    reason = (
                        f"cameras out of sync: the features of {cam} nearest to {ref}'s stamp are "
                        f"{abs(best.stamp - t):.3f} s apart (camera_sync_tolerance {tol} s)"
                    )
                    return {}, (reason, WARN), "desync"
                chosen[cam] = best
        max_age = self.settings.max_feature_age
        for cam, sample in chosen.items():
            age = now - min(sample.stamp, sample.arrival)
            if age > max_age:
                hint = " (stamped far behind this clock: is their source on another clock?)" if age > 60 else ""
                return {}, (f"features of {cam} are {age:.3f} s old (max_feature_age {max_age} s){hint}", WARN), "stale"
        return chosen, None, ""

    def _ee_locked(self, now: float) -> EndEffector | None:
        """The end effector's pose if known and fresh (ee_pose, else the ee_position_joints of joint_states)."""
        max_age = self.settings.max_feature_age
        if self._ee is not None and now - self._ee[1] <= max_age:
            return self._ee[0]
        names = self.settings.ee_position_joints
        if names and self._joint is not None and now - self._joint[2] <= max_age:
            joint_names, positions, _ = self._joint
            if all(n in joint_names for n in names) and len(positions) >= len(joint_names):
                position = np.array([positions[joint_names.index(n)] for n in names], dtype=np.float64)
                if np.isfinite(position).all():
                    return EndEffector(position)
        return None

    def _state(self, now: float) -> tuple[np.ndarray | None, str | None]:
        """The policy's state vector, by name, from the newest JointState; or why it cannot be built."""
        with self._lock:
            joint = self._joint
        if joint is None:
            return None, "no joint_states yet (the policy reads the robot state)"
        names, positions, arrival = joint
        if now - arrival > self.settings.max_feature_age:
            return None, f"joint_states older than {self.settings.max_feature_age} s"
        missing = [n for n in self.state_names if n not in names]
        if missing or len(positions) < len(names):
            return None, f"joint_states lacks {missing or 'positions for its names'}"
        state = np.array([positions[names.index(n)] for n in self.state_names], dtype=np.float32)
        if not np.isfinite(state).all():
            return None, "joint_states holds NaN/inf"
        return state, None

    def step(self, now: float) -> Command | None:
        """This control period's command, or None while idle (no instruction)."""
        with self._lock:
            instruction = self._instruction
            if instruction is None:
                return None
            if self._estop is not None:
                return self._stop_locked(self._estop_reason_locked(), ERROR)
            features, problem, kind = self._match_locked(now)
            if kind == "missing":
                self.missing_stops += 1
            elif kind == "desync":
                self.desync_stops += 1
        if problem is not None:
            return self._stop(*problem, clear=True)
        pooled = self.settings.features_pooled
        observation: dict[str, Any] = {"task": [instruction]}
        for cam in self.cameras:
            observation[batch_key(cam, pooled)] = batch_entry(features[cam].tokens, pooled)
        if self.state_names:
            state, reason = self._state(now)
            if reason is not None:
                return self._stop(reason, WARN, clear=True)
            observation["observation.state"] = state[None]
        started = time.perf_counter()
        try:
            with self._policy_lock:
                if self._queue_stale:
                    self._reset_execution()
                action = self._next_action(observation)
        except Exception as exc:  # a policy failure must end in a stop, never in a dead control loop
            return self._stop(f"policy failed: {exc}", ERROR, clear=True)
        latency = time.perf_counter() - started
        if not np.isfinite(action).all():
            return self._stop(f"the policy produced NaN/inf ({action.tolist()})", ERROR, clear=True)
        with self._lock:  # checked and issued at once: the watchdog sees either this motion or its staleness
            if self._estop is not None:  # latched while the policy ran
                return self._stop_locked(self._estop_reason_locked(), ERROR)
            # the inputs may have gone stale while the policy ran
            later = self._clock() if self._clock is not None else now
            problem = self._stop_reason_locked(later) if self._clock is not None else None
            if problem is None:
                try:
                    return self._motion_locked(action, latency, later)
                except LimitError as exc:
                    problem = (str(exc), WARN)
        return self._stop(*problem, clear=True)

    def _next_action(self, observation: dict[str, Any]) -> np.ndarray:
        """This step's action in the policy's units (with the policy lock held)."""
        if self.settings.execution == "queue":
            return self.policy.select_action(observation)[0].float().cpu().numpy()
        if self._since_query >= self.settings.query_period or not self._ensembler.has_action():
            chunk = self.policy.predict_action_chunk(observation)[0].float().cpu().numpy()
            if not np.isfinite(chunk).all():
                raise FloatingPointError("the policy produced NaN/inf")
            self._ensembler.add(chunk)
            self._since_query = 0
        self._since_query += 1
        return self._ensembler.pop()

    def watchdog(self, now: float) -> Command | None:
        """A stop when features went stale after a motion and no stop has been issued since; else None."""
        with self._lock:
            if not self._moving or self._instruction is None or self._estop is not None:
                return None
            problem = self._stop_reason_locked(now)
            if problem is None:
                return None
            self._queue_stale = True  # cleared before the next inference: never waits for one in progress
            return self._stop_locked(*problem)

    # -- commands (with self._lock held) -------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _motion_locked(self, action: np.ndarray, latency: float, now: float) -> Command:
        s = self.settings
        translation = action[:3].astype(np.float64) * s.translation_scale
        rotation = action[3:6].astype(np.float64) * s.rotation_scale
        clipped: list[str] = []
        if s.limits.active:
            ee = self._ee_locked(now)
            if ee is None and s.limits.needs_position(s.mode):
                raise LimitError(
                    "the limits need the end effector's current pose (an ee_pose topic or ee_position_joints in "
                    f"joint_states, newer than max_feature_age {s.max_feature_age} s)"
                )
            translation, rotation, clipped = s.limits.apply(s.mode, translation, rotation, ee, self._target)
            for name in clipped:
                self.clipped[name] += 1
            self.clipped_actions += bool(clipped)
        self._gripper = float(gripper_to_sign(action[6]))
        self._moving = True
        self.actions += 1
        self.last_reason = ""
        if s.mode == "absolute":
            self._target = (translation, rotation)
            return Command(False, "", OK, s.mode, translation, rotation, self._gripper, latency_s=latency,
                           clipped=tuple(clipped), seq=self._next_seq())  # fmt: skip
        return Command(
            False, "", OK, s.mode, translation, rotation, self._gripper,
            linear_velocity=translation * s.control_rate,
            angular_velocity=rpy_to_rotation_vector(rotation) * s.control_rate,
            latency_s=latency, clipped=tuple(clipped), seq=self._next_seq(),
        )  # fmt: skip

    def _stop(self, reason: str, level: int, clear: bool) -> Command:
        if clear:
            self.reset()
        with self._lock:
            return self._stop_locked(reason, level)

    def _stop_locked(self, reason: str, level: int) -> Command:
        zero = np.zeros(3)
        new_error = level == ERROR and reason != self.last_reason
        self._moving = False
        self.stops += 1
        self.last_reason = reason
        mode = self.settings.mode
        if mode == "absolute":  # hold the last target; never a zero target
            held = self._target
            translation, rotation = held if held is not None else (zero, zero)
            return Command(True, reason, level, mode, translation, rotation, self._gripper,
                           publish_action=held is not None, new_error=new_error, seq=self._next_seq())  # fmt: skip
        return Command(True, reason, level, mode, zero, zero, self._gripper, zero, zero, new_error=new_error,
                       seq=self._next_seq())  # fmt: skip
