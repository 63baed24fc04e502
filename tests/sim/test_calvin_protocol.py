"""CALVIN protocol loop against a scripted test double of calvin_env (no simulator needed).

``ScriptedCalvinEnvDouble`` is NOT a simulator: it plays back, per chain, after how many steps each subtask
counts as solved (or never), and logs every call so the tests can check the protocol's order of operations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED

from omnistream_sim.calvin import (
    EP_LEN,
    load_instructions,
    merge_results,
    run_evaluation,
    summarize_records,
)
from omnistream_sim.calvin.protocol import evaluate_chain, to_observation
from omnistream_sim.calvin.sequences import chains_from_json
from omnistream_sim.policies import RandomPolicy
from omnistream_sim.report import load_results


def _chains_with_distinct_start_states(count: int):
    # the double recognises a chain by the scene it is reset to, so no two chains may share a start state
    chains, seen = [], set()
    for chain in chains_from_json(json.loads((SHARED / "calvin" / "eval_chains.json").read_text())[:200]):
        if tuple(chain.scene_obs.tolist()) not in seen:
            seen.add(tuple(chain.scene_obs.tolist()))
            chains.append(chain)
    return chains[:count]


CHAINS = _chains_with_distinct_start_states(30)


def completions_for(chain_index: int) -> int:
    """The scripted outcome: chain i solves (i % 6) subtasks in a row, then fails."""
    return chain_index % 6


class ScriptedCalvinEnvDouble:
    """Test double with calvin_env's interface; subtask k of chain i is solved after ``3 + k`` steps when
    ``k < completions_for(i)``, otherwise never. ``get_info()`` marks the start of a subtask (the protocol calls
    it exactly once per subtask); ``step`` returns the info the oracle double reads."""

    def __init__(self, chains):
        self.by_scene = {tuple(c.scene_obs.tolist()): c for c in chains}
        self.log: list[tuple] = []
        self.chain = None

    def _obs(self):
        return {
            "rgb_obs": {"rgb_static": np.zeros((8, 8, 3), np.uint8), "rgb_gripper": np.zeros((4, 4, 3), np.uint8)},
            "robot_obs": np.zeros(15),
            "scene_obs": np.zeros(24),
        }

    def reset(self, robot_obs=None, scene_obs=None):
        self.chain = self.by_scene[tuple(np.asarray(scene_obs).tolist())]
        self.position, self.steps = -1, 0
        self.log.append(("reset", self.chain.index))
        return self._obs()

    def get_obs(self):
        return self._obs()

    def get_info(self):
        self.position += 1
        self.steps = 0
        self.log.append(("get_info", self.position))
        return {"position": self.position}

    def step(self, action):
        action = np.asarray(action)
        assert action.shape == (7,) and action[6] in (-1.0, 1.0) and np.abs(action[:6]).max() <= 1.0
        self.steps += 1
        solved = self.position < completions_for(self.chain.index) and self.steps >= 3 + self.position
        task = self.chain.subtasks[self.position]
        return self._obs(), 0, False, {"position": self.position, "solved": {task} if solved else set()}


class OracleDouble:
    def __init__(self):
        self.calls = 0

    def get_task_info_for_set(self, start_info, end_info, task_filter):
        self.calls += 1
        assert start_info["position"] == end_info["position"]  # start_info is taken at the subtask's start
        return end_info["solved"] & task_filter


class LoggingPolicy:
    def __init__(self, log):
        self.log, self.instructions = log, []

    def reset(self):
        self.log.append(("policy.reset",))

    def select_action(self, observation):
        self.instructions.append(observation["instruction"])
        assert observation["images"]["static"].shape == (8, 8, 3) and observation["state"].shape == (15,)
        return np.array([2.0, 0, 0, 0, 0, 0, 0.3], np.float32)  # out of range on purpose: the loop converts


@pytest.fixture(scope="module")
def instructions():
    return load_instructions()


def test_chain_stops_at_first_failure_with_the_official_call_order(instructions):
    env, oracle = ScriptedCalvinEnvDouble(CHAINS), OracleDouble()
    policy = LoggingPolicy(env.log)
    chain = next(c for c in CHAINS if completions_for(c.index) == 2)  # solves 2 subtasks, fails the third
    record, frames = evaluate_chain(env, policy, oracle, chain, instructions, ep_len=50)
    assert record["completed"] == 2 and not record["success"]
    assert record["steps"] == [3, 4, 50]  # solved at the first successful step; the failure runs ep_len steps
    # reset once per chain, then per subtask: policy.reset and get_info before any step; no reset in between
    kinds = [e[0] for e in env.log]
    assert kinds == ["reset", "policy.reset", "get_info", "policy.reset", "get_info", "policy.reset", "get_info"]
    assert policy.instructions[0] == instructions[chain.subtasks[0]]
    assert policy.instructions[-1] == instructions[chain.subtasks[2]]
    assert oracle.calls == 3 + 4 + 50
    assert frames == []


def test_full_chain_and_default_episode_length(instructions):
    env, oracle = ScriptedCalvinEnvDouble(CHAINS), OracleDouble()
    full = next(c for c in CHAINS if completions_for(c.index) == 5)
    record, _ = evaluate_chain(env, LoggingPolicy(env.log), oracle, full, instructions)
    assert record["completed"] == 5 and record["success"] and record["steps"] == [3, 4, 5, 6, 7]
    none = next(c for c in CHAINS if completions_for(c.index) == 0)
    record, _ = evaluate_chain(env, LoggingPolicy(env.log), oracle, none, instructions)
    assert record["completed"] == 0 and record["steps"] == [EP_LEN] == [360]


def test_observations_name_the_cameras_as_training_does():
    from omnistream_sim.calvin.cameras import CAMERAS
    from omnistream_train.calvin_to_lerobot import CAMERAS as CONVERTER_CAMERAS

    obs = to_observation(ScriptedCalvinEnvDouble(CHAINS)._obs(), "open the drawer")
    assert set(obs["images"]) == {"static", "gripper"} == set(CAMERAS) == set(CONVERTER_CAMERAS)
    assert obs["images"]["gripper"].shape == (4, 4, 3)  # rgb_gripper, the hand camera


def test_metrics_arithmetic():
    records = [{"completed": c, "subtasks": ["a", "b", "c", "d", "e"], "success": c == 5} for c in (0, 1, 5, 3)]
    summary = summarize_records(records)
    assert summary["avg_len"] == pytest.approx((0 + 1 + 5 + 3) / 4)
    assert summary["chain_success"] == {"1": 0.75, "2": 0.5, "3": 0.5, "4": 0.25, "5": 0.25}
    assert summary["success_rate"] == 0.25 and summary["episodes"] == 4
    # per task: solved attempts and the one each chain stopped at
    assert summary["per_task"]["a"] == {"episodes": 4, "successes": 3, "success_rate": 0.75}
    assert summary["per_task"]["b"] == {"episodes": 3, "successes": 2, "success_rate": pytest.approx(2 / 3)}
    assert summary["per_task"]["e"] == {"episodes": 1, "successes": 1, "success_rate": 1.0}
    with pytest.raises(ValueError, match="no chain records"):
        summarize_records([])
    with pytest.raises(ValueError, match="not a CALVIN chain record"):
        summarize_records([{"success": True}])


def _run(out_dir, shard, instructions, chains=24, videos=0):
    env, oracle = ScriptedCalvinEnvDouble(CHAINS), OracleDouble()
    return run_evaluation(
        env,
        oracle,
        RandomPolicy(seed=7),
        policy_name="random",
        chains=chains,
        shard=shard,
        seed=7,
        out_dir=out_dir,
        videos=videos,
        instructions=instructions,
        ep_len=12,
        progress=False,
        all_chains=CHAINS,
        calvin_env_commit="test-double",
    )


def test_run_evaluation_writes_results_and_avg_len(tmp_path, instructions):
    results = _run(tmp_path / "all", (0, 1), instructions, videos=1)
    expected = [completions_for(c.index) for c in CHAINS[:24]]
    assert results["avg_len"] == pytest.approx(np.mean(expected))
    assert results["episodes"] == 24 and results["calvin_env_commit"] == "test-double"
    on_disk = load_results(tmp_path / "all")
    assert on_disk["avg_len"] == results["avg_len"]
    assert on_disk["chain_success"]["5"] == pytest.approx(np.mean([c == 5 for c in expected]))
    assert "avg_len" in (tmp_path / "all" / "report.md").read_text()
    video = f"videos/chain_{CHAINS[0].index:04d}.mp4"
    assert on_disk["videos"] == [video] and (tmp_path / "all" / video).is_file()


def test_shards_merge_to_the_unsharded_result(tmp_path, instructions):
    whole = _run(tmp_path / "whole", (0, 1), instructions)
    shard_dirs = []
    for i in range(3):
        shard = _run(tmp_path / f"shard{i}", (i, 3), instructions)
        assert shard["shard"] == f"{i}/3" and shard["episodes"] == 8
        shard_dirs.append(tmp_path / f"shard{i}")
    merged = merge_results(shard_dirs, tmp_path / "merged")
    for key in ("avg_len", "chain_success", "per_task", "success_rate", "episodes", "calvin_env_commit"):
        assert merged[key] == whole[key], key
    strip = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in merged["records"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in whole["records"]
    ]
    assert load_results(tmp_path / "merged")["avg_len"] == whole["avg_len"]
    with pytest.raises(ValueError, match="overlap"):
        merge_results([shard_dirs[0], shard_dirs[0]])


def test_merge_refuses_different_calvin_env_commits(tmp_path, instructions):
    _run(tmp_path / "a", (0, 2), instructions)
    _run(tmp_path / "b", (1, 2), instructions)
    path = tmp_path / "b" / "results.json"
    data = json.loads(path.read_text())
    data["calvin_env_commit"] = "other"
    for record in data["records"]:
        record["calvin_env_commit"] = "other"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="different calvin_env commits"):
        merge_results([tmp_path / "a", path])


def test_bad_chain_count_and_shard_are_clear_errors(instructions):
    with pytest.raises(ValueError, match="--chains"):
        _run(None, (0, 1), instructions, chains=31)
    with pytest.raises(ValueError, match="shard"):
        _run(None, (3, 3), instructions)
    with pytest.raises(ValueError, match="empty"):
        _run(None, (2, 3), instructions, chains=2)


def test_cli_merge_uses_the_calvin_summary(tmp_path, instructions):
    from omnistream_cli.main import main

    whole = _run(tmp_path / "whole", (0, 1), instructions)
    for i in range(2):
        _run(tmp_path / f"s{i}", (i, 2), instructions)
    code = main(["sim", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "merged")])
    assert code == 0
    merged = load_results(tmp_path / "merged")
    assert merged["avg_len"] == whole["avg_len"] and merged["chain_success"] == whole["chain_success"]
