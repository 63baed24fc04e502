"""The VLA node's behaviour without ROS: features + instruction (+ robot state) -> one command per control step.

``VLAController`` holds every safety rule; ``vla_node`` only feeds it messages and publishes what it returns,
so each rule is unit-tested without rclpy (``tests/test_vla_controller.py``). Times are seconds of one clock
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

Actions: the policy's output in its units x ``translation_scale`` (m/unit) / ``rotation_scale`` (rad/unit);
gripper by :func:`action_convention.gripper_to_sign` (0 counts as open). Relative mode also gives the twist:
linear = delta x rate, angular = the rotation vector of the roll-pitch-yaw delta x rate (a true angular
velocity). Absolute mode gives no twist (a target pose times a rate is not a velocity).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from omnistream_perception.features_codec import batch_entry, batch_key

from .action_convention import gripper_to_sign, rpy_to_rotation_vector

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


class VLAController:
    """Thread-safe: inputs may arrive on other threads than ``step`` and ``watchdog``."""

    def __init__(self, policy, settings: ControllerSettings, clock=None) -> None:
        self.policy = policy
        self.settings = settings
        self._clock = clock  # re-reads the time after inference (seconds, same clock as ``now``)
        config = policy.config
        self.cameras = list(config.cameras)
        self.state_names = list(getattr(config, "state_names", ()))
        self._lock = threading.Lock()
        self._policy_lock = threading.Lock()  # a queue reset never interleaves with an inference
        self._instruction: str | None = None
        self._features: dict[str, _Features] = {}
        self._mismatch: dict[str, str] = {}
        self._joint: tuple[list[str], list[float], float] | None = None
        self._gripper = float(settings.initial_gripper)
        self._target: tuple[np.ndarray, np.ndarray] | None = None  # last absolute target
        self._moving = False  # the last command was a motion
        self._queue_stale = False  # the watchdog stopped: clear the queue before the next inference
        self._seq = 0
        self.received = 0
        self.actions = 0
        self.stops = 0
        self.last_reason = ""

    # -- configuration ------------------------------------------------------------------------------------------
    def update(self, **changes: Any) -> None:
        with self._lock:
            self.settings = replace(self.settings, **changes)

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
            self._features[camera] = _Features(tokens, stamp, now)
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

    def reset(self) -> None:
        """Clears the chunk queue (waits for an inference in progress)."""
        with self._policy_lock:
            self.policy.reset()
            self._queue_stale = False

    @property
    def instruction(self) -> str | None:
        return self._instruction

    # -- decisions ----------------------------------------------------------------------------------------------
    def stop_reason(self, now: float) -> tuple[str, int] | None:
        """Why the features cannot be acted on at ``now`` (reason, level), or None when they all can."""
        with self._lock:
            return self._stop_reason_locked(now)

    def _stop_reason_locked(self, now: float) -> tuple[str, int] | None:
        max_age = self.settings.max_feature_age
        for cam in self.cameras:
            if cam in self._mismatch:
                return self._mismatch[cam], ERROR
            sample = self._features.get(cam)
            if sample is None:
                return f"no features from {cam} yet", WARN
            age = now - min(sample.stamp, sample.arrival)
            if age > max_age:
                hint = " (stamped far behind this clock: is their source on another clock?)" if age > 60 else ""
                return f"features of {cam} are {age:.3f} s old (max_feature_age {max_age} s){hint}", WARN
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
            features = dict(self._features)
        if instruction is None:
            return None
        problem = self.stop_reason(now)
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
                    self.policy.reset()
                    self._queue_stale = False
                action = self.policy.select_action(observation)[0].float().cpu().numpy()
        except Exception as exc:  # a policy failure must end in a stop, never in a dead control loop
            return self._stop(f"policy failed: {exc}", ERROR, clear=True)
        latency = time.perf_counter() - started
        if not np.isfinite(action).all():
            return self._stop(f"the policy produced NaN/inf ({action.tolist()})", ERROR, clear=True)
        with self._lock:  # checked and issued at once: the watchdog sees either this motion or its staleness
            # the inputs may have gone stale while the policy ran
            problem = self._stop_reason_locked(self._clock()) if self._clock is not None else None
            if problem is None:
                return self._motion_locked(action, latency)
        return self._stop(*problem, clear=True)

    def watchdog(self, now: float) -> Command | None:
        """A stop when features went stale after a motion and no stop has been issued since; else None."""
        with self._lock:
            if not self._moving or self._instruction is None:
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

    def _motion_locked(self, action: np.ndarray, latency: float) -> Command:
        s = self.settings
        translation = action[:3].astype(np.float64) * s.translation_scale
        rotation = action[3:6].astype(np.float64) * s.rotation_scale
        self._gripper = float(gripper_to_sign(action[6]))
        self._moving = True
        self.actions += 1
        self.last_reason = ""
        if s.mode == "absolute":
            self._target = (translation, rotation)
            return Command(False, "", OK, s.mode, translation, rotation, self._gripper, latency_s=latency,
                           seq=self._next_seq())  # fmt: skip
        return Command(
            False, "", OK, s.mode, translation, rotation, self._gripper,
            linear_velocity=translation * s.control_rate,
            angular_velocity=rpy_to_rotation_vector(rotation) * s.control_rate,
            latency_s=latency, seq=self._next_seq(),
        )  # fmt: skip

    def _stop(self, reason: str, level: int, clear: bool) -> Command:
        if clear:
            self.reset()
        with self._lock:
            return self._stop_locked(reason, level)

    def _stop_locked(self, reason: str, level: int) -> Command:
        zero = np.zeros(3)
        self._moving = False
        self.stops += 1
        self.last_reason = reason
        mode = self.settings.mode
        if mode == "absolute":  # hold the last target; never a zero target
            held = self._target
            translation, rotation = held if held is not None else (zero, zero)
            return Command(True, reason, level, mode, translation, rotation, self._gripper,
                           publish_action=held is not None, seq=self._next_seq())  # fmt: skip
        return Command(True, reason, level, mode, zero, zero, self._gripper, zero, zero, seq=self._next_seq())
