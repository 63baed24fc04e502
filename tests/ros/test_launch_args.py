"""Launch arguments of our launch files, read through the launch stand-ins that `omnistream bringup` runs them with
(`launch` / `launch_ros` are not installable here): topics, checkpoint, policy, device, params files, the
camera_info derivation and the transport environment every launched process gets."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ament_index_python", reason="the ROS wheels are not installed (make setup)")

from omnistream_perception.ros.bringup import (  # noqa: E402
    REPO_ROOT,
    LifecycleRequest,
    TransitionHandler,
    default_launch_file,
    load_launch_file,
)
from omnistream_perception.ros.launch_support import camera_info_topic  # noqa: E402
from omnistream_perception.transport import PROFILE_ENV_VARS, large_data_env  # noqa: E402

PERCEPTION_YAML = REPO_ROOT / "ros2_ws/src/omnistream_perception/config/perception.yaml"
VLA_YAML = REPO_ROOT / "ros2_ws/src/omnistream_vla/config/vla.yaml"
MANAGED = {"autostart": False}  # last: the launch file's lifecycle events drive the node
CONFIGURE, ACTIVATE = 1, 3  # lifecycle_msgs/Transition


@pytest.mark.parametrize(
    ("image", "camera_info"),
    [
        ("/camera/color/image_raw", "/camera/color/camera_info"),  # RealSense
        ("/image_raw", "/camera_info"),  # usb_cam
        ("image", "camera_info"),  # relative names stay relative (namespaces and remaps apply)
        ("front/image_rect", "front/camera_info"),
    ],
)
def test_camera_info_follows_the_image_namespace(image, camera_info):
    assert camera_info_topic(image) == camera_info


@pytest.mark.parametrize("image", ["", "  ", "/camera/", "~/image"])
def test_camera_info_of_an_unusable_image_topic_is_an_error(image):
    with pytest.raises(ValueError, match="camera_info"):
        camera_info_topic(image)


def _remaps(declaration) -> dict[str, str]:
    return dict(declaration.remappings)


def test_perception_launch_arguments():
    (node,) = load_launch_file(default_launch_file(with_vla=False))
    assert Path(node.parameters[0]) == PERCEPTION_YAML
    assert node.parameters[1:] == [MANAGED]  # nothing else overrides the params file by default
    assert _remaps(node) == {"image": "image", "image/compressed": "image/compressed", "camera_info": "camera_info"}

    (node,) = load_launch_file(
        default_launch_file(with_vla=False),
        {"image": "/camera/color/image_raw", "checkpoint": "/models/omnistream", "device": "cuda:0"},
    )
    assert _remaps(node) == {
        "image": "/camera/color/image_raw",
        "image/compressed": "/camera/color/image_raw/compressed",
        "camera_info": "/camera/color/camera_info",
    }
    assert node.parameters[1:] == [{"checkpoint": "/models/omnistream", "device": "cuda:0"}, MANAGED]  # after the file
    args = node.ros_arguments()
    assert args.index("--params-file") < args.index("checkpoint:=/models/omnistream")

    (node,) = load_launch_file(
        default_launch_file(with_vla=False),
        {"image": "/cam/image_raw", "camera_info": "/calib/info", "params_file": "/site/perception.yaml"},
    )
    assert _remaps(node)["camera_info"] == "/calib/info"
    assert node.parameters == ["/site/perception.yaml", MANAGED]


def test_vla_launch_needs_a_policy_and_passes_its_arguments():
    with pytest.raises(ValueError, match=r"needs launch argument\(s\) \['policy'\]"):
        load_launch_file(default_launch_file(with_vla=True))
    perception, vla = load_launch_file(
        default_launch_file(with_vla=True),
        {
            "policy": "/policies/mine",
            "image": "/camera/color/image_raw",
            "device": "cuda",
            "instruction_topic": "/robot/instruction",
            "checkpoint": "/models/omnistream",
        },
    )
    assert [Path(p) for p in vla.parameters[:1]] == [VLA_YAML]
    assert vla.parameters[1:] == [{"policy": "/policies/mine", "device": "cuda"}, MANAGED]
    assert _remaps(vla) == {"features": "/perception_node/features", "instruction": "/robot/instruction"}
    assert perception.parameters[1:] == [{"checkpoint": "/models/omnistream", "device": "cuda"}, MANAGED]
    assert _remaps(perception)["camera_info"] == "/camera/color/camera_info"


@pytest.mark.parametrize("with_vla", [False, True])
def test_launch_files_configure_their_lifecycle_nodes_then_activate_them_once_inactive(with_vla):
    from lifecycle_msgs.msg import Transition

    assert (CONFIGURE, ACTIVATE) == (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE)
    declarations = load_launch_file(default_launch_file(with_vla), {"policy": "/p"} if with_vla else {})
    names = [d.name for d in declarations]
    assert names == (["perception_node", "vla_node"] if with_vla else ["perception_node"])
    assert all(d.lifecycle and d.parameters[-1] == MANAGED for d in declarations)
    assert declarations.lifecycle_requests == [LifecycleRequest(name, CONFIGURE) for name in names]
    assert declarations.transition_handlers == [
        TransitionHandler(name, [LifecycleRequest(name, ACTIVATE)], start_state="configuring", goal_state="inactive")
        for name in names
    ]
    handler = declarations.transition_handlers[0]
    assert handler.matches("perception_node", "transition_success", "configuring", "inactive")
    assert not handler.matches("perception_node", "transition_success", "deactivating", "inactive")  # no re-activation
    assert not handler.matches("perception_node", "transition_failure", "configuring", "unconfigured")
    assert not handler.matches("another_node", "transition_success", "configuring", "inactive")


@pytest.mark.parametrize("with_vla", [False, True])
def test_launch_files_give_launched_processes_the_transport_settings(with_vla, monkeypatch):
    for name in PROFILE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    arguments = {"policy": "/p"} if with_vla else {}
    environment = load_launch_file(default_launch_file(with_vla), arguments).environment
    assert environment == large_data_env() != {}
    assert all(Path(value).is_file() for value in environment.values())
    # A user's own Fast DDS profile wins: the launch file then sets nothing.
    monkeypatch.setenv(PROFILE_ENV_VARS[0], "/site/fastdds.xml")
    assert load_launch_file(default_launch_file(with_vla), arguments).environment == {}


def test_top_level_launch_files_are_the_packages():
    for name in ("perception.launch.py", "omnistream.launch.py"):
        top = REPO_ROOT / "launch" / name
        assert top.is_symlink(), f"launch/{name} should point into its package (one source of truth)"
        assert top.resolve().is_relative_to(REPO_ROOT / "ros2_ws" / "src")
        assert not top.resolve().is_symlink()
