"""Launch-file wiring without ``ros2 launch``: the nodes each launch file declares, run in one process with its
params YAML (the same arguments ``ros2 launch`` would pass), and ``omnistream bringup``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip("rclpy", reason="rclpy is not installed (make setup)")

from ros_helpers import spin_in_thread, wait_for  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from omnistream_msgs.msg import StreamFeatures  # noqa: E402
from omnistream_perception.ros.bringup import REPO_ROOT, create_nodes, default_launch_file, load_launch_file  # noqa: E402
from omnistream_perception.ros.image import rgb_to_image  # noqa: E402
from omnistream_perception.ros.perception_node import PARAMETERS, PerceptionNode, validate_parameter  # noqa: E402

pytestmark = pytest.mark.ros

PERCEPTION_YAML = REPO_ROOT / "ros2_ws/src/omnistream_perception/config/perception.yaml"
VLA_YAML = REPO_ROOT / "ros2_ws/src/omnistream_vla/config/vla.yaml"
MANAGED = {"autostart": False}  # last: the launch file's lifecycle events drive the node


@pytest.fixture
def ros_context():
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


def _image(sec: int) -> Image:
    msg = rgb_to_image(np.random.default_rng(sec).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    msg.header.stamp.sec = sec
    return msg


def test_launch_files_declare_the_nodes_and_params_files():
    (perception,) = load_launch_file(default_launch_file(with_vla=False), {"image": "/cam/image_raw"})
    assert (perception.package, perception.executable, perception.name) == (
        "omnistream_perception",
        "perception_node",
        "perception_node",
    )
    assert Path(perception.parameters[0]) == PERCEPTION_YAML and perception.parameters[1:] == [MANAGED]
    assert ("image", "/cam/image_raw") in perception.remappings
    assert ("image/compressed", "/cam/image_raw/compressed") in perception.remappings

    declarations = load_launch_file(default_launch_file(with_vla=True), {"policy": "/policies/mine"})
    names = [(d.package, d.executable) for d in declarations]
    assert names == [("omnistream_perception", "perception_node"), ("omnistream_vla", "vla_node")]
    vla = declarations[1]
    assert [Path(p) for p in vla.parameters[:1]] == [VLA_YAML]
    assert vla.parameters[1:] == [{"policy": "/policies/mine"}, MANAGED]
    assert ("features", "/perception_node/features") in vla.remappings
    with pytest.raises(ValueError, match="no launch argument"):
        load_launch_file(default_launch_file(with_vla=False), {"imagee": "/typo"})


def test_params_yaml_documents_valid_values_for_declared_parameters():
    data = yaml.safe_load(PERCEPTION_YAML.read_text())
    assert list(data) == ["/**/perception_node"]  # matches the node in any namespace
    params = data["/**/perception_node"]["ros__parameters"]
    assert set(params) <= set(PARAMETERS), f"unknown parameters in the YAML: {set(params) - set(PARAMETERS)}"
    for name, value in params.items():
        assert validate_parameter(name, value) is None, name
        assert type(value) is type(PARAMETERS[name].default), f"{name}: YAML type differs from the declaration"


def test_perception_launch_runs_in_one_process_with_its_params(ros_context, fixture_a, tmp_path):
    extra = tmp_path / "site.yaml"  # a site file layered over the launch file's YAML, as `--params` does
    extra.write_text(yaml.safe_dump({"/**/perception_node": {"ros__parameters": {"feature_dtype": "float32"}}}))
    declarations = load_launch_file(default_launch_file(with_vla=False), {"image": "/cam/image_raw"})
    (node,) = create_nodes(
        declarations,
        context=ros_context,
        extra_params_files=[str(extra)],
        overrides={"perception_node": {"checkpoint": str(fixture_a), "points_stride": 3}},
    )
    assert isinstance(node, PerceptionNode)
    # not autostarted: the launch file's configure and activate, through the lifecycle services, made it active
    assert node.get_parameter("autostart").value is False and node.lifecycle_state == "active"
    assert node.get_parameter("feature_dtype").value == "float32"  # from the extra params file
    assert node.get_parameter("points_stride").value == 3  # from the override
    assert node.get_parameter("world_frame_id").value == "omnistream_world"  # from the launch file's YAML
    # camera_info follows the image's namespace (RealSense: /camera/color/image_raw + /camera/color/camera_info).
    assert {"/cam/image_raw", "/cam/camera_info"} <= {s.topic_name for s in node.subscriptions}
    tester = rclpy.create_node("bringup_tester", context=ros_context)
    executor, thread = spin_in_thread([node, tester], context=ros_context, num_threads=None)
    try:
        features: list = []
        tester.create_subscription(StreamFeatures, "/perception_node/features", features.append, 10)
        pub = tester.create_publisher(Image, "/cam/image_raw", 10)  # the remapped camera topic
        wait_for(
            lambda: (
                pub.get_subscription_count() > 0
                and node.cameras["camera"].publishers["features"].get_subscription_count() > 0
            )
        )
        pub.publish(_image(42))
        wait_for(lambda: len(features) == 1, what="features through the launch wiring")
        assert features[0].dtype == "float32" and features[0].header.stamp.sec == 42
    finally:
        executor.shutdown()
        thread.join(timeout=5)
        node.destroy_node()
        tester.destroy_node()


def test_the_launch_transitions_go_through_the_lifecycle_services(ros_context, fixture_a):
    """The launch file's ChangeState requests and OnStateTransition handlers, step by step, on the real node."""
    from lifecycle_msgs.msg import Transition

    from omnistream_perception.ros.bringup import LifecycleRequest
    from omnistream_perception.ros.launch_lifecycle import drive_transitions

    declarations = load_launch_file(default_launch_file(with_vla=False))
    requests, handlers = declarations.lifecycle_requests, declarations.transition_handlers
    declarations.lifecycle_requests = []  # build the node only: the transitions are made below
    (node,) = create_nodes(
        declarations, context=ros_context, overrides={"perception_node": {"checkpoint": str(fixture_a)}}
    )
    nodes = {"perception_node": node}
    try:
        assert node.lifecycle_state == "unconfigured" and node.cameras == {}, "autostart false: no model yet"
        seen = drive_transitions(nodes, requests, [], ros_context)  # configure, without the launch's handler
        assert [event[2:] for event in seen] == [("unconfigured", "configuring"), ("configuring", "inactive")]
        assert node.lifecycle_state == "inactive" and node.cameras["camera"].session is not None
        cleanup = [LifecycleRequest("perception_node", Transition.TRANSITION_CLEANUP)]
        seen = drive_transitions(nodes, cleanup, handlers, ros_context)  # the handler does not match a cleanup
        assert [event[2:] for event in seen] == [("inactive", "cleaningup"), ("cleaningup", "unconfigured")]
        assert node.lifecycle_state == "unconfigured" and node.cameras == {}
        seen = drive_transitions(nodes, requests, handlers, ros_context)  # the launch file's: configure, activate
        assert [event[2:] for event in seen] == [
            ("unconfigured", "configuring"),
            ("configuring", "inactive"),
            ("inactive", "activating"),
            ("activating", "active"),
        ]
        assert node.lifecycle_state == "active" and {s.topic_name for s in node.subscriptions} >= {"/image"}
    finally:
        node.destroy_node()


def test_a_failed_configure_in_the_bring_up_raises_what_made_it_fail(ros_context, tmp_path, capfd):
    declarations = load_launch_file(default_launch_file(with_vla=False))
    with pytest.raises(OSError, match="missing config.json"):
        create_nodes(declarations, context=ros_context, overrides={"perception_node": {"checkpoint": str(tmp_path)}})
    assert "configure failed" not in capfd.readouterr().err, "said once, by the caller"


def test_omnistream_launch_runs_perception_and_vla_in_one_process(ros_context, fixture_a, tmp_path):
    if not VLA_YAML.is_file():
        pytest.skip(f"{VLA_YAML.relative_to(REPO_ROOT)} is not in this checkout yet (written by the VLA work)")
    import torch
    from std_msgs.msg import String

    from omnistream_msgs.msg import EndEffectorAction
    from omnistream_vla.policy import OmniStreamVLAConfig, OmniStreamVLAPolicy

    torch.manual_seed(0)
    policy_dir = tmp_path / "policy"
    OmniStreamVLAPolicy(OmniStreamVLAConfig.preset("debug", backbone=None)).save_pretrained(policy_dir)
    nodes = create_nodes(
        load_launch_file(default_launch_file(with_vla=True), {"policy": str(policy_dir), "checkpoint": str(fixture_a)}),
        context=ros_context,
        # the wiring is under test, not latency: in one process on a busy 2-core machine features took up to 9 s
        overrides={"vla_node": {"max_feature_age": 30.0}},
    )
    tester = rclpy.create_node("bringup_vla_tester", context=ros_context)
    executor, thread = spin_in_thread([*nodes, tester], context=ros_context, num_threads=None)
    try:
        actions: list = []
        tester.create_subscription(EndEffectorAction, "/vla_node/action", actions.append, 10)
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        instruction_qos = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        tester.create_publisher(String, "/instruction", instruction_qos).publish(String(data="pick up the cube"))
        pub = tester.create_publisher(Image, "/image", 10)
        wait_for(lambda: pub.get_subscription_count() > 0)
        # A 20 Hz camera until the first action computed from fresh features (a loaded machine takes longer to
        # load both models; features stop being fresh soon after the camera stops, so it keeps publishing).
        deadline = time.monotonic() + 60
        sec = 0
        while not any(not a.stop for a in actions):
            assert time.monotonic() < deadline, "no action computed from the perception features within 60 s"
            sec += 1
            image = _image(sec)
            image.header.stamp = tester.get_clock().now().to_msg()  # vla_node measures feature age from the stamp
            pub.publish(image)
            threading.Event().wait(0.05)
        assert nodes[0].cameras["camera"].stats.counts["processed"] >= 1
    finally:
        executor.shutdown()
        thread.join(timeout=5)
        for node in nodes:
            node.destroy_node()
        tester.destroy_node()


def test_cli_bringup_runs_the_perception_launch_file(fixture_a):
    from omnistream_perception.transport import PROFILE_ENV_VARS, large_data_profile_path

    env = {k: v for k, v in os.environ.items() if k not in PROFILE_ENV_VARS}
    result = subprocess.run(
        [sys.executable, "-m", "omnistream_cli.main", "bringup", "--checkpoint", str(fixture_a), "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "started omnistream_perception/perception_node as perception_node" in result.stdout
    # The launch file's transport settings apply to the bringup process, as to a process ros2 launch starts.
    assert f"sets {PROFILE_ENV_VARS[0]}={large_data_profile_path()}" in result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "nobody.x=1"], "unknown node"),
        (["--set", "no_dot=1"], "NODE.PARAM=VALUE"),
        (["--arg", "imagee:=/typo"], "no launch argument"),
        (["--params", "missing.yaml"], "--params file not found"),
        (["--launch", "missing.launch.py"], "launch file not found"),
        (["--with-vla"], "--with-vla needs --policy DIR"),
        (["--with-vla", "--policy", "missing_policy"], "--policy missing_policy: no such directory"),
        (["--policy", "missing_policy"], "add --with-vla"),
        (["--arg", "params_file:=missing.yaml"], "params file not found: missing.yaml"),
    ],
)
def test_cli_bringup_bad_input_is_a_clear_error(argv, message, capsys):
    from omnistream_cli.main import main

    assert main(["bringup", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_bringup_offline_with_a_hub_checkpoint_fails_at_once(tmp_path):
    """The params file's hub id, no network (an endpoint that refuses connections), an empty cache: exit 2 with
    what to do, instead of half a minute of connection retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-m", "omnistream_cli.main", "bringup", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "pass the local directory" in result.stderr.strip().splitlines()[-1]
