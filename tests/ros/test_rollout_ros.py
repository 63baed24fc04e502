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


def test_ros_policy_needs_a_policy_directory(tmp_path):
    from omnistream_cli.policies import make_policy

    with pytest.raises(ValueError, match="ros:DIR"):
        make_policy("ros")
    with pytest.raises(FileNotFoundError, match="no VLA policy directory"):
        make_policy(f"ros:{tmp_path / 'missing'}")
