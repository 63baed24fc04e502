"""CALVIN's 1000 evaluation chains and their initial states, reimplemented from the protocol's facts.

The official evaluation (mees/calvin, ``multistep_sequences.py`` and ``evaluation/utils.py``) works on a
symbolic scene state (LED, light bulb, slider, drawer, where each block is, whether a block is grasped):

* the initial states are every assignment in which one or two blocks lie on the table and no slider side
  holds two blocks (192 states); 1000 chains are split over them like ``numpy.array_split``;
* for state ``i`` a legacy ``RandomState(i)`` draws 5 distinct task names (``choice(..., replace=False)``)
  until the chain is feasible: every subtask has exactly one applicable precondition/effect rule from the
  state left by the previous one, and no two subtasks share a category;
* the (state, chain) pairs are shuffled with ``RandomState(0)``;
* the physical initial state: a fixed robot pose, the slider/drawer/switch/LED/bulb from the symbolic
  state, block positions from the slider sides or two table spots whose order, and the three block yaws,
  come from a ``RandomState`` seeded with FNV-1 (32 bit) of ``str(state.values())``.

The official code hashes with pyhash's ``fnv1_32``; that is FNV-1 with offset basis 0 over the UTF-16-LE
bytes of the string (``../shared/specs/simulators.md``), not the usual UTF-8 / 0x811C9DC5 variant.
``tests/sim/test_calvin_sequences.py`` checks all 1000 chains against ``../shared/calvin/eval_chains.json``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

NUM_CHAINS = 1000
CHAIN_LENGTH = 5

# ------------------------------------------------------------------------------------------------- hashing
FNV_PRIME_32 = 16777619


def fnv1_32(data: bytes, offset_basis: int = 0) -> int:
    """FNV-1 (multiply, then xor) over bytes; pyhash's ``fnv1_32`` default seed is an offset basis of 0."""
    h = offset_basis
    for byte in data:
        h = (h * FNV_PRIME_32) & 0xFFFFFFFF
        h ^= byte
    return h


def state_seed(state: dict) -> int:
    """The seed the official code derives from a symbolic state: fnv1_32 of ``str(state.values())``."""
    return fnv1_32(str(state.values()).encode("utf-16-le"))


# ---------------------------------------------------------------------------------------- symbolic domain
BLOCKS = ("red", "blue", "pink")
SLIDER_SIDES = ("slider_right", "slider_left")

# The ordered choices of every symbolic variable; the order fixes the enumeration of initial states and the
# key order of each state dict (which the FNV seed depends on).
STATE_VALUES: dict[str, list] = {
    "led": [0, 1],
    "lightbulb": [0, 1],
    "slider": ["right", "left"],
    "drawer": ["closed", "open"],
    "red_block": ["table", "slider_right", "slider_left"],
    "blue_block": ["table", "slider_right", "slider_left"],
    "pink_block": ["table", "slider_right", "slider_left"],
    "grasped": [0],
}


@dataclass(frozen=True)
class Rule:
    """One way a task can apply: every ``condition`` entry must hold (a list means 'any of'); ``effect`` is written."""

    condition: dict
    effect: dict = field(default_factory=dict)

    def applies(self, state: dict) -> bool:
        for key, wanted in self.condition.items():
            if isinstance(wanted, list):
                if state[key] not in wanted:
                    return False
            elif state[key] != wanted:
                return False
        return True


def _block(colour: str) -> str:
    return f"{colour}_block"


def _task_rules() -> dict[str, tuple[int, list[Rule]]]:
    """Task name -> (category, rules). Insertion order is the official task order (it drives the sampling)."""
    rules: dict[str, tuple[int, list[Rule]]] = {}
    on_table_free = {
        colour: Rule({_block(colour): "table", "grasped": 0}, {_block(colour): "table"}) for colour in BLOCKS
    }
    for verb in ("rotate", "push"):  # category 1: rotating/pushing a block that stays on the table
        for colour in BLOCKS:
            for direction in ("right", "left"):
                rules[f"{verb}_{colour}_block_{direction}"] = (1, [on_table_free[colour]])
    rules["move_slider_left"] = (2, [Rule({"slider": "right", "grasped": 0}, {"slider": "left"})])
    rules["move_slider_right"] = (2, [Rule({"slider": "left", "grasped": 0}, {"slider": "right"})])
    rules["open_drawer"] = (3, [Rule({"drawer": "closed", "grasped": 0}, {"drawer": "open"})])
    rules["close_drawer"] = (3, [Rule({"drawer": "open", "grasped": 0}, {"drawer": "closed"})])
    for colour in BLOCKS:
        b = _block(colour)
        lifted = {b: "grasped", "grasped": 1}
        rules[f"lift_{colour}_block_table"] = (4, [Rule({b: "table", "grasped": 0}, lifted)])
        # a block on a slider side is reachable only when the sliding door covers the other side
        rules[f"lift_{colour}_block_slider"] = (
            5,
            [
                Rule({b: "slider_left", "slider": "right", "grasped": 0}, lifted),
                Rule({b: "slider_right", "slider": "left", "grasped": 0}, lifted),
            ],
        )
        rules[f"lift_{colour}_block_drawer"] = (6, [Rule({b: "drawer", "drawer": "open", "grasped": 0}, lifted)])
    rules["place_in_slider"] = (
        7,
        [
            Rule({_block(c): "grasped", "slider": side, "grasped": 1}, {_block(c): f"slider_{side}", "grasped": 0})
            for c in BLOCKS
            for side in ("right", "left")
        ],
    )
    rules["place_in_drawer"] = (
        7,
        [
            Rule({_block(c): "grasped", "drawer": "open", "grasped": 1}, {_block(c): "drawer", "grasped": 0})
            for c in BLOCKS
        ],
    )
    pairs = [(top, bottom) for top in BLOCKS for bottom in BLOCKS if top != bottom]
    rules["stack_block"] = (
        10,
        [
            Rule(
                {_block(top): "grasped", _block(bottom): "table", "grasped": 1},
                {_block(top): "stacked_top", _block(bottom): "stacked_bottom", "grasped": 0},
            )
            for top, bottom in pairs
        ],
    )
    rules["unstack_block"] = (
        11,
        [
            Rule(
                {_block(top): "stacked_top", _block(bottom): "stacked_bottom", "grasped": 0},
                {_block(top): "table", _block(bottom): "table"},
            )
            for top, bottom in pairs
        ],
    )
    for thing, key in (("lightbulb", "lightbulb"), ("led", "led")):
        rules[f"turn_on_{thing}"] = (8, [Rule({key: 0, "grasped": 0}, {key: 1})])
        rules[f"turn_off_{thing}"] = (8, [Rule({key: 1, "grasped": 0}, {key: 0})])
    # pushing the one table block into the open drawer, while the other two sit in the slider
    push_rules = []
    for colour in BLOCKS:
        others = [c for c in BLOCKS if c != colour]
        condition = {_block(colour): "table", **{_block(o): list(SLIDER_SIDES) for o in others}}
        condition.update({"drawer": "open", "grasped": 0})
        push_rules.append(Rule(condition, {_block(colour): "drawer", "grasped": 0}))
    rules["push_into_drawer"] = (9, push_rules)
    return rules


TASK_RULES = _task_rules()
TASK_NAMES: tuple[str, ...] = tuple(TASK_RULES)
TASK_CATEGORY = {name: category for name, (category, _) in TASK_RULES.items()}


def next_states(state: dict, task: str) -> list[dict]:
    """Every symbolic state ``task`` can lead to from ``state`` (one per applicable rule)."""
    if task not in TASK_RULES:
        raise ValueError(f"unknown CALVIN task {task!r}; known: {', '.join(TASK_NAMES)}")
    return [{**state, **rule.effect} for rule in TASK_RULES[task][1] if rule.applies(state)]


def is_feasible_chain(state: dict, chain) -> bool:
    """Each subtask has exactly one applicable rule in turn, and all categories differ."""
    for task in chain:
        successors = next_states(state, task)
        if len(successors) != 1:
            return False
        state = successors[0]
    categories = [TASK_CATEGORY[t] for t in chain]
    return len(set(categories)) == len(categories)


def initial_symbolic_states() -> list[dict]:
    """The 192 start states (LED x bulb x slider x drawer x 12 block placements): one or two blocks on the table, at most one block per slider side."""
    states = []
    for values in itertools.product(*STATE_VALUES.values()):
        if values.count("table") in (1, 2) and values.count("slider_right") < 2 and values.count("slider_left") < 2:
            states.append(dict(zip(STATE_VALUES, values)))
    return states


def _split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``numpy.array_split(range(total), parts)``: the first ``total % parts`` parts get one more."""
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def _sample_chains(state: dict, count: int, state_index: int) -> list[tuple[str, ...]]:
    """Rejection-sample ``count`` feasible chains with ``RandomState(state_index)``.

    ``RandomState.choice(n, 5, replace=False)`` is ``permutation(n)[:5]``; calling ``permutation`` directly
    draws the same stream about 4x faster, and cheap index checks (first subtask applicable, categories
    distinct) reject most draws before the full symbolic check. ~2 million draws for 1000 chains.
    """
    rng = np.random.RandomState(state_index)
    categories = [TASK_CATEGORY[t] for t in TASK_NAMES]
    first_ok = [len(next_states(state, t)) == 1 for t in TASK_NAMES]
    chains: list[tuple[str, ...]] = []
    while len(chains) < count:
        idx = rng.permutation(len(TASK_NAMES))[:CHAIN_LENGTH].tolist()
        if not first_ok[idx[0]] or len({categories[i] for i in idx}) < CHAIN_LENGTH:
            continue
        chain = tuple(TASK_NAMES[i] for i in idx)
        if is_feasible_chain(state, chain):
            chains.append(chain)
    return chains


# ---------------------------------------------------------------------------------- physical initial state
# The evaluation's fixed start pose: tcp xyz, tcp euler, gripper width, 7 joints, gripper action (open).
INITIAL_ROBOT_OBS = np.array(
    [0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
     -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928, 1.0]
)  # fmt: skip
BLOCK_ON_SLIDER = {
    "slider_left": np.array([-2.40851662e-01, 9.24044687e-02, 4.60990009e-01]),
    "slider_right": np.array([7.03416330e-02, 9.24044687e-02, 4.60990009e-01]),
}
TABLE_SPOTS = (
    np.array([5.00000896e-02, -1.20000177e-01, 4.59990009e-01]),
    np.array([2.29995412e-01, -1.19995140e-01, 4.59990010e-01]),
)
BLOCK_YAW_RANGE = (math.pi / 2 - math.pi / 8, math.pi / 2 + math.pi / 8)
SLIDER_LEFT_POSITION = 0.28  # slider joint when the sliding door is on the left
DRAWER_OPEN_POSITION = 0.22
SWITCH_ON_POSITION = 0.088  # the switch that lights the bulb


def initial_env_state(state: dict) -> tuple[np.ndarray, np.ndarray]:
    """Symbolic start state -> ``(robot_obs (15,), scene_obs (24,))`` to reset calvin_env to."""
    missing = [k for k in STATE_VALUES if k not in state]
    if missing:
        raise ValueError(f"symbolic state lacks {missing}")
    rng = np.random.RandomState(state_seed(state))
    spots = list(TABLE_SPOTS)
    rng.shuffle(spots)  # which table spot comes first depends on the state's seed

    scene = np.zeros(24)
    scene[0] = SLIDER_LEFT_POSITION if state["slider"] == "left" else 0.0
    scene[1] = DRAWER_OPEN_POSITION if state["drawer"] == "open" else 0.0
    # scene[2] is the button (released)
    scene[3] = SWITCH_ON_POSITION if state["lightbulb"] == 1 else 0.0
    scene[4] = state["lightbulb"]
    scene[5] = state["led"]
    # Blocks, each xyz + euler at 6 + 6k; a table block takes the first free table spot in red/blue/pink order,
    # except that the pink block always takes the second spot (as the official code does).
    for k, colour in enumerate(BLOCKS):
        where = state[_block(colour)]
        if where in BLOCK_ON_SLIDER:
            position = BLOCK_ON_SLIDER[where]
        elif colour == "red":
            position = spots[0]
        elif colour == "blue":
            position = spots[1] if state["red_block"] == "table" else spots[0]
        else:
            position = spots[1]
        scene[6 + 6 * k : 9 + 6 * k] = position
        scene[11 + 6 * k] = rng.uniform(*BLOCK_YAW_RANGE)  # drawn for every block, on the table or not
    return INITIAL_ROBOT_OBS.copy(), scene


# ----------------------------------------------------------------------------------------------- the chains
@dataclass(frozen=True)
class EvalChain:
    """One evaluation chain: symbolic start, 5 subtasks, and the physical state to reset to."""

    index: int
    initial_state: dict
    subtasks: tuple[str, ...]
    robot_obs: np.ndarray
    scene_obs: np.ndarray
    seed: int

    def to_dict(self) -> dict:
        return {
            "initial_state": dict(self.initial_state),
            "subtasks": list(self.subtasks),
            "robot_obs": self.robot_obs.tolist(),
            "scene_obs": self.scene_obs.tolist(),
            "seed": self.seed,
        }


def generate_chains(num_chains: int = NUM_CHAINS, progress: bool = False) -> list[EvalChain]:
    """The official evaluation chains in the official order (~25 s of CPU for 1000; cached per process).

    Like the original, the split over start states depends on ``num_chains``: a smaller evaluation should take
    the first chains of the 1000 (what ``--chains N`` does), not ``generate_chains(N)``.
    """
    if num_chains < 1:
        raise ValueError(f"num_chains must be >= 1, got {num_chains}")
    if num_chains not in _CHAIN_CACHE:
        _CHAIN_CACHE[num_chains] = _generate_chains(num_chains, progress)
    return list(_CHAIN_CACHE[num_chains])


_CHAIN_CACHE: dict[int, tuple[EvalChain, ...]] = {}


def _generate_chains(num_chains: int, progress: bool) -> tuple[EvalChain, ...]:
    from tqdm import tqdm

    states = initial_symbolic_states()
    pairs: list[tuple[dict, tuple[str, ...]]] = []
    sizes = _split_sizes(num_chains, len(states))
    bar = tqdm(list(enumerate(zip(states, sizes))), desc="CALVIN chains", unit="state", disable=not progress)
    for index, (state, count) in bar:
        pairs.extend((state, chain) for chain in _sample_chains(state, count, index))
    np.random.RandomState(0).shuffle(pairs)
    chains = []
    for index, (state, subtasks) in enumerate(pairs):
        robot_obs, scene_obs = initial_env_state(state)
        chains.append(EvalChain(index, dict(state), subtasks, robot_obs, scene_obs, state_seed(state)))
    return tuple(chains)


def chains_from_json(records: list[dict]) -> list[EvalChain]:
    """Chains as stored in ``eval_chains.json`` (the committed reference of the official generator)."""
    return [
        EvalChain(
            i,
            dict(r["initial_state"]),
            tuple(r["subtasks"]),
            np.asarray(r["robot_obs"], dtype=np.float64),
            np.asarray(r["scene_obs"], dtype=np.float64),
            int(r["seed"]),
        )
        for i, r in enumerate(records)
    ]
