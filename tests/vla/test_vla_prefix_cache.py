"""The VLA policy's prompt-prefix reuse (the default way to act): the same actions as the full pass in float32
over a stream of steps, a new instruction or new weights rebuild the reused K/V, and training never uses it."""

from __future__ import annotations

import pytest
import torch

from omnistream_vla.policy import OmniStreamVLAConfig, OmniStreamVLAPolicy

TOLERANCE = 1e-5  # float32; the two ways differ by rounding only (about 1e-7 measured)
STATE_NAMES = ("tcp_x", "tcp_y", "tcp_z", "gripper_opening", "gripper_action")
# The policy `make demo` trains (the instruction before the images, the state token, visual positions, no pooling).
DEMO_LIKE = dict(image_size=128, pool=1, visual_positions=True, instruction_first=True, state_names=STATE_NAMES)


def _policy(**overrides) -> OmniStreamVLAPolicy:
    torch.manual_seed(0)
    policy = OmniStreamVLAPolicy(OmniStreamVLAConfig.preset("debug", backbone=None, **overrides))
    policy.action_query.data.normal_()  # zeros (the recipe's init) would hide position effects
    with torch.no_grad():  # in a random LLM the query's own embedding dominates: let attention (the images) count
        for layer in policy.llm.model.layers:
            layer.self_attn.o_proj.weight.mul_(30.0)
        policy.action_head.arm[-1].weight.mul_(20.0)
    return policy.eval()


def _observation(policy: OmniStreamVLAPolicy, step: int, instruction: str) -> dict:
    config = policy.config
    g = torch.Generator().manual_seed(100 + step)
    obs = {
        f"observation.features.{cam}": torch.randn(1, config.tokens_per_camera, config.vision_hidden_size, generator=g)
        for cam in config.cameras
    }
    obs["task"] = [instruction]
    if config.state_names:
        obs["observation.state"] = torch.randn(1, len(config.state_names), generator=g).numpy()
    return obs


def _both_ways(policy: OmniStreamVLAPolicy, obs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    policy.use_prefix_cache = True
    reused = policy.predict_action_chunk(obs, normalized=True)
    policy.use_prefix_cache = False
    full = policy.predict_action_chunk(obs, normalized=True)
    policy.use_prefix_cache = True
    return reused, full


@pytest.mark.parametrize(
    "overrides",
    [{}, DEMO_LIKE, dict(cameras=("static", "wrist"), instruction_first=True, state_names=STATE_NAMES[:2])],
    ids=["debug", "demo_like", "two_cameras"],
)
def test_reused_prefix_gives_the_full_pass_actions_over_steps_and_an_instruction_change(overrides):
    policy = _policy(**overrides)
    assert policy.use_prefix_cache, "acting reuses the prefix by default"
    instructions = ["pick up the red block", "open the drawer"]
    worst, spread = 0.0, 0.0
    previous = None
    for step in range(8):  # new features (and state) at every step; the instruction changes half way
        instruction = instructions[step // 4]
        reused, full = _both_ways(policy, _observation(policy, step, instruction))
        assert policy.cached_prefix_instruction == instruction
        worst = max(worst, float((reused - full).abs().max()))
        if previous is not None:
            spread = max(spread, float((full - previous).abs().max()))
        previous = full
    assert worst <= TOLERANCE
    assert spread > 100 * TOLERANCE, "the steps must give different actions for the comparison to mean anything"


def test_a_new_instruction_replaces_the_cached_prefix():
    """instruction_first puts the instruction inside the reused prefix: a stale prefix would act on the old one."""
    policy = _policy(**DEMO_LIKE)
    obs = _observation(policy, 0, "pick up the red block")
    first, _ = _both_ways(policy, obs)
    other = dict(obs, task=["open the drawer"])
    reused, full = _both_ways(policy, other)
    assert policy.cached_prefix_instruction == "open the drawer"
    assert float((reused - full).abs().max()) <= TOLERANCE
    assert float((reused - first).abs().max()) > 100 * TOLERANCE, "the instruction must change the action"
    # and back again
    again, _ = _both_ways(policy, obs)
    assert float((again - first).abs().max()) <= TOLERANCE


def test_steps_leave_the_cached_prefix_unchanged():
    policy = _policy(**DEMO_LIKE)
    obs = _observation(policy, 0, "pick up the red block")
    first = policy.predict_action_chunk(obs, normalized=True)
    cache = policy._step_plan.cache
    prefix = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    for step in range(1, 4):
        policy.predict_action_chunk(_observation(policy, step, "pick up the red block"), normalized=True)
    assert policy._step_plan.cache is cache, "the same instruction reuses the same prefix"
    for layer, (keys, values) in zip(cache.layers, prefix):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    assert torch.equal(policy.predict_action_chunk(obs, normalized=True), first)


def test_select_action_streams_the_same_actions_both_ways():
    policy = _policy(**DEMO_LIKE)
    actions = {}
    for reuse in (True, False):
        policy.use_prefix_cache = reuse
        policy.reset()
        actions[reuse] = torch.stack(
            [policy.select_action(_observation(policy, step, "lift the pink block")) for step in range(12)]
        )
    assert float((actions[True] - actions[False]).abs().max()) <= TOLERANCE
    # what acting hands back is an ordinary tensor (not an inference-mode one): callers may change it in place
    actions[True].add_(1.0)


def test_new_weights_rebuild_the_prefix_and_training_never_reuses_it():
    policy = _policy(**DEMO_LIKE)
    obs = _observation(policy, 0, "pick up the red block")
    before, _ = _both_ways(policy, obs)
    with torch.no_grad():
        policy.llm.model.layers[0].self_attn.v_proj.weight.mul_(3.0)  # e.g. an optimiser step (prefix V change)
    after, full = _both_ways(policy, obs)
    assert float((after - full).abs().max()) <= TOLERANCE
    assert float((after - before).abs().max()) > 100 * TOLERANCE
    # a load that puts new parameter objects in place (nothing changes in place)
    state = {k: v * 0.5 if k.endswith("v_proj.weight") else v.clone() for k, v in policy.llm.state_dict().items()}
    policy.llm.load_state_dict(state, assign=True)
    loaded, full = _both_ways(policy, obs)
    assert float((loaded - full).abs().max()) <= TOLERANCE
    assert float((loaded - after).abs().max()) > 100 * TOLERANCE
    # forward (the loss) never takes the reuse path, even for one sample in eval mode without gradients
    policy._step_plan = None
    batch = dict(obs, action=torch.zeros(1, policy.config.chunk_size, 7))
    with torch.no_grad():
        policy(batch)
    assert policy.cached_prefix_instruction is None
    policy.train()
    policy.predict_action_chunk(obs)
    assert policy.cached_prefix_instruction is None, "train mode acts with the full pass"
