"""`train vla --set features="stream"`: the policy trains on the features perception_node will publish."""

from __future__ import annotations

import numpy as np
import torch

from omnistream_perception.model import OmniStreamModel
from omnistream_perception.perception import PerceptionConfig, PerceptionSession
from omnistream_train.vla import EpisodeData, VLATrainConfig, build_policy, cache_features, streamed_patch_tokens


def test_streamed_features_equal_the_perception_session_and_carry_history(tmp_path):
    torch.manual_seed(0)
    model = OmniStreamModel.from_preset("debug")
    with torch.no_grad():  # LayerScale ~1 (not the 1e-5 init) so attention to past frames matters
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    model.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    episodes = [
        EpisodeData(
            {"static": rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)},
            np.zeros((4, 7), np.float32),
            "lift the red block",
        )
        for _ in range(2)
    ]
    config = VLATrainConfig.from_preset("debug", backbone=str(tmp_path), policy_overrides={"image_size": 64})
    stats = {k: np.zeros(7, np.float32) for k in ("min", "max", "mean", "std", "q01", "q99")}
    policy = build_policy(config, stats, torch.device("cpu"), bounds=(-1.0, 1.0))
    streamed = streamed_patch_tokens(policy, episodes, ["static"], str(tmp_path), progress=False)["static"]
    assert streamed.shape[0] == 8

    session = PerceptionSession.from_config(
        PerceptionConfig(
            checkpoint=str(tmp_path), max_side=64, feature_pooling=policy.config.pool, feature_dtype="float32"
        )
    )
    for e, ep in enumerate(episodes):  # reset per episode, then frame by frame, as the node does
        session.reset()
        for t, frame in enumerate(ep.images["static"]):
            expected = session.process(frame, want_depth=False, want_pose=False).patch_tokens.reshape(-1, 64)
            assert torch.equal(streamed[4 * e + t], torch.from_numpy(expected))

    single = cache_features(policy, episodes, ["static"], batch=8, progress=False)["static"]
    assert torch.allclose(streamed[0], single[0], atol=1e-5)  # the first frame has no history
    assert not torch.allclose(streamed[3], single[3], atol=1e-4)  # later frames see the stream's past


def test_in_process_evaluation_streams_the_features_the_policy_was_trained_on(tmp_path):
    """VLACheckpointPolicy of a features="stream" policy feeds it perception_node's streamed features."""
    from omnistream_sim.policies import VLACheckpointPolicy

    torch.manual_seed(0)
    model = OmniStreamModel.from_preset("debug")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    backbone = tmp_path / "backbone"
    model.save_pretrained(backbone)
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    episode = EpisodeData({"static": frames}, np.zeros((3, 7), np.float32), "lift the red block")
    config = VLATrainConfig.from_preset(
        "debug", backbone=str(backbone), features="stream", policy_overrides={"image_size": 64}
    )
    stats = {k: np.zeros(7, np.float32) for k in ("min", "max", "mean", "std", "q01", "q99")}
    policy = build_policy(config, stats, torch.device("cpu"), bounds=(-1.0, 1.0))
    assert policy.config.features == "stream" and policy.config.camera_token is False  # no heads in the backbone
    trained_on = streamed_patch_tokens(policy, [episode], ["static"], str(backbone), progress=False)["static"]
    policy.save_pretrained(tmp_path / "policy")

    evaluated = VLACheckpointPolicy(tmp_path / "policy")
    seen = []
    original = evaluated.model.select_action

    def spy(batch):
        seen.append(torch.as_tensor(batch["observation.features.static"])[0])
        return original(batch)

    evaluated.model.select_action = spy
    for _ in range(2):  # the second episode must start a fresh stream
        evaluated.reset()
        seen.clear()
        for frame in frames:
            evaluated.select_action({"images": {"static": frame}, "instruction": episode.instruction})
        for t in range(3):
            torch.testing.assert_close(seen[t], trained_on[t], atol=1e-5, rtol=1e-5)
