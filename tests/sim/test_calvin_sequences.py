"""CALVIN evaluation chains: FNV-1 seeds, initial states and all 1000 chains against the official file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED

from omnistream_sim.calvin import sequences as seq

CHAINS_FILE = SHARED / "calvin" / "eval_chains.json"


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    if not CHAINS_FILE.is_file():
        pytest.fail(f"the official chains are missing: {CHAINS_FILE} (CI clones with ../shared beside the repo)")
    return json.loads(CHAINS_FILE.read_text())


def test_fnv1_32_test_vectors():
    assert seq.fnv1_32("abc".encode("utf-16-le")) == 2203671488
    text = "dict_values([1, 1, 'left', 'open', 'slider_left', 'table', 'slider_right', 0])"
    assert seq.fnv1_32(text.encode("utf-16-le")) == 2138410836
    # the usual UTF-8 / 0x811C9DC5 variant is a different hash (the common mistake)
    assert seq.fnv1_32(text.encode("utf-8"), offset_basis=0x811C9DC5) != 2138410836
    state = {"led": 1, "lightbulb": 1, "slider": "left", "drawer": "open", "red_block": "slider_left",
             "blue_block": "table", "pink_block": "slider_right", "grasped": 0}  # fmt: skip
    assert seq.state_seed(state) == 2138410836


def test_initial_states_enumeration():
    states = seq.initial_symbolic_states()
    assert len(states) == 192
    assert all(list(s) == list(seq.STATE_VALUES) for s in states)  # key order drives the FNV seed
    for s in states:
        blocks = [s["red_block"], s["blue_block"], s["pink_block"]]
        assert blocks.count("table") in (1, 2)
        assert blocks.count("slider_left") <= 1 and blocks.count("slider_right") <= 1


def test_symbolic_rules():
    state = {"led": 0, "lightbulb": 1, "slider": "right", "drawer": "open", "red_block": "table",
             "blue_block": "slider_left", "pink_block": "slider_right", "grasped": 0}  # fmt: skip
    assert seq.next_states(state, "turn_on_led") == [{**state, "led": 1}]
    assert seq.next_states(state, "turn_on_lightbulb") == []
    assert seq.next_states(state, "push_into_drawer") == [{**state, "red_block": "drawer"}]
    lifted = seq.next_states(state, "lift_blue_block_slider")  # blue is on the left, the door on the right
    assert lifted == [{**state, "blue_block": "grasped", "grasped": 1}]
    assert seq.next_states(state, "lift_pink_block_slider") == []
    assert seq.is_feasible_chain(state, ["turn_on_led", "lift_blue_block_slider", "place_in_drawer", "close_drawer"])
    # two subtasks of one category are not a valid chain
    assert not seq.is_feasible_chain(state, ["turn_on_led", "turn_off_lightbulb"])
    with pytest.raises(ValueError, match="unknown CALVIN task"):
        seq.next_states(state, "fly_away")
    assert len(seq.TASK_NAMES) == 34


def test_initial_env_state_matches_reference_for_every_chain(reference):
    for i, record in enumerate(reference):
        robot_obs, scene_obs = seq.initial_env_state(record["initial_state"])
        assert robot_obs.tolist() == record["robot_obs"], i
        assert scene_obs.tolist() == record["scene_obs"], i  # exact, not approximate
        assert seq.state_seed(record["initial_state"]) == record["seed"], i
    with pytest.raises(ValueError, match="lacks"):
        seq.initial_env_state({"led": 1})


def test_reference_chains_are_feasible(reference):
    for record in reference:
        assert seq.is_feasible_chain(record["initial_state"], record["subtasks"]), record["subtasks"]


def test_generator_reproduces_all_1000_official_chains(reference):
    # ~25 s of CPU: the rejection sampler draws ~2 million permutations, exactly as the official code does.
    chains = seq.generate_chains()
    assert len(chains) == len(reference) == 1000
    for chain, record in zip(chains, reference):
        assert chain.to_dict() == record, chain.index
    assert [c.index for c in chains] == list(range(1000))
    again = seq.generate_chains()  # cached per process, and callers get their own list
    again.pop()
    assert len(seq.generate_chains()) == 1000


def test_chains_from_json_round_trip(reference):
    chains = seq.chains_from_json(reference[:5])
    assert [c.to_dict() for c in chains] == reference[:5]
    assert isinstance(chains[0].robot_obs, np.ndarray) and chains[3].index == 3


def test_generate_chains_rejects_bad_count():
    with pytest.raises(ValueError, match="num_chains"):
        seq.generate_chains(0)
