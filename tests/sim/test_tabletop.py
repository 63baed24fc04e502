"""The built-in tabletop: determinism, success checks, the scripted expert, camera ground truth, data generators."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pybullet", reason="pybullet is not installed")

from omnistream_sim.tabletop import (  # noqa: E402
    TASK_SETS,
    TASKS,
    Episode,
    ScriptedExpert,
    TabletopConfig,
    TabletopEnv,
    backproject,
    generate_demonstrations,
    generate_geometry_sequences,
    load_demonstrations,
    resolve_tasks,
    task_from_instruction,
)
from omnistream_sim.tabletop.data import record_expert_episode  # noqa: E402
from omnistream_sim.tabletop.tasks import LIFT_HEIGHT, PUSH_DISTANCE  # noqa: E402


@pytest.fixture(scope="module")
def env():
    with TabletopEnv(TabletopConfig.debug()) as e:
        yield e


def _run_expert(env: TabletopEnv, seed: int, task: str, steps: int | None = None):
    expert = ScriptedExpert(env)
    obs = env.reset(seed=seed, task=task)
    states, success = [obs["state"]], False
    for _ in range(steps or env.config.max_steps):
        obs, success, done, _ = env.step(expert.select_action(obs))
        states.append(obs["state"])
        if done:
            break
    return np.stack(states), success, obs


def test_same_seed_same_episode_regardless_of_history(env):
    first = env.reset(seed=7)
    states_a, _, last_a = _run_expert(env, 7, env.task.name, steps=15)
    _run_expert(env, 3, "push_left_blue", steps=10)  # unrelated history in between
    second = env.reset(seed=7)
    states_b, _, last_b = _run_expert(env, 7, env.task.name, steps=15)
    np.testing.assert_array_equal(first["images"]["static"], second["images"]["static"])
    np.testing.assert_array_equal(first["scene"], second["scene"])
    np.testing.assert_array_equal(states_a, states_b)
    np.testing.assert_array_equal(last_a["images"]["wrist"], last_b["images"]["wrist"])
    other = env.reset(seed=8)
    assert not np.array_equal(other["scene"], first["scene"]), "different seeds must give different layouts"


def test_task_draw_and_instruction_follow_the_seed(env):
    drawn = {env.reset(seed=s).get("instruction") for s in range(12)}
    assert len(drawn) > 1
    env.reset(seed=5)
    task, instruction = env.task.name, env.instruction
    env.reset(seed=5)
    assert (env.task.name, env.instruction) == (task, instruction)
    assert task_from_instruction(instruction) is TASKS[task]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_success_checks_true_and_false(name):
    task = TASKS[name]
    start = {c: np.array([0.5, 0.0, 0.025]) for c in ("red", "green", "blue")}
    moved = {c: p.copy() for c, p in start.items()}
    if task.kind == "lift":
        moved[task.colour][2] += LIFT_HEIGHT + 0.01
        almost = {c: p.copy() for c, p in start.items()}
        almost[task.colour][2] += LIFT_HEIGHT - 0.01
    else:
        moved[task.colour][1] -= PUSH_DISTANCE + 0.01
        almost = {c: p.copy() for c, p in start.items()}
        almost[task.colour][1] -= PUSH_DISTANCE - 0.01
    assert task.success(start, moved)
    assert not task.success(start, almost)
    assert not task.success(start, start)
    other = next(c for c in start if c != task.colour)
    wrong_block = {c: p.copy() for c, p in moved.items()}
    wrong_block[task.colour], wrong_block[other] = start[task.colour].copy(), moved[task.colour].copy()
    assert not task.success(start, wrong_block), "moving another block must not count"
    if task.kind == "push_left":
        lifted_left = {c: p.copy() for c, p in moved.items()}
        lifted_left[task.colour][2] += 0.1
        assert not task.success(start, lifted_left), "carrying the block left is not pushing it"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_scripted_expert_solves_each_task_and_idle_robot_does_not(env, name):
    _, success, _ = _run_expert(env, seed=11, task=name)
    assert success, f"expert failed {name}"
    env.reset(seed=11, task=name)
    for _ in range(10):
        _, idle_success, _, _ = env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))
    assert not idle_success


def test_action_convention_moves_tcp_by_pos_step(env):
    obs = env.reset(seed=2, task="lift_red")
    before = obs["state"][:3].copy()
    for _ in range(5):
        obs, *_ = env.step(np.array([1.0, 0, 0, 0, 0, 0, 1.0]))
    moved = obs["state"][:3] - before
    assert moved[0] == pytest.approx(5 * env.config.pos_step, abs=0.02)
    assert abs(moved[1]) < 0.01
    with pytest.raises(ValueError, match="7 finite numbers"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="7 finite numbers"):
        env.step(np.array([np.nan, 0, 0, 0, 0, 0, 1]))


def test_observation_layout(env):
    obs = env.reset(seed=1)
    size, wrist = env.config.image_size, env.config.wrist_image_size
    assert obs["images"]["static"].shape == (size, size, 3) and obs["images"]["static"].dtype == np.uint8
    assert obs["images"]["wrist"].shape == (wrist, wrist, 3)
    assert obs["depth"]["static"].dtype == np.float32 and obs["depth"]["static"].shape == (size, size)
    assert obs["state"].shape == (15,) and obs["scene"].shape == (9,)
    assert obs["state"][14] == 1.0 and obs["state"][6] > 0.07  # gripper open
    env.render_images = False
    try:
        assert "images" not in env.observation()
    finally:
        env.render_images = True


def test_static_depth_backprojects_to_the_table_and_blocks(env):
    obs = env.reset(seed=4)
    depth, K, c2w = obs["depth"]["static"], obs["intrinsics"]["static"], obs["cam_to_world"]["static"]
    assert np.allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(c2w[:3, 3], env.config.static_eye, atol=1e-5)
    points = backproject(depth, K, c2w)
    # The lower image rows see only the table top (z = 0) in front of the blocks.
    bottom = points[-max(2, depth.shape[0] // 10) :].reshape(-1, 3)
    np.testing.assert_allclose(bottom[:, 2], 0.0, atol=1e-4)
    # Each block's top-face centre projects to a pixel whose depth back-projects onto that face.
    for centre in obs["scene"].reshape(3, 3):
        top = centre + [0, 0, env.config.block_size / 2]
        cam = np.linalg.inv(c2w) @ np.append(top, 1.0)
        u, v = K[0, 0] * cam[0] / cam[2] + K[0, 2], K[1, 1] * cam[1] / cam[2] + K[1, 2]
        hit = points[int(round(v)), int(round(u))]
        assert abs(hit[2] - top[2]) < 0.012, f"block top at {top}, depth says {hit}"


@pytest.mark.parametrize("size", [(64, 64), (47, 33)])
def test_intrinsics_hold_for_any_size_and_camera_roll(env, size):
    from omnistream_sim.tabletop.cameras import CameraSpec, look_at_view_matrix, render

    env.reset(seed=4)
    spec = CameraSpec(*size, fov_deg=55)
    frame = render(env._p, spec, look_at_view_matrix((0.9, 0.6, 0.5), (0.5, 0.0, 0.0), (0.3, 1.0, 0.0)))
    points = backproject(frame.depth, frame.intrinsics, frame.cam_to_world)
    table = (np.abs(points[..., 2]) < 0.03) & (frame.depth < spec.far - 0.1)
    assert table.mean() > 0.3
    assert np.median(np.abs(points[..., 2][table])) < 1e-4


def test_wrist_camera_moves_with_the_hand_and_sees_the_table(env):
    obs = env.reset(seed=4, task="lift_red")
    pose0 = obs["cam_to_world"]["wrist"].copy()
    points = backproject(obs["depth"]["wrist"], obs["intrinsics"]["wrist"], pose0)
    centre = points[points.shape[0] // 2, points.shape[1] // 2]
    assert centre[2] < 0.06, "the wrist camera looks down at the table/blocks"
    for _ in range(4):
        obs, *_ = env.step(np.array([0, 1.0, 0, 0, 0, 0, 1.0]))
    assert obs["cam_to_world"]["wrist"][1, 3] - pose0[1, 3] == pytest.approx(4 * env.config.pos_step, abs=0.02)


def test_geometry_sequences_poses_and_depth_agree_across_frames(tmp_path):
    seqs = generate_geometry_sequences(2, frames=4, seed=3, out_dir=tmp_path, image_size=48, progress=False)
    again = generate_geometry_sequences(1, frames=4, seed=3, image_size=48, progress=False)
    np.testing.assert_array_equal(seqs[0].rgb, again[0].rgb)
    seq = seqs[0]
    assert seq.rgb.shape == (4, 48, 48, 3) and seq.depth.shape == (4, 48, 48) and seq.cam_to_world.shape == (4, 4, 4)
    assert not np.allclose(seq.cam_to_world[0], seq.cam_to_world[-1]), "the camera must move"
    assert all(s.depth.max() < 2.9 for s in seqs), "the room bounds every view: no pixel at the far plane"
    # Back-project frame 0, re-project into frame 1: the predicted depth matches frame 1's depth where visible.
    K = seq.intrinsics
    pts = backproject(seq.depth[0], K, seq.cam_to_world[0]).reshape(-1, 3)
    pts = pts[seq.depth[0].reshape(-1) < 2.5]
    cam = (np.linalg.inv(seq.cam_to_world[1]) @ np.c_[pts, np.ones(len(pts))].T).T[:, :3]
    u = np.round(K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2]).astype(int)
    v = np.round(K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]).astype(int)
    inside = (u >= 0) & (u < 48) & (v >= 0) & (v < 48) & (cam[:, 2] > 0)
    assert inside.mean() > 0.5
    error = np.abs(seq.depth[1][v[inside], u[inside]] - cam[inside, 2]) / cam[inside, 2]
    assert np.median(error) < 0.02
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["sequences"]) == 2
    loaded = type(seq).load(tmp_path / index["sequences"][0]["file"])
    np.testing.assert_array_equal(loaded.depth, seq.depth)


def test_demonstrations_format_and_roundtrip(tmp_path):
    episodes = generate_demonstrations(3, seed=0, out_dir=tmp_path, config=TabletopConfig.debug(), tasks="lift",
                                       progress=False)  # fmt: skip
    assert [e.task for e in episodes] == list(TASK_SETS["lift"])
    for ep in episodes:
        assert ep.success
        T = len(ep)
        assert ep.arrays["static"].shape == (T, 64, 64, 3) and ep.arrays["wrist"].shape == (T, 48, 48, 3)
        assert ep.arrays["state"].shape == (T, 15) and ep.arrays["static_depth"].shape == (T, 64, 64)
        assert ep.arrays["static_cam_to_world"].shape == (4, 4) and ep.arrays["wrist_cam_to_world"].shape == (T, 4, 4)
        actions = ep.arrays["actions"]
        assert np.all(np.abs(actions[:, :6]) <= 1.0) and set(np.unique(actions[:, 6])) <= {-1.0, 1.0}
        assert (actions[:, 6] == -1.0).any(), "a lift closes the gripper"
    loaded = load_demonstrations(tmp_path)
    assert [e.instruction for e in loaded] == [e.instruction for e in episodes]
    np.testing.assert_array_equal(loaded[1].arrays["actions"], episodes[1].arrays["actions"])
    assert isinstance(loaded[0], Episode) and loaded[0].seed == episodes[0].seed


def test_bad_task_names_are_clear_errors(env):
    with pytest.raises(ValueError, match="unknown tabletop task"):
        resolve_tasks("lift,fly_red")
    with pytest.raises(ValueError, match="unknown tabletop task"):
        env.reset(seed=0, task="fly_red")


def test_slots_layout_shuffles_colours_over_fixed_slots_and_the_expert_solves_it():
    config = TabletopConfig.debug(layout="slots")
    slots = np.asarray(config.slots)
    orders = set()
    with TabletopEnv(config) as slot_env:
        for seed in range(12):
            scene = slot_env.reset(seed=seed)["scene"].reshape(3, 3)
            # every block stands within the jitter of a distinct slot
            d = np.abs(scene[:, None, :2] - slots[None]).max(-1)
            assert (d.min(1) <= config.slot_jitter + 1e-3).all() and len(set(d.argmin(1))) == 3
            orders.add(tuple(d.argmin(1)))
        assert len(orders) > 2, "the colours must be shuffled over the slots"
        _, success, _ = _run_expert(slot_env, 3, "lift_green")
        assert success
    with pytest.raises(ValueError, match="layout"):
        TabletopConfig(layout="grid")


def test_dart_noise_perturbs_the_motion_but_keeps_clean_expert_labels():
    config = TabletopConfig.debug(layout="slots", start_noise=(0.05, 0.15, 0.04))
    with TabletopEnv(config) as noisy_env:
        clean = record_expert_episode(noisy_env, 11, "lift_red")
        noisy = record_expert_episode(noisy_env, 11, "lift_red", action_noise=0.3)
        again = record_expert_episode(noisy_env, 11, "lift_red", action_noise=0.3)
        assert clean.success and noisy.success
        np.testing.assert_array_equal(noisy.arrays["actions"], again.arrays["actions"])  # seeded noise
        states = noisy.arrays["state"]
        assert not np.array_equal(states[: len(clean.arrays["state"])], clean.arrays["state"][: len(states)])
        # every label is what the expert would command from that very observation (its phase machine replayed)
        # (the first steps: the arm is still approaching, the blocks stand where reset put them)
        expert = ScriptedExpert(noisy_env)
        noisy_env.reset(seed=11, task="lift_red")
        for t, label in enumerate(noisy.arrays["actions"][:5]):
            assert np.allclose(expert.select_action({"state": states[t]}), label, atol=1e-6)


def test_a_missed_grasp_is_recorded_from_the_miss_with_the_recovery_as_labels():
    """grasp_miss: an off-target grasp is acted out; the episode starts where the miss is noticed (gripper closed on
    nothing), its labels open the gripper, and a later grasp lifts the block."""
    config = TabletopConfig.debug(layout="slots", start_noise=(0.05, 0.15, 0.04))
    with TabletopEnv(config) as miss_env:
        plain = record_expert_episode(miss_env, 5, "lift_blue", action_noise=0.3)
        again = record_expert_episode(miss_env, 5, "lift_blue", action_noise=0.3, grasp_miss=0.0)
        np.testing.assert_array_equal(plain.arrays["actions"], again.arrays["actions"])  # off: unchanged
        missed = [record_expert_episode(miss_env, s, "lift_blue", action_noise=0.3, grasp_miss=1.0) for s in range(4)]
    kept = [e for e in missed if e.success]
    assert len(kept) >= 2, [e.success for e in missed]
    assert plain.arrays["state"][0, -1] > 0  # an ordinary episode starts with the gripper open
    for episode in kept:
        state, labels = episode.arrays["state"], episode.arrays["actions"]
        assert state[0, -1] < 0 and labels[0, 6] > 0, "starts closed on nothing, and the label opens the gripper"
        assert (labels[:, 6] < 0).any(), "then grasps again"


def test_the_expert_recovers_when_its_grasp_misses():
    """The expert as a policy: a descent that comes down beside the block is noticed and corrected."""
    with TabletopEnv(TabletopConfig.debug()) as env_:
        obs = env_.reset(seed=2, task="lift_red")
        off = ScriptedExpert(env_, target_offset=[0.035, 0.0, 0.0])
        expert = ScriptedExpert(env_)
        success = False
        for _ in range(env_.config.max_steps):
            label = expert.select_action(obs)
            action = off.select_action(obs) if not off.misses else label
            obs, success, done, _ = env_.step(action)
            if done:
                break
        assert off.misses == 1 and success
