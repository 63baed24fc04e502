"""Action execution without ROS (``omnistream_vla.action_execution`` and the controller using it): ACT's
temporal ensemble, the per-step and workspace limits in metres and radians, the latched emergency stop and the
matching of several cameras by stamp."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from omnistream_vla.action_convention import rpy_to_rotation_vector  # noqa: E402
from omnistream_vla.action_execution import (  # noqa: E402
    ActionLimits,
    EndEffector,
    LimitError,
    TemporalEnsembler,
    action_jerk,
    matrix_to_rotvec,
    matrix_to_rpy,
    quaternion_to_rpy,
    rotvec_to_matrix,
    rpy_to_matrix,
)
from omnistream_vla.controller import ERROR, ControllerSettings, VLAController  # noqa: E402
from omnistream_vla.policy import OmniStreamVLAConfig, OmniStreamVLAProcessor, build_debug_tokenizer  # noqa: E402


class ChunkPolicy:
    """A stand-in policy whose chunk at query q is ``chunks(q)`` (chunk_size x 7); real config and processor."""

    def __init__(self, chunks, cameras=("static",)):
        self.config = OmniStreamVLAConfig.preset("debug", backbone=None, cameras=cameras)
        self.processor = OmniStreamVLAProcessor(self.config, build_debug_tokenizer())
        self.chunks, self.queries, self.resets, self._queue = chunks, 0, 0, []

    def predict_action_chunk(self, observation, normalized=False):
        chunk = torch.as_tensor(np.asarray(self.chunks(self.queries), dtype=np.float32))[None]
        self.queries += 1
        return chunk

    def select_action(self, observation):
        if not self._queue:
            self._queue = list(self.predict_action_chunk(observation)[0])
        return self._queue.pop(0)[None]

    def reset(self):
        self.resets += 1
        self._queue = []


def _tokens(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 2, 64)).astype(np.float32)


def _controller(policy, **settings):
    c = VLAController(policy, ControllerSettings(translation_scale=0.02, rotation_scale=0.05, **settings))
    c.on_instruction("open the drawer")
    return c


# -- the ensemble ----------------------------------------------------------------------------------------------------
def test_the_ensemble_weights_older_predictions_by_exp_minus_m_i():
    ens = TemporalEnsembler(m=0.5)
    ens.add(np.array([[0.0], [10.0], [20.0]]))  # step 0: predictions for steps 0, 1, 2
    assert ens.pop().tolist() == [0.0]
    ens.add(np.array([[4.0], [8.0], [12.0]]))  # step 1: a second prediction for step 1 (newer)
    w = np.exp(-0.5 * np.arange(2))  # i = 0 the oldest (10.0), i = 1 the newer (4.0)
    assert ens.pop()[0] == pytest.approx((w[0] * 10.0 + w[1] * 4.0) / w.sum())
    ens.add(np.array([[1.0], [1.0], [1.0]]))
    w = np.exp(-0.5 * np.arange(3))
    assert ens.pop()[0] == pytest.approx((w[0] * 20.0 + w[1] * 8.0 + w[2] * 1.0) / w.sum())
    assert len(ens) == 2, "the first chunk has no prediction left and is dropped"


def test_ensemble_m_zero_is_the_plain_mean_and_negative_m_favours_the_newest():
    for m, expected in ((0.0, 5.0), (-50.0, 0.0), (50.0, 10.0)):
        ens = TemporalEnsembler(m=m)
        ens.add(np.array([[99.0], [10.0]]))
        ens.pop()
        ens.add(np.array([[0.0], [0.0]]))
        assert ens.pop()[0] == pytest.approx(expected, abs=1e-9)


def test_an_empty_ensemble_refuses_to_invent_an_action():
    ens = TemporalEnsembler()
    with pytest.raises(RuntimeError, match="no prediction"):
        ens.pop()


def test_the_controller_ensembles_every_step_and_queue_mode_queries_once_per_chunk():
    # chunk q predicts x = q + k for step q + k: every prediction for step t says x = t ... plus noise per query
    def chunks(q):
        return [[q + k + (0.5 if q % 2 else -0.5), 0, 0, 0, 0, 0, 1] for k in range(4)]

    ens_policy, queue_policy = ChunkPolicy(chunks), ChunkPolicy(chunks)
    ens = _controller(ens_policy, execution="ensemble", ensemble_m=0.0)
    queue = _controller(queue_policy)
    xs_e, xs_q = [], []
    for _ in range(12):
        for c, xs in ((ens, xs_e), (queue, xs_q)):
            c.on_features("static", _tokens(), 0.0, 0.0)
            xs.append(c.step(0.0).translation[0] / 0.02)
    assert ens_policy.queries == 12 and queue_policy.queries == 3
    # the ensemble averages the +-0.5 offsets of overlapping queries away; the queue jumps at every chunk
    assert abs(xs_e[-1] - 11.0) < 0.2
    assert action_jerk(np.array(xs_e)[:, None]) < action_jerk(np.array(xs_q)[:, None])


def test_query_period_and_reset_in_ensemble_mode():
    policy = ChunkPolicy(lambda q: [[1, 0, 0, 0, 0, 0, 1]] * 4)
    c = _controller(policy, execution="ensemble", query_period=2)
    for _ in range(6):
        c.on_features("static", _tokens(), 0.0, 0.0)
        assert not c.step(0.0).stop
    assert policy.queries == 3
    c.reset()
    c.on_features("static", _tokens(), 0.0, 0.0)
    c.step(0.0)
    assert policy.queries == 4, "after a reset nothing planned before is executed: a new query"
    with pytest.raises(ValueError, match="query_period"):
        _controller(policy, execution="ensemble", query_period=5)  # chunk_size is 4
    with pytest.raises(ValueError, match="execution"):
        _controller(policy, execution="fifo")


def test_a_nan_chunk_in_ensemble_mode_stops_and_does_not_poison_the_ensemble():
    state = {"nan": True}
    policy = ChunkPolicy(lambda q: [[math.nan if state["nan"] else 1.0, 0, 0, 0, 0, 0, 1]] * 4)
    c = _controller(policy, execution="ensemble")
    c.on_features("static", _tokens(), 0.0, 0.0)
    command = c.step(0.0)
    assert command.stop and command.level == ERROR and "NaN" in command.reason
    state["nan"] = False
    c.on_features("static", _tokens(), 0.0, 0.0)
    command = c.step(0.0)
    assert not command.stop and np.isfinite(command.translation).all()


# -- limits ----------------------------------------------------------------------------------------------------------
def test_rotation_helpers_round_trip():
    rng = np.random.default_rng(0)
    for rpy in rng.uniform(-1.2, 1.2, size=(20, 3)):
        np.testing.assert_allclose(matrix_to_rpy(rpy_to_matrix(rpy)), rpy, atol=1e-9)
        v = matrix_to_rotvec(rpy_to_matrix(rpy))
        np.testing.assert_allclose(v, rpy_to_rotation_vector(rpy), atol=1e-9)
        np.testing.assert_allclose(rotvec_to_matrix(v), rpy_to_matrix(rpy), atol=1e-9)
    half_turn = matrix_to_rotvec(rotvec_to_matrix([0, 0, math.pi]))
    assert np.linalg.norm(half_turn) == pytest.approx(math.pi) and abs(half_turn[2]) == pytest.approx(math.pi)
    np.testing.assert_allclose(quaternion_to_rpy(0, 0, math.sin(0.25), math.cos(0.25)), [0, 0, 0.5], atol=1e-12)


def test_step_caps_shorten_along_the_direction_in_metres_and_radians():
    limits = ActionLimits(max_translation=0.01, max_rotation=0.05)
    t, r, clipped = limits.apply("relative", [0.03, 0.04, 0.0], [0.1, 0.0, 0.2])
    np.testing.assert_allclose(t, [0.006, 0.008, 0.0])
    assert np.linalg.norm(rpy_to_rotation_vector(r)) == pytest.approx(0.05)
    axis = rpy_to_rotation_vector([0.1, 0.0, 0.2])
    np.testing.assert_allclose(rpy_to_rotation_vector(r), axis / np.linalg.norm(axis) * 0.05, atol=1e-9)
    assert clipped == ["translation", "rotation"]
    t, r, clipped = limits.apply("relative", [0.001, 0, 0], [0.01, 0, 0])
    assert clipped == [] and t.tolist() == [0.001, 0, 0]


def test_the_workspace_box_needs_the_end_effector_in_relative_mode():
    limits = ActionLimits(workspace_min=(-0.5, -0.5, 0.0), workspace_max=(0.5, 0.5, 0.8))
    with pytest.raises(LimitError, match="position"):
        limits.apply("relative", [0.1, 0, 0], [0, 0, 0])
    t, _, clipped = limits.apply("relative", [0.1, 0.0, -0.3], [0, 0, 0], EndEffector(np.array([0.45, 0.0, 0.1])))
    np.testing.assert_allclose(t, [0.05, 0.0, -0.1])
    assert clipped == ["workspace"]
    # absolute mode: the target itself is clipped, no end effector needed for the box alone
    t, _, clipped = limits.apply("absolute", [0.9, 0.0, 0.3], [0, 0, 0])
    assert t.tolist() == [0.5, 0.0, 0.3] and clipped == ["workspace"]


def test_absolute_mode_caps_the_step_from_the_reference_pose():
    limits = ActionLimits(max_translation=0.05, max_rotation=0.1)
    with pytest.raises(LimitError):
        limits.apply("absolute", [0.3, 0, 0], [0, 0, 0])
    ee = EndEffector(np.array([0.2, 0.0, 0.0]), np.array([0.0, 0.0, 0.5]))
    t, r, clipped = limits.apply("absolute", [0.3, 0, 0], [0, 0, 0.9], ee)
    np.testing.assert_allclose(t, [0.25, 0, 0])
    np.testing.assert_allclose(r, [0, 0, 0.6], atol=1e-9)
    assert clipped == ["translation", "rotation"]
    t, _, _ = limits.apply("absolute", [0.3, 0, 0], [0, 0, 0.6], previous=(np.array([0.28, 0, 0]), np.zeros(3)))
    np.testing.assert_allclose(t, [0.3, 0, 0])


@pytest.mark.parametrize("bad", [{"max_translation": -1.0}, {"max_rotation": math.inf},
                                 {"workspace_min": (0, 0, 0)}, {"workspace_min": (1, 0, 0), "workspace_max": (0, 1, 1)}])  # fmt: skip
def test_bad_limits_are_refused(bad):
    with pytest.raises(ValueError):
        ActionLimits(**bad)


def test_the_controller_applies_limits_after_scaling_and_counts_them():
    policy = ChunkPolicy(lambda q: [[1.0, 0, 0, 0, 0, 0, 1]] * 4)  # 1 unit = 0.02 m
    limits = ActionLimits(max_translation=0.015, workspace_min=(-1, -1, -1), workspace_max=(0.1, 1, 1))
    c = _controller(policy, limits=limits, ee_position_joints=("x", "y", "z"))
    c.on_features("static", _tokens(), 0.0, 0.0)
    command = c.step(0.0)
    assert command.stop and "end effector" in command.reason, "a box without the end effector's position: stop"
    c.on_joint_state(["x", "y", "z"], [0.0, 0.0, 0.0], 0.0)
    c.on_features("static", _tokens(), 0.0, 0.0)
    command = c.step(0.0)
    np.testing.assert_allclose(command.translation, [0.015, 0, 0])
    np.testing.assert_allclose(command.linear_velocity, [0.15, 0, 0])
    assert command.clipped == ("translation",)
    c.on_ee_pose([0.095, 0, 0], None, 0.0)  # ee_pose wins over joint_states
    c.on_features("static", _tokens(), 0.0, 0.0)
    np.testing.assert_allclose(c.step(0.0).translation, [0.005, 0, 0], atol=1e-12)
    assert c.clipped == {"translation": 1, "rotation": 0, "workspace": 1} and c.clipped_actions == 2
    c.on_features("static", _tokens(), 1.0, 1.0)
    assert c.step(1.0).stop, "an end-effector pose older than max_feature_age is not used"


# -- emergency stop --------------------------------------------------------------------------------------------------
def test_the_emergency_stop_latches_through_instructions_and_resets_until_cleared():
    policy = ChunkPolicy(lambda q: [[1.0, 0, 0, 0, 0, 0, -1]] * 4)
    c = _controller(policy)
    c.on_features("static", _tokens(), 0.0, 0.0)
    assert not c.step(0.0).stop
    now = c.emergency_stop()
    assert now.stop and now.level == ERROR and now.translation.tolist() == [0, 0, 0] and now.gripper == -1.0
    assert now.new_error
    queries = policy.queries
    for text in ("lift the red block", None):
        if text:
            c.on_instruction(text)
        else:
            c.reset()
        c.on_features("static", _tokens(), 0.0, 0.0)
        command = c.step(0.0)
        assert command.stop and "emergency" in command.reason and c.emergency_stopped
        assert not command.new_error, "the same error again is not a new one (counted once on /diagnostics)"
    assert policy.queries == queries, "the policy is not run while the emergency stop is latched"
    assert c.watchdog(10.0) is None
    assert c.clear_emergency_stop() and not c.clear_emergency_stop()
    c.on_features("static", _tokens(), 0.0, 0.0)
    assert not c.step(0.0).stop and policy.queries == queries + 1, "a new chunk after the stop"


# -- several cameras -------------------------------------------------------------------------------------------------
def test_several_cameras_are_matched_by_stamp_within_the_tolerance():
    policy = ChunkPolicy(lambda q: [[1.0, 0, 0, 0, 0, 0, 1]] * 4, cameras=("static", "wrist"))
    c = _controller(policy, camera_sync_tolerance=0.02, max_feature_age=0.5)
    c.on_features("static", _tokens(), 10.00, 10.00)
    command = c.step(10.0)
    assert command.stop and "wrist" in command.reason and c.missing_stops == 1
    c.on_features("wrist", _tokens(1), 10.10, 10.10)  # 100 ms apart: out of sync
    command = c.step(10.1)
    assert command.stop and "out of sync" in command.reason and c.desync_stops == 1
    # a static frame stamped near the wrist's arrives: the matched pair is (10.11, 10.10)
    c.on_features("static", _tokens(2), 10.11, 10.11)
    assert not c.step(10.12).stop
    # the wrist camera runs ahead; static is the slowest: its newest (10.11) is matched with the wrist's nearest
    for k in range(1, 4):
        c.on_features("wrist", _tokens(3), 10.10 + 0.03 * k, 10.10 + 0.03 * k)
    assert not c.step(10.2).stop, "the wrist's buffered 10.10 frame is matched with static's 10.11"
    assert c.desync_stops == 1 and c.missing_stops == 1


def test_the_new_parameters_are_checked_without_ros():
    from omnistream_perception.ros.node_params import problem
    from omnistream_vla.action_convention import calvin_convention
    from omnistream_vla.ros.vla_parameters import PARAMETERS, controller_settings

    bad = {"action_execution": "fifo", "ensemble_m": math.nan, "query_period": 0, "max_translation_step": -0.1,
           "max_rotation_step": 4.0, "workspace_min": [0.0, 1.0], "ee_position_joints": "x,y",
           "camera_sync_tolerance": math.inf}  # fmt: skip
    for name, value in bad.items():
        assert problem(name, value, PARAMETERS) is not None, name
    values = {name: spec.default for name, spec in PARAMETERS.items()}
    values.update(workspace_enabled=True, max_translation_step=0.01, ee_position_joints="ee_x, ee_y,ee_z")
    settings = controller_settings(values.__getitem__, calvin_convention())
    assert settings.limits.max_translation == 0.01 and settings.limits.workspace_max == (1.0, 1.0, 1.0)
    assert settings.ee_position_joints == ("ee_x", "ee_y", "ee_z") and settings.execution == "queue"
    values.update(workspace_min=[2.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="workspace"):
        controller_settings(values.__getitem__, calvin_convention())
