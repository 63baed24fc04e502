"""perception_node with ``backend: onnxruntime``: the exported streaming step (``omnistream export onnx``) publishes
what the torch backend publishes, with real rclpy topics; a configuration the file does not fit ends the node's
start with a clear error: configure fails (one FATAL line and exit 2 from the console script).

The checkpoint is the authors' tiny fixture plus tiny geometry heads whose pose depends on the input (the camera
head's last layer starts at zero, which would make any pose match); one export of it serves every test.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import threading

import numpy as np
import pytest
import torch

rclpy = pytest.importorskip("rclpy", reason="rclpy is not installed (make setup)")
pytest.importorskip("onnx", reason="onnx is not installed (pip install -r requirements.txt)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -r requirements.txt)")

from geometry_msgs.msg import PoseStamped  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from ros_helpers import wait_for  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from test_perception_node_process import _perception_node_command  # noqa: E402

from omnistream_msgs.msg import StreamFeatures  # noqa: E402
from omnistream_perception.deploy.onnx_export import export_stream_step  # noqa: E402
from omnistream_perception.deploy.onnx_session import OnnxStreamSession  # noqa: E402
from omnistream_perception.features_codec import decode_patch_tokens  # noqa: E402
from omnistream_perception.image_codec import image_to_depth  # noqa: E402
from omnistream_perception.model import OmniStreamModel  # noqa: E402
from omnistream_perception.model.heads import GeometryHeads, GeometryHeadsConfig  # noqa: E402
from omnistream_perception.ros.image import rgb_to_image  # noqa: E402
from omnistream_perception.ros.perception_node import PerceptionNode  # noqa: E402

pytestmark = pytest.mark.ros

TOLERANCE = 1e-4  # float32 onnxruntime vs torch, as test_export_onnx (measured ~5e-6)
H, W = 64, 96  # the camera's images; with the default max_side 224 the model sees them unchanged
_names = itertools.count()


@pytest.fixture(scope="module")
def heads_checkpoint(fixture_a, tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx_backend_ckpt")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixture_a / name, directory / name)
    config = OmniStreamModel.from_pretrained(fixture_a).config
    torch.manual_seed(0)
    heads = GeometryHeads(GeometryHeadsConfig.for_backbone(config.hidden_size, config.depth, "tiny"))
    torch.nn.init.normal_(heads.camera_head.mlp[-1].weight, std=0.5)
    heads.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def step_file(heads_checkpoint, tmp_path_factory):
    """The node's defaults (window 16, sink 1) at the camera's size, backbone + heads."""
    model = OmniStreamModel.from_pretrained(heads_checkpoint)
    heads = GeometryHeads.from_pretrained(heads_checkpoint)
    path = tmp_path_factory.mktemp("onnx_backend_step") / "step.onnx"
    return export_stream_step(model, path, window=16, sink=1, resolution=(H, W), heads=heads)


@pytest.fixture(scope="module")
def ros_context():
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


def _image(seed: int, sec: int, h: int = H, w: int = W) -> Image:
    msg = rgb_to_image(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    msg.header.stamp.sec, msg.header.frame_id = sec, "cam"
    return msg


class TwoNodes:
    """A torch and an onnxruntime perception_node on the same `image` topic, and a tester, on one executor."""

    def __init__(self, context, checkpoint, onnx_file):
        common = {"checkpoint": str(checkpoint), "feature_dtype": "float32", "min_depth_confidence": 1.0}
        self.nodes = {}
        for backend, extra in (("torch", {}), ("onnxruntime", {"onnx_file": str(onnx_file)})):
            params = {**common, "backend": backend, **extra}
            name = f"perception_{backend}_{next(_names)}"
            overrides = [Parameter(k, value=v) for k, v in params.items()]
            self.nodes[backend] = PerceptionNode(node_name=name, context=context, parameter_overrides=overrides)
        self.tester = rclpy.create_node(f"tester_{next(_names)}", context=context)
        self.executor = MultiThreadedExecutor(context=context)
        for node in (*self.nodes.values(), self.tester):
            self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.image_pub = self.tester.create_publisher(Image, "image", 10)

    def subscribe(self, relative: str, msg_type) -> dict[str, list]:
        received = {}
        for backend, node in self.nodes.items():
            received[backend] = []
            topic = f"/{node.get_name()}/{relative}"
            self.tester.create_subscription(msg_type, topic, received[backend].append, 10)
        return received

    def wait_connected(self, *keys: str) -> None:
        wait_for(lambda: self.image_pub.get_subscription_count() >= 2, what="both nodes to subscribe to image")
        for node in self.nodes.values():
            for key in keys:
                pub = node.cameras["camera"].publishers[key]
                wait_for(lambda pub=pub: pub.get_subscription_count() > 0, what=f"the {key} subscription to match")

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=5)
        for node in (*self.nodes.values(), self.tester):
            node.destroy_node()


def test_onnxruntime_backend_publishes_what_the_torch_backend_publishes(ros_context, heads_checkpoint, step_file):
    pair = TwoNodes(ros_context, heads_checkpoint, step_file)
    try:
        onnx_node = pair.nodes["onnxruntime"]
        assert isinstance(onnx_node.cameras["camera"].pipeline.session.stream, OnnxStreamSession)
        features = pair.subscribe("features", StreamFeatures)
        depth = pair.subscribe("depth_scale_free", Image)
        poses = pair.subscribe("pose", PoseStamped)
        pair.wait_connected("features", "depth", "pose")
        frames = 6
        for i in range(frames):
            pair.image_pub.publish(_image(i, sec=100 + i))
            for got in (features, depth, poses):
                wait_for(lambda got=got, i=i: all(len(v) == i + 1 for v in got.values()), 60, f"outputs of frame {i}")
        ref, exp = features["torch"], features["onnxruntime"]
        assert [m.frame_index for m in exp] == list(range(frames))
        for a, b in zip(ref, exp, strict=True):
            assert a.header.stamp.sec == b.header.stamp.sec
            np.testing.assert_allclose(decode_patch_tokens(b), decode_patch_tokens(a), rtol=0, atol=TOLERANCE)
            np.testing.assert_allclose(np.array(b.cls_token), np.array(a.cls_token), rtol=0, atol=TOLERANCE)
            np.testing.assert_allclose(np.array(b.camera_token), np.array(a.camera_token), rtol=0, atol=TOLERANCE)
        for a, b in zip(depth["torch"], depth["onnxruntime"], strict=True):
            np.testing.assert_allclose(image_to_depth(b), image_to_depth(a), rtol=1e-4, atol=TOLERANCE)
        # the pose really depends on the frames (a constant pose would match whatever ran)
        positions = [np.array([p.pose.position.x, p.pose.position.y, p.pose.position.z]) for p in poses["torch"]]
        assert max(np.abs(p).max() for p in positions[1:]) > 100 * TOLERANCE
        for a, b in zip(poses["torch"], poses["onnxruntime"], strict=True):
            pa, pb = a.pose, b.pose
            va = [pa.position.x, pa.position.y, pa.position.z, pa.orientation.x, pa.orientation.y, pa.orientation.z]
            vb = [pb.position.x, pb.position.y, pb.position.z, pb.orientation.x, pb.orientation.y, pb.orientation.z]
            np.testing.assert_allclose(vb, va, rtol=0, atol=TOLERANCE)

        # an image of another size than the file's: counted as an error and dropped; the node keeps serving
        stats = onnx_node.cameras["camera"].stats
        errors = stats.counts["errors"]
        pair.image_pub.publish(_image(50, sec=200, h=H, w=H))
        wait_for(lambda: stats.counts["errors"] == errors + 1, 60, "the wrong-size image to be refused")
        assert "export again" in stats._last_error
        pair.image_pub.publish(_image(51, sec=201))
        wait_for(lambda: len(features["onnxruntime"]) == frames + 1, 60, "features after the refused image")
    finally:
        pair.close()


# -- bad configurations: one FATAL line, exit 2 ---------------------------------------------------------------
def _other_weights(checkpoint, directory):
    """The same architecture and heads with another patch embedding: a file exported from the original differs."""
    shutil.copytree(checkpoint, directory)
    model = OmniStreamModel.from_pretrained(directory)
    with torch.no_grad():
        proj = model.patch_embed.patch_embed.proj.weight
        proj.add_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(3)) * proj.std())
    model.save_pretrained(directory)
    return directory


# case -> (checkpoint: "heads" | "plain" | "other", parameters, words the error must contain)
CASES = {
    "no_onnx_file": ("heads", {}, ["needs onnx_file", "omnistream export onnx"]),
    "missing_file": ("heads", {"onnx_file": "{missing}"}, ["no such file"]),
    "not_onnx": ("heads", {"onnx_file": "{garbage}"}, ["not a readable ONNX file"]),
    "window": ("heads", {"onnx_file": "{step}", "window": 8}, ["window 16 and sink 1", "window 8"]),
    "unbounded": ("heads", {"onnx_file": "{step}", "window": 0}, ["window 0", "window 16"]),
    "resolution": ("heads", {"onnx_file": "{step}", "max_side": 64}, ["96x64", "max_side 64"]),
    "pooling": ("heads", {"onnx_file": "{step}", "feature_pooling": 3}, ["96x64", "multiples of 48"]),
    "dtype": ("heads", {"onnx_file": "{step}", "dtype": "bfloat16"}, ["dtype float32"]),
    "camera_token": ("heads", {"onnx_file": "{step}", "camera_token": "false"}, ["camera token true"]),
    "no_heads": ("plain", {"onnx_file": "{step}"}, ["geometry heads", "has none"]),
    "weights": ("other", {"onnx_file": "{step}"}, ["was not exported from checkpoint", "features"]),
}


@pytest.fixture(scope="module")
def bad_inputs(fixture_a, heads_checkpoint, step_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_backend_bad")
    garbage = root / "garbage.onnx"
    garbage.write_text("not an onnx graph\n")
    checkpoints = {"heads": heads_checkpoint, "plain": fixture_a, "other": _other_weights(heads_checkpoint, root / "o")}
    files = {"missing": root / "missing.onnx", "garbage": garbage, "step": step_file}
    return checkpoints, files, root


@pytest.mark.parametrize("case", list(CASES))
def test_a_file_that_does_not_fit_the_node_stops_its_configure_with_a_clear_error(ros_context, bad_inputs, case):
    checkpoints, files, _ = bad_inputs
    which, params, words = CASES[case]
    params = {"checkpoint": str(checkpoints[which]), "backend": "onnxruntime", **params}
    params = {k: v.format(**files) if isinstance(v, str) else v for k, v in params.items()}
    overrides = [Parameter(k, value=v) for k, v in params.items()]
    with pytest.raises(ValueError) as error:  # autostart: the failed configure is raised (node_main: FATAL, exit 2)
        PerceptionNode(node_name=f"bad_{case}_{next(_names)}", context=ros_context, parameter_overrides=overrides)
    for word in words:
        assert word in str(error.value), f"{word!r} not in {error.value}"


def test_an_unknown_backend_is_refused_when_declared(ros_context, heads_checkpoint):
    overrides = [Parameter("checkpoint", value=str(heads_checkpoint)), Parameter("backend", value="tensorrt")]
    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime"):
        PerceptionNode(node_name=f"bad_backend_{next(_names)}", context=ros_context, parameter_overrides=overrides)


# As a user starts it (console script): one FATAL line and exit 2. Two processes only: each pays a torch import.
PROCESS_CASES = {
    "no_onnxruntime": (["onnx_file:={step}"], ["needs the onnxruntime and onnx packages", "backend torch"]),
    "window": (["onnx_file:={step}", "window:=8"], ["window 16 and sink 1"]),
}


@pytest.fixture(scope="module")
def results(bad_inputs):
    """Starts one node process per case, both at once; returns case -> (exit code, output)."""
    checkpoints, files, root = bad_inputs
    # an onnxruntime that cannot be imported, found before the installed one
    blocker = root / "no_onnxruntime" / "onnxruntime"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('onnxruntime blocked for this test')\n")
    processes = {}
    for case, (params, _) in PROCESS_CASES.items():
        args = ["-p", f"checkpoint:={checkpoints['heads']}", "-p", "backend:=onnxruntime"]
        for param in params:
            args += ["-p", param.format(**files)]
        env = dict(os.environ)
        if case == "no_onnxruntime":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker.parent), env.get("PYTHONPATH")]))
        command = [_perception_node_command(), "--ros-args", *args]
        processes[case] = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
    out = {}
    for case, process in processes.items():
        try:
            output, _ = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0] + "\n(killed after 240 s: the node kept running)"
        out[case] = (process.returncode, output)
    return out


@pytest.mark.parametrize("case", list(PROCESS_CASES))
def test_a_bad_backend_configuration_is_one_fatal_line_and_exit_2(results, case):
    returncode, output = results[case]
    lines = [line for line in output.splitlines() if line.strip()]
    assert returncode == 2, f"exit code {returncode}:\n{output}"
    assert len(lines) == 1 and "[FATAL]" in lines[0], output
    assert "Traceback" not in output
    for words in PROCESS_CASES[case][1]:
        assert words in lines[0], f"{words!r} not in {lines[0]!r}"
