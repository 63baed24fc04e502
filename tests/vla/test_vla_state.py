"""Robot-state input (LeRobot's ``observation.state``): one extra LLM token from named, normalised state entries.

Covers the policy (shapes, statistics saved and loaded, the action depends on the state, clear errors), the
trainer (state names from the tabletop's layout, statistics from the dataset), the in-process harness adapter
and vla_node reading the state BY NAME from sensor_msgs/JointState (actions with a state, stops without one).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from omnistream_vla.policy import OmniStreamVLAConfig, OmniStreamVLAPolicy  # noqa: E402

STATE = ("tcp_x", "tcp_z", "gripper_action")


def _policy(seed: int = 0) -> OmniStreamVLAPolicy:
    torch.manual_seed(seed)
    policy = OmniStreamVLAPolicy(OmniStreamVLAConfig.preset("debug", backbone=None, state_names=STATE)).eval()
    policy.action_query.data.normal_()
    policy.state_encoder.set_statistics([0.5, 0.1, 0.0], [0.05, 0.04, 1.0])
    return policy


def _batch(state) -> dict:
    rng = np.random.default_rng(0)
    return {
        "observation.features.static": torch.from_numpy(rng.standard_normal((2, 4, 64)).astype(np.float32)),
        "task": ["lift the red block", "lift the blue block"],
        "observation.state": torch.as_tensor(state, dtype=torch.float32),
    }


def test_state_token_changes_the_action_and_round_trips(tmp_path):
    policy = _policy()
    state = [[0.5, 0.1, 1.0], [0.45, 0.02, -1.0]]
    chunk = policy.predict_action_chunk(_batch(state))
    assert chunk.shape == (2, policy.config.chunk_size, 7)
    moved = policy.predict_action_chunk(_batch([[0.55, 0.2, -1.0], [0.45, 0.02, -1.0]]))
    assert not torch.allclose(moved[0], chunk[0]), "the first sample's state changed: its action must change"
    assert torch.allclose(moved[1], chunk[1], atol=1e-6), "samples are independent"

    policy.save_pretrained(tmp_path / "p")
    loaded = OmniStreamVLAPolicy.from_pretrained(tmp_path / "p")
    assert loaded.config.state_names == STATE
    assert torch.equal(loaded.state_encoder.mean, torch.tensor([0.5, 0.1, 0.0]))
    assert torch.equal(loaded.state_encoder.std, torch.tensor([0.05, 0.04, 1.0]))
    assert torch.equal(loaded.predict_action_chunk(_batch(state)), chunk)
    # the projector's learning rate for the state encoder (it projects into the LLM like the visual projector)
    groups = {g["name"]: g["params"] for g in loaded.parameter_groups()}
    assert any(p is loaded.state_encoder.net[0].weight for p in groups["projector"])


def test_state_errors_name_what_is_missing():
    policy = _policy()
    batch = _batch([[0.5, 0.1, 1.0], [0.45, 0.02, -1.0]])
    del batch["observation.state"]
    with pytest.raises(ValueError, match="observation.state"):
        policy.predict_action_chunk(batch)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        policy.predict_action_chunk(_batch([[0.5, 0.1], [0.4, 0.0]]))
    with pytest.raises(ValueError, match="unique"):
        OmniStreamVLAConfig.preset("debug", state_names=("tcp_x", "tcp_x"))
    # a policy without state ignores a state it is given (the recipe's policies keep working everywhere)
    plain = OmniStreamVLAPolicy(OmniStreamVLAConfig.preset("debug", backbone=None)).eval()
    assert plain.state_encoder is None
    assert plain.predict_action_chunk(_batch([[0.5, 0.1, 1.0], [0.4, 0.0, 1.0]])).shape[0] == 2


def test_trainer_selects_named_state_and_saves_its_statistics():
    from omnistream_sim.tabletop.env import STATE_NAMES
    from omnistream_train.vla import EpisodeData, VLATrainConfig, build_policy, select_state

    rng = np.random.default_rng(0)
    episodes = [
        EpisodeData({}, np.zeros((n, 7), np.float32), "lift the red block", rng.normal(size=(n, 15)).astype(np.float32))
        for n in (5, 7)
    ]
    config = VLATrainConfig.from_preset("debug", state=list(STATE))
    names, states = select_state(config, episodes, "tabletop")
    assert names == list(STATE) and states.shape == (12, 3)
    columns = [STATE_NAMES.index(n) for n in STATE]
    assert np.array_equal(states[:5], episodes[0].state[:, columns])
    assert select_state(VLATrainConfig.from_preset("debug"), episodes, "tabletop") == ([], None)
    assert select_state(VLATrainConfig.from_preset("debug", state="all"), episodes, "tabletop")[1].shape == (12, 15)
    with pytest.raises(ValueError, match="unknown state names"):
        select_state(VLATrainConfig.from_preset("debug", state=["elbow"]), episodes, "tabletop")

    stats = {k: np.zeros(7, np.float32) for k in ("min", "max", "mean", "std", "q01", "q99")}
    policy = build_policy(config, stats, torch.device("cpu"), (-1.0, 1.0), names, states)
    assert torch.allclose(policy.state_encoder.mean, torch.from_numpy(states.mean(0)))
    assert torch.allclose(policy.state_encoder.std, torch.from_numpy(states.std(0)).clamp_min(1e-3))


def test_checkpoint_adapter_picks_the_policy_state_by_name(tmp_path):
    from omnistream_sim.policies import VLACheckpointPolicy

    _policy().save_pretrained(tmp_path / "p")
    adapter = VLACheckpointPolicy(tmp_path / "p")
    state = np.arange(15, dtype=np.float32)
    batch = adapter.observation_to_batch(
        {"images": {"static": np.zeros((64, 64, 3), np.uint8)}, "instruction": "lift", "state": state}
    )
    assert batch["observation.state"].tolist() == [[0.0, 2.0, 14.0]]  # tcp_x, tcp_z, gripper_action
    with pytest.raises(ValueError, match="no 'state'"):
        adapter.observation_to_batch({"images": {"static": np.zeros((64, 64, 3), np.uint8)}, "instruction": "lift"})


def test_visual_positions_tell_identical_tokens_apart_on_any_square_grid(tmp_path):
    torch.manual_seed(0)
    config = OmniStreamVLAConfig.preset("debug", backbone=None, visual_positions=True, cameras=("static", "wrist"))
    policy = OmniStreamVLAPolicy(config).eval()
    policy.action_query.data.normal_()
    # identical features everywhere: only the position code can tell the tokens apart; the wrist grid (6x6) may
    # differ from the static one (4x4), the encoding uses normalised coordinates
    static, wrist = torch.ones(1, 16, 64), torch.ones(1, 36, 64)
    inputs, mask, _ = policy.build_inputs([static, wrist], ["lift the red block"])
    prefix = len(policy.processor.encode_instruction("x").prefix)
    visual = inputs[0, prefix : prefix + 16]
    assert torch.unique(visual.round(decimals=5), dim=0).shape[0] == 16, "every static token is distinct"
    assert not torch.allclose(policy.visual_positions(16, 0), policy.visual_positions(16, 1)), "cameras differ"
    plain = OmniStreamVLAPolicy(OmniStreamVLAConfig.preset("debug", backbone=None)).eval()
    plain_inputs, _, _ = plain.build_inputs([static], ["lift the red block"])
    assert torch.unique(plain_inputs[0, prefix : prefix + 16].round(decimals=5), dim=0).shape[0] == 1
    batch = {"observation.features.static": static, "observation.features.wrist": wrist, "task": ["lift"]}
    base = policy.predict_normalized(batch)[0]
    policy.save_pretrained(tmp_path / "p")
    loaded = OmniStreamVLAPolicy.from_pretrained(tmp_path / "p")
    assert loaded.config.visual_positions
    assert torch.equal(loaded.predict_normalized(batch)[0], base)
