"""A sim-driven ROS session recorded by recorder_node, converted to LeRobot v3.0, and trained on.

The pybullet tabletop (scripted expert) publishes its cameras, robot state (JointState) and the expert's EndEffectorAction
through real rclpy publishers; recorder_node records them in episodes started/stopped through its services.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
from ros_helpers import call_trigger, spin_in_thread, stop_spinning, wait_for

FPS = 20
PERIOD_NS = 1_000_000_000 // FPS
STEPS = 10


@pytest.fixture(scope="module")
def sim_session(tmp_path_factory):
    """Two tabletop episodes published live and recorded; returns (bag, what was published per frame)."""
    import rclpy
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.time import Time
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from omnistream_msgs.msg import EndEffectorAction
    from omnistream_perception.ros.image import rgb_to_image
    from omnistream_sim.tabletop import ScriptedExpert, TabletopConfig, TabletopEnv
    from omnistream_vla.ros.recorder_node import RecorderNode

    out = tmp_path_factory.mktemp("sim_bags")
    topics = ["/static/image", "/wrist/image", "/robot_state", "/ee_action"]
    published = []
    rclpy.init()
    try:
        recorder = RecorderNode(
            parameter_overrides=[
                Parameter("topics", value=topics),
                Parameter("output_dir", value=str(out)),
                Parameter("bag_name", value="tabletop"),
                Parameter("min_free_mb", value=0.0),
            ]
        )
        sim = Node("tabletop_sim")
        image_pubs = {c: sim.create_publisher(Image, f"/{c}/image", 50) for c in ("static", "wrist")}
        state_pub = sim.create_publisher(JointState, "/robot_state", 50)
        action_pub = sim.create_publisher(EndEffectorAction, "/ee_action", 50)
        instruction_pub = sim.create_publisher(String, "/instruction", 10)
        clients = {n: sim.create_client(Trigger, f"/recorder_node/{n}") for n in ("start", "stop", "mark_success")}
        executor, thread = spin_in_thread([recorder, sim])
        wait_for(lambda: all(recorder.recorded_subscriptions.get(t) for t in topics), what="recorder subscriptions")
        wait_for(lambda: instruction_pub.get_subscription_count() > 0, what="instruction matching")
        with TabletopEnv(TabletopConfig.debug(max_steps=STEPS)) as env:
            expert = ScriptedExpert(env)
            for episode, (seed, task) in enumerate([(0, None), (1, None)]):
                obs = env.reset(seed=seed, task=task)
                expert.reset()
                instruction_pub.publish(String(data=env.instruction))
                wait_for(lambda env=env: recorder.control.instruction == env.instruction, what="instruction")
                assert call_trigger(clients["start"]).success
                base = sim.get_clock().now().nanoseconds + 20_000_000
                success = False
                for k in range(STEPS):
                    action = expert.select_action(obs)
                    stamp = base + k * PERIOD_NS
                    while sim.get_clock().now().nanoseconds < stamp:
                        time.sleep(0.002)
                    header = Time(nanoseconds=stamp).to_msg()
                    for cam, pub in image_pubs.items():
                        msg = rgb_to_image(obs["images"][cam])
                        msg.header.stamp, msg.header.frame_id = header, cam
                        pub.publish(msg)
                    state = JointState(name=[f"s{j}" for j in range(len(obs["state"]))])
                    state.header.stamp, state.position = header, obs["state"].astype(np.float64).tolist()
                    state_pub.publish(state)
                    act = EndEffectorAction(mode="relative", gripper=float(action[6]))
                    act.header.stamp = header
                    act.translation.x, act.translation.y, act.translation.z = (float(v) for v in action[:3])
                    act.rotation.x, act.rotation.y, act.rotation.z = (float(v) for v in action[3:6])
                    action_pub.publish(act)
                    published.append(
                        {
                            "episode": episode,
                            "instruction": env.instruction,
                            "action": action.astype(np.float32),
                            "state": obs["state"].astype(np.float32),
                            "static": obs["images"]["static"].copy(),
                        }
                    )
                    obs, success, _, _ = env.step(action)
                wait_for(
                    lambda: recorder.control.recorder.buffered_messages >= 4 * STEPS + 2, what="messages"
                )  # + instruction, start
                if success:
                    assert call_trigger(clients["mark_success"]).success
                reply = call_trigger(clients["stop"])
                assert reply.success, reply.message
        stop_spinning(executor, thread, [recorder, sim])
    finally:
        rclpy.try_shutdown()
    return out / "tabletop", published


@pytest.fixture(scope="module")
def sim_dataset(sim_session, tmp_path_factory):
    from omnistream_cli.main import main as cli_main

    bag, published = sim_session
    out = tmp_path_factory.mktemp("sim_ds") / "ds"
    rc = cli_main(
        ["data", "bag-to-lerobot", str(bag), "--out", str(out), "--camera-topics", "/static/image,/wrist/image",
         "--camera-names", "static,wrist", "--state-topic", "/robot_state", "--action-topic", "/ee_action",
         "--instruction-topic", "/instruction", "--fps", str(FPS)]
    )  # fmt: skip
    assert rc == 0
    return out, published


@pytest.mark.ros
def test_sim_session_converts_exactly(sim_dataset):
    from omnistream_train.lerobot_dataset import LeRobotDataset

    root, published = sim_dataset
    ds = LeRobotDataset(root, image_format="uint8_hwc")
    assert len(ds) == len(published) == 2 * STEPS
    assert ds.meta.episodes["length"].tolist() == [STEPS, STEPS]
    for i, frame in enumerate(published):
        item = ds[i]
        assert int(item["episode_index"]) == frame["episode"] and int(item["frame_index"]) == i % STEPS
        assert item["timestamp"].item() == pytest.approx((i % STEPS) / FPS)
        assert item["task"] == frame["instruction"]
        np.testing.assert_allclose(item["action"].numpy(), frame["action"], atol=1e-6)
        np.testing.assert_allclose(item["observation.state"].numpy(), frame["state"], atol=1e-6)
        assert ds.meta.features["observation.state"]["names"][:2] == ["s0", "s1"]
        error = np.abs(item["observation.images.static"].astype(np.float32) - frame["static"]).mean()
        assert error < 6, f"frame {i}: mean abs error {error:.1f} after AV1"
        assert item["observation.images.wrist"].shape == (48, 48, 3)


@pytest.mark.ros
def test_train_vla_runs_on_recorded_dataset(sim_dataset, tmp_path, fixture_a):
    if importlib.util.find_spec("omnistream_train.vla") is None:
        pytest.skip("omnistream_train.vla (the training agent's `omnistream train vla`) is not in the tree yet")
    from omnistream_cli.main import main as cli_main

    root, _ = sim_dataset
    rc = cli_main(
        ["train", "vla", "--preset", "debug", "--dataset", str(root), "--backbone", str(fixture_a),
         "--max-steps", "2", "--out", str(tmp_path / "vla"), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    assert (tmp_path / "vla" / "metrics.jsonl").is_file()
