"""CALVIN on the real simulator (only where ``CALVIN_ENV_ROOT`` points to a mees/calvin_env checkout whose
dependencies import; CI has none and reports SKIPPED), plus the CLI's errors without one."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import SHARED

from omnistream_cli.commands.sim import _eval_calvin as evaluate
from omnistream_cli.main import UserError, main
from omnistream_sim.calvin import load_instructions, run_evaluation
from omnistream_sim.calvin.env import calvin_env_commit, resolve_calvin_env_root
from omnistream_sim.calvin.sequences import chains_from_json
from omnistream_sim.policies import RandomPolicy


def _args(**overrides):
    base = dict(env="calvin", policy="random", episodes=30, out="unused", seed=None, chains=2, shard=None,
                calvin_env_root=None, renderer="tiny", videos=0, device="cpu", quiet=True)  # fmt: skip
    base.update(overrides)
    return SimpleNamespace(**base)


def test_missing_calvin_env_is_a_clear_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CALVIN_ENV_ROOT", raising=False)
    with pytest.raises(UserError, match="CALVIN_ENV_ROOT"):
        evaluate(_args())
    with pytest.raises(UserError, match="not a calvin_env checkout"):
        evaluate(_args(calvin_env_root=str(tmp_path)))
    code = main(["sim", "eval", "--env", "calvin", "--policy", "random", "--chains", "2", "--out", str(tmp_path)])
    assert code == 2 and "calvin_env checkout" in capsys.readouterr().err


def test_bad_chain_count_fails_before_anything_slow(tmp_path, monkeypatch):
    for name in ("calvin_env", "conf", "data"):
        (tmp_path / name).mkdir()
    (tmp_path / "conf" / "config_data_collection.yaml").write_text("")
    assert resolve_calvin_env_root(tmp_path) == tmp_path.resolve()
    with pytest.raises(UserError, match="--chains"):
        evaluate(_args(calvin_env_root=str(tmp_path), chains=1001))
    with pytest.raises(ValueError, match="git checkout"):
        calvin_env_commit(tmp_path)


@pytest.fixture(scope="module")
def calvin_sim():
    root = os.environ.get("CALVIN_ENV_ROOT")
    if not root:
        pytest.skip("CALVIN_ENV_ROOT is not set (point it to a mees/calvin_env checkout to run CALVIN for real)")
    from omnistream_sim.calvin.env import make_calvin_env

    sim = make_calvin_env(root, renderer=os.environ.get("CALVIN_RENDERER", "tiny"))
    yield sim
    sim.close()


def test_real_env_resets_to_the_chain_state_and_the_oracle_sees_tasks(calvin_sim):
    chains = chains_from_json(json.loads((SHARED / "calvin" / "eval_chains.json").read_text())[:1])
    chain = chains[0]
    assert chain.initial_state["led"] == 1
    obs = calvin_sim.env.reset(robot_obs=chain.robot_obs.copy(), scene_obs=chain.scene_obs.copy())
    assert obs["rgb_obs"]["rgb_static"].shape == (200, 200, 3) and obs["rgb_obs"]["rgb_gripper"].shape == (84, 84, 3)
    assert obs["robot_obs"].shape == (15,) and obs["scene_obs"].shape == (24,)
    # one physics step after the reset: blocks settle by a few mrad
    np.testing.assert_allclose(obs["scene_obs"], chain.scene_obs, atol=1e-2)
    start = calvin_sim.env.get_info()
    led_off = chain.scene_obs.copy()
    led_off[5] = 0.0
    calvin_sim.env.reset(robot_obs=chain.robot_obs.copy(), scene_obs=led_off)
    end = calvin_sim.env.get_info()
    assert calvin_sim.oracle.get_task_info_for_set(start, end, {"turn_off_led"}) == {"turn_off_led"}
    assert calvin_sim.oracle.get_task_info_for_set(start, end, {"open_drawer"}) == set()
    assert len(calvin_sim.commit) >= 40


def test_real_env_runs_the_protocol(calvin_sim, tmp_path):
    chains = chains_from_json(json.loads((SHARED / "calvin" / "eval_chains.json").read_text())[:2])
    results = run_evaluation(
        calvin_sim.env, calvin_sim.oracle, RandomPolicy(seed=0), policy_name="random", chains=1, ep_len=20,
        all_chains=chains, out_dir=tmp_path, videos=1, progress=False, instructions=load_instructions(),
        calvin_env_commit=calvin_sim.commit,
    )  # fmt: skip
    record = results["records"][0]
    assert record["steps"][-1] <= 20 and results["calvin_env_commit"] == calvin_sim.commit
    assert (tmp_path / "videos" / "chain_0000.mp4").is_file()
