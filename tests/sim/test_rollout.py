"""The one rollout loop, the policies and the results/report files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omnistream_cli.policies import make_policy
from omnistream_sim.policies import RandomPolicy
from omnistream_sim.policy_protocol import Policy
from omnistream_sim.report import build_results, load_results, merge_results, summarize_records, write_results
from omnistream_sim.rollout import run_episode


class CountingEnv:
    """A stand-in env for the loop's bookkeeping: succeeds when the summed x actions reach ``goal``."""

    def __init__(self, goal: float = 3.0, max_steps: int = 50):
        self.goal, self.max_steps, self.total, self.steps, self.actions = goal, max_steps, 0.0, 0, []

    def observation(self):
        return {
            "images": {"static": np.full((4, 4, 3), self.steps, np.uint8)},
            "state": np.zeros(15),
            "instruction": "x",
        }

    def step(self, action):
        self.actions.append(np.asarray(action).copy())
        self.total += float(action[0])
        self.steps += 1
        success = self.total >= self.goal
        return self.observation(), success, success or self.steps >= self.max_steps, {}


class ChunkPolicy:
    def __init__(self, k: int):
        self.k, self.calls, self.resets = k, 0, 0

    def reset(self):
        self.resets += 1

    def select_action(self, observation):
        self.calls += 1
        chunk = np.zeros((self.k, 7), np.float32)
        chunk[:, 0], chunk[:, 6] = 1.0, 1.0
        return chunk


def test_chunks_execute_open_loop_and_stop_at_success():
    env, policy = CountingEnv(goal=5.0), ChunkPolicy(k=4)
    assert isinstance(policy, Policy)
    result = run_episode(env, policy, env.observation(), max_steps=50, video_camera="static")
    assert result.success and result.steps == 5
    assert policy.calls == 2 and policy.resets == 1  # 4 actions from the first chunk, 1 from the second
    assert len(result.frames) == 6  # the first observation and one per step


def test_converter_is_applied_to_every_action_and_max_steps_is_respected():
    env, policy = CountingEnv(goal=1e9), ChunkPolicy(k=3)
    seen = []

    def halve(action):
        seen.append(action.copy())
        out = action.copy()
        out[0] *= 0.5
        return out

    result = run_episode(env, policy, env.observation(), max_steps=7, convert=halve)
    assert not result.success and result.steps == 7 and len(seen) == 7
    assert all(a[0] == 0.5 for a in env.actions)


def test_relative_action_clips_and_thresholds_the_gripper():
    from omnistream_sim.rollout import relative_action

    out = relative_action(np.array([2.0, -3.0, 0.5, 0, 0, 0, 0.2]))
    np.testing.assert_array_equal(out, [1.0, -1.0, 0.5, 0, 0, 0, 1.0])
    assert relative_action(np.array([0, 0, 0, 0, 0, 0, -0.1]))[6] == -1.0


@pytest.mark.parametrize("bad", [np.zeros(6), np.zeros((2, 3)), np.array([np.nan] * 7)])
def test_bad_policy_output_is_a_clear_error(bad):
    class Bad:
        def reset(self):
            pass

        def select_action(self, observation):
            return bad

    env = CountingEnv()
    with pytest.raises(ValueError, match="policy"):
        run_episode(env, Bad(), env.observation(), max_steps=3)


def test_random_policy_is_seeded_per_episode():
    a, b = RandomPolicy(seed=3), RandomPolicy(seed=3)
    obs = {}
    first = [a.select_action(obs) for _ in range(5)]
    assert np.array_equal(first, [b.select_action(obs) for _ in range(5)])
    a.reset()
    second = a.select_action(obs)
    assert not np.array_equal(second, first[0])
    assert all(np.all(np.abs(x[:6]) <= 1) and x[6] in (-1.0, 1.0) for x in first)


def test_random_policy_streams_depend_on_the_episode_seed_not_on_history():
    a, b = RandomPolicy(seed=1), RandomPolicy(seed=1)
    for _ in range(3):  # a ran three earlier episodes, b none
        a.reset()
        a.select_action({})
    a.set_episode_seed(42)
    b.set_episode_seed(42)
    a.reset()
    b.reset()
    assert np.array_equal([a.select_action({}) for _ in range(4)], [b.select_action({}) for _ in range(4)])


def test_make_policy_rejects_unknown_specs(tmp_path):
    with pytest.raises(ValueError, match="choose scripted"):
        make_policy("expert")
    with pytest.raises(ValueError, match="checkpoint directory"):
        make_policy("ckpt:")
    with pytest.raises(FileNotFoundError, match="no VLA checkpoint"):
        make_policy(f"ckpt:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="only for the tabletop"):
        make_policy("scripted", env_name="calvin")


def test_tabletop_evaluation_writes_results_report_and_video(tmp_path):
    pytest.importorskip("pybullet", reason="pybullet is not installed")
    from omnistream_sim.rollout import evaluate_tabletop
    from omnistream_sim.tabletop import ScriptedExpert, TabletopConfig

    config = TabletopConfig.debug()
    results = evaluate_tabletop(ScriptedExpert(), episodes=3, out_dir=tmp_path, config=config, videos=1,
                                policy_name="scripted", progress=False)  # fmt: skip
    assert results["success_rate"] == 1.0 and results["episodes"] == 3
    assert [r["task"] for r in results["records"]] == ["lift_red", "lift_green", "lift_blue"]
    on_disk = load_results(tmp_path)
    assert on_disk["success_rate"] == 1.0 and len(on_disk["records"]) == 3
    assert "| lift_red | 1 | 1 | 1.000 |" in (tmp_path / "report.md").read_text()
    (video,) = on_disk["videos"]
    assert (tmp_path / video).stat().st_size > 1000
    import av

    with av.open(str(tmp_path / video)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == on_disk["records"][0]["steps"] + 1

    random = evaluate_tabletop(RandomPolicy(seed=0), episodes=3, out_dir=None, config=config, progress=False)
    assert random["success_rate"] < 1.0


def test_swapped_instructions_show_another_task_but_judge_the_real_one():
    pytest.importorskip("pybullet", reason="pybullet is not installed")
    from omnistream_sim.rollout import evaluate_tabletop
    from omnistream_sim.tabletop import ScriptedExpert, TabletopConfig

    results = evaluate_tabletop(ScriptedExpert(), episodes=3, out_dir=None, config=TabletopConfig.debug(),
                                tasks="lift", swap_instructions=True, progress=False)  # fmt: skip
    for record in results["records"]:
        assert record["task"].split("_")[-1] not in record["instruction"]
    # The privileged expert ignores language, so it still succeeds: the swap changes only what is shown.
    assert results["success_rate"] == 1.0 and results["swap_instructions"] is True


def test_summary_and_markdown():
    records = [{"episode": i, "task": "a" if i < 4 else "b", "success": i not in (1, 5)} for i in range(6)]
    summary = summarize_records(records)
    assert summary["success_rate"] == pytest.approx(4 / 6)
    assert summary["per_task"]["a"] == {"episodes": 4, "successes": 3, "success_rate": 0.75}
    lo, hi = summary["success_rate_ci95"]
    assert 0 < lo < 4 / 6 < hi < 1
    with pytest.raises(ValueError, match="no episode records"):
        summarize_records([])
    with pytest.raises(ValueError, match="'success'"):
        summarize_records([{"task": "a"}])


def test_merge_shards_recomputes_and_rejects_overlaps(tmp_path):
    def shard(name, indices, **extra):
        records = [{"episode": i, "task": "t", "success": i % 2 == 0} for i in indices]
        write_results(build_results(records, env="tabletop", policy="random", **extra), tmp_path / name)
        return tmp_path / name

    a = shard("a", [2, 3], seconds=1.0, seed=5, videos=["videos/x.mp4"])
    b = shard("b", [0, 1, 4], seconds=2.0, seed=5, videos=[])
    merged = merge_results([a, b], tmp_path / "merged")
    assert [r["episode"] for r in merged["records"]] == [0, 1, 2, 3, 4]
    assert merged["episodes"] == 5 and merged["successes"] == 3
    assert merged["seed"] == 5 and merged["shards"] == {"count": 2, "seconds": [1.0, 2.0]}
    assert merged["videos"] == ["videos/x.mp4"]
    assert json.loads((tmp_path / "merged" / "results.json").read_text())["episodes"] == 5
    with pytest.raises(ValueError, match="overlap"):
        merge_results([a, a])
    other = tmp_path / "other"
    write_results(build_results([{"episode": 9, "success": True}], env="calvin", policy="random"), other)
    with pytest.raises(ValueError, match="different evaluations"):
        merge_results([a, other])


def test_checkpoint_policy_in_process(tmp_path):
    pytest.importorskip("pybullet", reason="pybullet is not installed")
    from omnistream_perception.model import OmniStreamModel
    from omnistream_sim.rollout import evaluate_tabletop
    from omnistream_sim.tabletop import TabletopConfig
    from omnistream_vla.policy.factory import init_policy

    OmniStreamModel.from_preset("debug").save_pretrained(tmp_path / "backbone")
    init_policy(tmp_path / "vla", preset="debug", backbone=tmp_path / "backbone", seed=0)
    policy = make_policy(f"ckpt:{tmp_path / 'vla'}")
    assert policy.cameras == ("static",)
    results = evaluate_tabletop(policy, episodes=1, out_dir=None, config=TabletopConfig.debug(max_steps=6),
                                progress=False)  # fmt: skip
    assert results["records"][0]["steps"] == 6 and results["policy_ms_per_step"] > 0
    with pytest.raises(ValueError, match="lacks"):
        policy.observation_to_batch({"images": {}, "instruction": "lift the red block"})
