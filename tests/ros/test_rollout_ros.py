"""``--policy ros``: a tabletop episode closed through the real perception_node and vla_node (debug checkpoints)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pybullet", reason="pybullet is not installed")
pytest.importorskip("rclpy", reason="rclpy (ROS 2) is not installed")

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def debug_policy_dir(tmp_path_factory):
    from omnistream_perception.model import OmniStreamModel
    from omnistream_vla.policy.factory import init_policy

    root = tmp_path_factory.mktemp("ros_policy")
    OmniStreamModel.from_preset("debug").save_pretrained(root / "backbone")
    init_policy(root / "vla", preset="debug", backbone=root / "backbone", seed=0)
    return root / "vla"


class Recording:
    """Wraps a policy and keeps every action it returns."""

    def __init__(self, policy):
        self.policy, self.actions = policy, []
        self.needs_images = True

    def reset(self):
        self.policy.reset()

    def select_action(self, observation):
        action = self.policy.select_action(observation)
        self.actions.append(np.asarray(action).copy())
        return action


def test_ros_episode_runs_in_lock_step_and_is_deterministic(debug_policy_dir):
    from omnistream_cli.policies import RosPolicy, make_policy
    from omnistream_sim.rollout import evaluate_tabletop
    from omnistream_sim.tabletop import TabletopConfig

    config = TabletopConfig.debug(max_steps=12)
    runs = []
    for _ in range(2):
        policy = make_policy(f"ros:{debug_policy_dir}", timeout=30.0)
        assert isinstance(policy, RosPolicy)
        recording = Recording(policy)
        try:
            results = evaluate_tabletop(recording, episodes=2, out_dir=None, config=config, progress=False)
            # One VLA action per control step, none of them a safety stop: every step saw fresh features.
            assert policy.vla.actions_published == policy.steps == 24
            assert policy.stops == 0
        finally:
            policy.close()
        runs.append((results, np.stack(recording.actions)))
    (first, actions_a), (_, actions_b) = runs
    assert [r["steps"] for r in first["records"]] == [12, 12]
    assert np.all(np.abs(actions_a[:, :6]) <= 1.0) and set(np.unique(actions_a[:, 6])) <= {-1.0, 1.0}
    assert np.abs(actions_a[:, :6]).max() > 0, "the random-init VLA still commands motion"
    np.testing.assert_allclose(actions_a, actions_b, atol=1e-5)


def test_ros_policy_via_cli(debug_policy_dir, tmp_path):
    from omnistream_cli.main import main

    out = tmp_path / "ros"
    code = main(["sim", "eval", "--policy", f"ros:{debug_policy_dir}", "--episodes", "1", "--max-steps", "5",
                 "--image-size", "64", "--videos", "1", "--quiet", "--out", str(out)])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["policy"] == f"ros:{debug_policy_dir}" and results["records"][0]["steps"] == 5
    assert len(results["videos"]) == 1
    assert results["ros_steps"] == 5 and results["ros_stop_actions"] == 0
    assert results["ros_perception_ms_per_frame"] > 0 and results["ros_vla_ms_per_step"] > 0


def test_two_closed_loops_on_one_machine_do_not_drive_each_other(debug_policy_dir, tmp_path):
    """Two `sim eval --policy ros` processes at once (parallel demos, sharded evaluations): each harness owns /clock
    and the same node names, so each runs in a DDS domain of its own; in one domain they fed each other features and
    clocks (stops, then timeouts)."""
    import os
    import subprocess
    import sys

    from omnistream_cli.policies import private_domain_id

    (first, lock_a), (second, lock_b) = private_domain_id(), private_domain_id()
    assert first != second, "a claimed domain is not handed out twice"
    lock_a.close()
    assert private_domain_id()[0] == first, "a released domain is free again"
    lock_b.close()
    env = {**os.environ, "ROS_DOMAIN_ID": "0"}
    command = [sys.executable, "-m", "omnistream_cli.main", "sim", "eval", "--policy", f"ros:{debug_policy_dir}",
               "--episodes", "2", "--max-steps", "8", "--image-size", "64", "--videos", "0", "--quiet"]  # fmt: skip
    runs = [subprocess.Popen([*command, "--out", str(tmp_path / f"run{i}")], env=env) for i in range(2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    results = [json.loads((tmp_path / f"run{i}" / "results.json").read_text()) for i in range(2)]
    for result in results:
        assert result["ros_steps"] == 16 and result["ros_stop_actions"] == 0
    assert [r["steps"] for r in results[0]["records"]] == [r["steps"] for r in results[1]["records"]]


def test_ros_policy_needs_a_policy_directory(tmp_path):
    from omnistream_cli.policies import make_policy

    with pytest.raises(ValueError, match="ros:DIR"):
        make_policy("ros")
    with pytest.raises(FileNotFoundError, match="no VLA policy directory"):
        make_policy(f"ros:{tmp_path / 'missing'}")
