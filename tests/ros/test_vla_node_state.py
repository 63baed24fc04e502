"""vla_node reads the robot state BY NAME from sensor_msgs/JointState: actions with a state, stops without one
(the policy side of the state input is tested in vla/test_vla_state.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_vla_state import _policy  # noqa: E402


@pytest.mark.ros
def test_vla_node_reads_the_state_by_name_from_joint_states():
    rclpy = pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from ros_helpers import spin_in_thread
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String

    from omnistream_msgs.msg import EndEffectorAction, StreamFeatures
    from omnistream_perception.features_codec import encode_patch_tokens
    from omnistream_vla.ros.vla_node import VLANode

    policy = _policy()
    seen: list[torch.Tensor] = []
    original = policy.predict_action_chunk

    def recording(observation, normalized=False):
        seen.append(torch.as_tensor(observation["observation.state"]).clone())
        return original(observation, normalized=normalized)

    policy.predict_action_chunk = recording
    context = rclpy.Context()
    rclpy.init(context=context)
    node = VLANode(
        policy=policy,
        context=context,
        parameter_overrides=[Parameter("control_rate", value=20.0), Parameter("max_feature_age", value=1.0)],
    )
    helper = rclpy.create_node("vla_state_helper", context=context)
    actions: list[EndEffectorAction] = []
    helper.create_subscription(EndEffectorAction, "/vla_node/action", actions.append, 50)
    features = helper.create_publisher(StreamFeatures, "features", 10)
    joints = helper.create_publisher(JointState, "joint_states", 10)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    helper.create_publisher(String, "instruction", latched).publish(String(data="lift the red block"))
    executor, thread = spin_in_thread([node, helper], context=context, num_threads=3)

    def wait_for(predicate, timeout=10.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end and not predicate():
            msg = encode_patch_tokens(np.ones((2, 2, 64), np.float32), StreamFeatures(), "float32")
            msg.header.stamp = node.get_clock().now().to_msg()  # a camera image's stamp: its age is measured from it
            features.publish(msg)
            time.sleep(0.03)
        return predicate()

    try:
        # features but no joint_states: the policy cannot run -> stop actions
        assert wait_for(lambda: len(actions) >= 3)
        assert all(a.stop for a in actions) and not seen
        # named entries in any order, extra names ignored
        msg = JointState(name=["gripper_action", "panda_joint1", "tcp_z", "tcp_x"], position=[-1.0, 0.3, 0.12, 0.48])
        joints.publish(msg)
        assert wait_for(lambda: any(not a.stop for a in actions))
        assert seen[-1][0].tolist() == pytest.approx([0.48, 0.12, -1.0])
        # a JointState without a name the policy reads: stop again (after the queued chunk runs out)
        joints.publish(JointState(name=["tcp_x", "tcp_z"], position=[0.5, 0.1]))
        count = len(actions)
        assert wait_for(lambda: len(actions) > count + policy.config.chunk_size + 1)
        assert actions[-1].stop
    finally:
        executor.shutdown()
        thread.join(timeout=5)
        node.destroy_node()
        helper.destroy_node()
        context.try_shutdown()
