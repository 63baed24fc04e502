"""Action-convention converters: round trips, known values, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from omnistream_sim import conventions as conv

RNG = np.random.default_rng(0)


def _rx(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def test_calvin_scaling_known_values_and_round_trip():
    delta = np.array([0.01, -0.005, 0.0, 0.02, -0.01, 0.0, 1.0])
    rel = conv.calvin_delta_to_rel_action(delta)
    np.testing.assert_allclose(rel, [0.5, -0.25, 0.0, 0.4, -0.2, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(conv.calvin_rel_action_to_delta(rel), delta, atol=1e-7)


def test_calvin_scaling_clips_and_batches():
    delta = np.array([[0.1, 0, 0, 0, 0, -1.0, -0.3], [0, 0, 0, 0, 0, 0, 0.0]])
    rel = conv.calvin_delta_to_rel_action(delta)
    assert rel.shape == (2, 7) and rel.dtype == np.float32
    assert rel[0, 0] == 1.0 and rel[0, 5] == -1.0  # clipped
    assert rel[0, 6] == -1.0 and rel[1, 6] == 1.0  # gripper exactly +-1 (0 counts as open)
    unclipped = conv.calvin_delta_to_rel_action(delta, clip=False)
    assert unclipped[0, 0] == pytest.approx(5.0)


def test_calvin_vla_normalisation_round_trip():
    rel = RNG.uniform(-0.65, 0.65, (50, 7))
    rel[:, 6] = np.where(RNG.random(50) > 0.5, 1.0, -1.0)
    norm = conv.calvin_normalize_for_vla(rel)
    assert norm[:, :6].min() >= -1 and norm[:, :6].max() <= 1
    assert set(np.unique(norm[:, 6])) <= {0.0, 1.0}
    np.testing.assert_allclose(conv.calvin_unnormalize_from_vla(norm), rel, atol=1e-6)
    # beyond +-0.65 the target saturates at +-1
    assert conv.calvin_normalize_for_vla([0.9, -0.9, 0, 0, 0, 0, 1])[:2].tolist() == [1.0, -1.0]


def test_gripper_conversions():
    np.testing.assert_array_equal(conv.gripper_sign_to_binary([-1, 1, -0.2, 0.7]), [0, 1, 0, 1])
    np.testing.assert_array_equal(conv.gripper_binary_to_sign([0.0, 0.5, 0.51, 1.0]), [-1, -1, 1, 1])
    signs = np.array([-1.0, 1.0, 1.0, -1.0])
    np.testing.assert_array_equal(conv.gripper_binary_to_sign(conv.gripper_sign_to_binary(signs)), signs)


def test_euler_matrix_matches_static_xyz_composition():
    for roll, pitch, yaw in RNG.uniform(-1.4, 1.4, (20, 3)):
        expected = _rz(yaw) @ _ry(pitch) @ _rx(roll)
        np.testing.assert_allclose(conv.euler_to_matrix([roll, pitch, yaw]), expected, atol=1e-12)


def test_euler_axis_angle_round_trip_and_single_axis_values():
    euler = RNG.uniform(-np.pi, np.pi, (500, 3))
    euler[:, 1] = RNG.uniform(-1.5, 1.5, 500)
    rotvec = conv.euler_to_axis_angle(euler)
    assert np.linalg.norm(rotvec, axis=-1).max() <= np.pi + 1e-9
    np.testing.assert_allclose(conv.axis_angle_to_euler(rotvec), euler, atol=1e-9)
    np.testing.assert_allclose(conv.axis_angle_to_matrix(rotvec), conv.euler_to_matrix(euler), atol=1e-12)
    # a pure roll / yaw is the same rotation vector about x / z
    np.testing.assert_allclose(conv.euler_to_axis_angle([0.3, 0, 0]), [0.3, 0, 0], atol=1e-12)
    np.testing.assert_allclose(conv.euler_to_axis_angle([0, 0, -0.2]), [0, 0, -0.2], atol=1e-12)


def test_axis_angle_edge_cases():
    vectors = np.array([[0, 0, 0], [1e-14, 0, 0], [1e-7, 2e-7, -1e-7], [np.pi, 0, 0], [0, 0, np.pi - 1e-9]])
    back = conv.matrix_to_axis_angle(conv.axis_angle_to_matrix(vectors))
    # a rotation by pi is the same about +axis and -axis
    for v, b in zip(vectors, back):
        assert np.allclose(v, b, atol=1e-12) or np.allclose(v, -b, atol=1e-12), (v, b)


def test_bridge_to_simpler_action_and_back():
    bridge = np.array([0.01, -0.02, 0.005, 0.1, -0.05, 0.2, 0.8])
    simpler = conv.bridge_to_simpler_action(bridge)
    np.testing.assert_allclose(simpler[:3], bridge[:3], atol=1e-7)
    np.testing.assert_allclose(simpler[3:6], conv.euler_to_axis_angle(bridge[3:6]), atol=1e-7)
    assert simpler[6] == 1.0
    assert conv.bridge_to_simpler_action(np.r_[bridge[:6], 0.3])[6] == -1.0
    back = conv.simpler_to_bridge_action(simpler)
    np.testing.assert_allclose(back[:6], bridge[:6], atol=1e-6)
    assert back[6] == 1.0


def test_percentile_bounds_normalise_round_trip_and_clip():
    actions = RNG.normal(size=(2000, 7)) * [0.01, 0.01, 0.01, 0.05, 0.05, 0.05, 0.5]
    actions[:, 6] = 1.0  # a constant dimension must not divide by zero
    bounds = conv.PercentileBounds.from_actions(actions)
    np.testing.assert_allclose(bounds.low[:6], np.percentile(actions[:, :6], 1, axis=0))
    norm = bounds.normalize(actions)
    assert norm.min() >= -1 and norm.max() <= 1
    inside = np.all((actions[:, :6] >= bounds.low[:6]) & (actions[:, :6] <= bounds.high[:6]), axis=1)
    assert 0.8 < inside.mean() < 0.95  # each of 6 dims keeps ~98%
    np.testing.assert_allclose(bounds.unnormalize(norm)[inside, :6], actions[inside, :6], atol=1e-6)
    assert np.all(norm[:, 6] == 0.0)
    restored = conv.PercentileBounds.from_dict(bounds.to_dict())
    np.testing.assert_array_equal(restored.low, bounds.low)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="last dimension of 7"):
        conv.calvin_delta_to_rel_action([0.0, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        conv.bridge_to_simpler_action([np.nan] * 7)
    with pytest.raises(ValueError, match="high >= low"):
        conv.PercentileBounds([1.0], [0.0])
    with pytest.raises(ValueError, match="dims"):
        conv.PercentileBounds([0.0, 0.0], [1.0, 1.0]).normalize(np.zeros(3))


def test_calvin_env_action_clips_and_signs_the_gripper():
    out = conv.calvin_env_action([[1.5, -2.0, 0.3, 0, 0, 0, 0.2], [0, 0, 0, 0, 0, 0, -0.01]])
    np.testing.assert_allclose(out[0], [1.0, -1.0, 0.3, 0, 0, 0, 1.0], atol=1e-7)
    assert out[1, 6] == -1.0
