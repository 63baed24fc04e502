"""``--policy`` specs of the ``omnistream`` commands, and the closed loop through the real ROS 2 nodes.

* ``scripted`` / ``random`` / ``ckpt:DIR``: the simulator-side policies of ``omnistream_sim.policies``;
* ``ros:DIR``: :class:`RosPolicy`, the real ``perception_node`` and ``vla_node`` in this process. It joins the
  simulators and the ROS adapters, so it lives here, above both (ARCHITECTURE.md: the direction of dependencies).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from omnistream_sim.policies import (
    RandomPolicy,
    VLACheckpointPolicy,
    policy_backbone_dir,
    state_columns,
)

POLICY_CHOICES = "scripted | random | ckpt:DIR | ros"


def make_policy(spec: str, *, seed: int = 0, env_name: str = "tabletop", **kwargs: Any):
    """A policy from its ``--policy`` spec; raises ValueError naming the choices on a bad spec."""
    if spec == "scripted":
        if env_name != "tabletop":
            raise ValueError(f"the scripted expert exists only for the tabletop, not {env_name!r}")
        from omnistream_sim.tabletop import ScriptedExpert

        return ScriptedExpert()
    if spec == "random":
        return RandomPolicy(seed=seed)
    if spec.startswith("ckpt:"):
        directory = spec[len("ckpt:") :]
        if not directory:
            raise ValueError("--policy ckpt:DIR needs a checkpoint directory after 'ckpt:'")
        return VLACheckpointPolicy(directory, device=kwargs.get("device", "cpu"))
    if spec == "ros" or spec.startswith("ros:"):
        directory = spec[len("ros:") :] if spec.startswith("ros:") else kwargs.get("policy_dir")
        if not directory:
            raise ValueError("--policy ros needs the VLA policy directory: --policy ros:DIR")
        options = {k: v for k, v in kwargs.items() if k in RosPolicy.OPTIONS and v is not None}
        options["policy_dir"] = directory
        return RosPolicy(**options)
    raise ValueError(f"unknown policy {spec!r}; choose {POLICY_CHOICES}")


def private_domain_id() -> tuple[int, Any]:
    """A DDS domain of this harness's own, and the lock that holds it until the harness closes: the harness publishes
    /clock and uses node names every harness shares, so two closed loops on one machine (parallel demos or sharded
    evaluations) in one domain would drive each other's nodes. The first free domain in 1-100 (valid on every
    platform) other than the user's ``ROS_DOMAIN_ID``, claimed with an exclusive lock file in the temp folder."""
    import fcntl
    import os
    import tempfile

    user = int(os.environ.get("ROS_DOMAIN_ID", "0") or 0)
    for domain in range(1, 101):
        if domain == user:
            continue
        lock = open(os.path.join(tempfile.gettempdir(), f"omnistream-harness-domain-{domain}.lock"), "w")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        return domain, lock
    raise RuntimeError("no free ROS domain for the closed-loop harness (100 harnesses running?)")


class RosPolicy:
    """Closed loop through the real ROS 2 nodes, in this process (rclpy executor thread, own context).

    Graph: the harness publishes each camera's ``image`` + ``camera_info`` (sensor_msgs) -> ``perception_node``
    (streaming backbone) -> ``~/features`` (StreamFeatures) -> ``vla_node`` (remapped) -> ``~/action``
    (EndEffectorAction, metres/radians) -> the harness converts it explicitly to the environment's relative
    action (``conventions.calvin_delta_to_rel_action``) and steps the simulator.

    Lock-step without changing the nodes: the VLA node runs on simulated time (``use_sim_time``) and the harness
    owns ``/clock``. Per control step it publishes the frame, waits until the VLA node has taken in the
    features computed from it, then advances ``/clock`` by one control period, which fires the VLA node's
    control timer exactly once; the action it publishes is this step's. So evaluation is deterministic and
    independent of CPU speed, while every message still crosses real topics between real nodes.
    Per episode both nodes' ``~/reset`` services are called (new stream, empty action queue). The harness runs in a
    DDS domain of its own (``private_domain_id``), so parallel closed loops on one machine cannot drive each other.
    """

    OPTIONS = ("policy_dir", "backbone", "timeout", "perception_params", "vla_params", "pos_step", "rot_step")
    needs_images = True

    def __init__(
        self,
        policy_dir: str | Path,
        backbone: str | Path | None = None,
        timeout: float = 30.0,
        perception_params: dict[str, Any] | None = None,
        vla_params: dict[str, Any] | None = None,
        pos_step: float = 0.02,
        rot_step: float = 0.05,
    ):
        from omnistream_vla.policy import OmniStreamVLAConfig

        self.policy_dir = Path(policy_dir)
        if not self.policy_dir.is_dir():
            raise FileNotFoundError(f"no VLA policy directory at {self.policy_dir}")
        self.vla_config = OmniStreamVLAConfig.load(self.policy_dir)
        self.backbone = Path(backbone) if backbone is not None else self._policy_backbone()
        self.timeout = float(timeout)
        self.pos_step, self.rot_step = pos_step, rot_step
        self.cameras = tuple(self.vla_config.cameras)
        self.state_columns = state_columns(self.vla_config.state_names)
        self.rate = 30.0  # control periods per simulated second (only the /clock arithmetic depends on it)
        from omnistream_perception.perception import CAMERA_TOKEN_CHOICES

        settings = self.vla_config.perception_settings(str(self.backbone))
        as_param = {value: text for text, value in CAMERA_TOKEN_CHOICES.items()}
        settings["camera_token"] = as_param[settings["camera_token"]]  # the node's string parameter
        self.perception_params = {
            **settings,
            "window": 0,  # the whole episode in the cache, as the policy's training features were streamed
            **({"cameras": list(self.cameras)} if len(self.cameras) > 1 else {}),
            **(perception_params or {}),
        }
        self.vla_params = {
            "policy": str(self.policy_dir),
            "control_rate": self.rate,
            # the node acts in the policy's action convention (metres, radians); pos_step/rot_step convert back
            "max_feature_age": 1.0,  # simulated seconds: lock-step advances the node's clock 1/rate per step
            **(vla_params or {}),
        }
        self.name = f"ros:{self.policy_dir.name}"
        self._started = False
        self._tick = 0
        self._instruction: str | None = None
        self.stops = 0
        self.steps = 0
        self._frame_seconds = 0.0  # image published -> its features taken in by vla_node (perception + transport)
        self._action_seconds = 0.0  # /clock tick -> EndEffectorAction received (VLA control step + transport)

    def _policy_backbone(self) -> Path:
        return policy_backbone_dir(self.policy_dir, self.vla_config)

    # ----- graph lifecycle -----
    def start(self) -> None:
        import threading

        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter import Parameter
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import CameraInfo, Image, JointState
        from std_msgs.msg import String
        from std_srvs.srv import Trigger

        from omnistream_msgs.msg import EndEffectorAction
        from omnistream_perception.ros.perception_node import PerceptionNode
        from omnistream_vla.ros.vla_node import VLANode

        def params(values: dict[str, Any]) -> list:
            return [Parameter(k, value=v) for k, v in values.items()]

        self._ctx = rclpy.Context()
        self.domain_id, self._domain_lock = private_domain_id()
        rclpy.init(context=self._ctx, domain_id=self.domain_id)
        multi = len(self.cameras) > 1
        remaps = ["--ros-args"]
        for cam in self.cameras:
            src = f"{cam}/features" if multi else "features"
            remaps += ["-r", f"{src}:=/perception_node/{src}"]
        self.perception = PerceptionNode(context=self._ctx, parameter_overrides=params(self.perception_params))
        self.vla = VLANode(
            context=self._ctx,
            cli_args=remaps,
            parameter_overrides=params({**self.vla_params, "use_sim_time": True}),
        )
        self.harness = rclpy.create_node("sim_harness", context=self._ctx)
        sensor = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )  # fmt: skip
        self._image_pubs = {c: self.harness.create_publisher(Image, f"{c}/image" if multi else "image", sensor)
                            for c in self.cameras}  # fmt: skip
        self._info_pubs = {c: self.harness.create_publisher(CameraInfo, f"{c}/camera_info" if multi else "camera_info",
                                                            sensor) for c in self.cameras}  # fmt: skip
        self._instruction_pub = self.harness.create_publisher(String, "instruction", latched)
        # The robot state for a policy that reads it (vla_node picks its state_names out of the JointState).
        self._state_pub = self.harness.create_publisher(JointState, "joint_states", 10) if self.state_columns else None
        self._clock_pub = self.harness.create_publisher(Clock, "/clock", 10)
        self._actions: list = []
        self.harness.create_subscription(EndEffectorAction, "/vla_node/action", self._on_action, 10)
        self._reset_clients = [
            self.harness.create_client(Trigger, "/perception_node/reset"),
            self.harness.create_client(Trigger, "/vla_node/reset"),
        ]
        # One executor thread for the three nodes: lock-step runs one callback chain at a time anyway, and on a
        # 2-core machine a 4-thread MultiThreadedExecutor made every control step ~5x slower (measured 105 vs
        # 28 ms median per step through ROS, thread hand-offs and GIL contention).
        self._executor = SingleThreadedExecutor(context=self._ctx)
        for node in (self.perception, self.vla, self.harness):
            self._executor.add_node(node)
        self._spin = threading.Thread(target=self._executor.spin, name="sim-ros-executor", daemon=True)
        self._spin.start()
        for client in self._reset_clients:
            if not client.wait_for_service(timeout_sec=self.timeout):
                raise RuntimeError(f"service {client.srv_name} did not appear within {self.timeout} s")
        self._publish_clock()
        self._started = True

    def close(self) -> None:
        if not self._started:
            return
        self._executor.shutdown(timeout_sec=5.0)
        for node in (self.harness, self.vla, self.perception):
            node.destroy_node()
        self._ctx.try_shutdown()
        self._spin.join(timeout=5.0)
        self._domain_lock.close()  # the domain is free for the next harness
        self._started = False

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to clean
            self.close()

    # ----- callbacks -----
    def _on_action(self, msg) -> None:
        self._actions.append(msg)

    def summary(self) -> dict[str, Any]:
        """Timings and counts for results.json (the rollout loop adds them)."""
        steps = max(self.steps, 1)
        return {
            "ros_perception_ms_per_frame": round(1000 * self._frame_seconds / steps, 3),
            "ros_vla_ms_per_step": round(1000 * self._action_seconds / steps, 3),
            "ros_stop_actions": self.stops,
            "ros_steps": self.steps,
        }

    def _publish_clock(self) -> None:
        from builtin_interfaces.msg import Time
        from rosgraph_msgs.msg import Clock

        nanoseconds = int(round(self._tick * 1e9 / self.rate))
        self._clock_pub.publish(Clock(clock=Time(sec=nanoseconds // 10**9, nanosec=nanoseconds % 10**9)))

    def _wait(self, condition, what: str) -> None:
        import time

        deadline = time.monotonic() + self.timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"ros policy: no {what} within {self.timeout} s (are the nodes running?)")
            time.sleep(0.001)

    # ----- Policy interface -----
    def reset(self) -> None:
        from std_srvs.srv import Trigger

        if not self._started:
            self.start()
        for client in self._reset_clients:
            future = client.call_async(Trigger.Request())
            self._wait(future.done, f"answer from {client.srv_name}")
            if not future.result().success:
                raise RuntimeError(f"{client.srv_name} failed: {future.result().message}")

    def _publish_state(self, observation: dict, stamp) -> None:
        """The simulator's full state as sensor_msgs/JointState, every entry named (STATE_NAMES); waits until
        vla_node has it, so this step's action is computed from this step's state."""
        from sensor_msgs.msg import JointState

        from omnistream_perception.ros.image import make_header
        from omnistream_sim.tabletop.env import STATE_NAMES

        state = np.asarray(observation["state"], dtype=np.float64).reshape(-1)
        if state.shape[0] != len(STATE_NAMES):
            raise ValueError(f"the observation's state has {state.shape[0]} entries, expected {len(STATE_NAMES)}")
        received = self.vla.joint_states_received
        msg = JointState(header=make_header(stamp, "base_link"), name=list(STATE_NAMES), position=state.tolist())
        self._state_pub.publish(msg)
        self._wait(lambda: self.vla.joint_states_received > received, "joint_states at vla_node")

    def select_action(self, observation: dict) -> np.ndarray:
        from std_msgs.msg import String

        from omnistream_perception.ros.image import camera_info_from_intrinsics, make_header, rgb_to_image
        from omnistream_sim.conventions import gripper_to_sign

        instruction = observation["instruction"]
        if instruction != self._instruction:
            # Transient-local and published before the frame: it reaches the VLA node long before the features
            # computed from that frame do (they cross the perception node first).
            self._wait(lambda: self._instruction_pub.get_subscription_count() > 0, "instruction subscriber")
            self._instruction_pub.publish(String(data=instruction))
            self._instruction = instruction
        import time

        taken_in = self.vla.feature_stats.counts["processed"]
        sent = time.perf_counter()
        stamp = self.vla.get_clock().now().to_msg()
        if self._state_pub is not None:
            self._publish_state(observation, stamp)
        for cam in self.cameras:
            rgb = observation["images"][cam]
            header = make_header(stamp, f"{cam}_camera")
            if "intrinsics" in observation and cam in observation["intrinsics"]:
                info = camera_info_from_intrinsics(observation["intrinsics"][cam], rgb.shape[1], rgb.shape[0], header)
                self._info_pubs[cam].publish(info)
            self._image_pubs[cam].publish(rgb_to_image(rgb, header))
        self._wait(lambda: self.vla.feature_stats.counts["processed"] >= taken_in + len(self.cameras),
                   "features from perception_node at vla_node")  # fmt: skip
        ticked = time.perf_counter()
        self._frame_seconds += ticked - sent
        received = len(self._actions)
        self._tick += 1
        self._publish_clock()
        self._wait(lambda: len(self._actions) > received, "EndEffectorAction from vla_node")
        self._action_seconds += time.perf_counter() - ticked
        msg = self._actions[received]
        self.steps += 1
        if msg.stop:
            self.stops += 1
            return np.array([0, 0, 0, 0, 0, 0, 1.0 if msg.gripper >= 0 else -1.0], dtype=np.float32)
        # Metres/radians on the wire -> the simulator's relative action (the explicit convention conversion; with
        # CALVIN's 0.02 m / 0.05 rad steps it equals conventions.calvin_delta_to_rel_action).
        translation = np.array([msg.translation.x, msg.translation.y, msg.translation.z]) / self.pos_step
        rotation = np.array([msg.rotation.x, msg.rotation.y, msg.rotation.z]) / self.rot_step
        arm = np.clip(np.concatenate([translation, rotation]), -1.0, 1.0)
        return np.concatenate([arm, [float(gripper_to_sign(msg.gripper))]]).astype(np.float32)
