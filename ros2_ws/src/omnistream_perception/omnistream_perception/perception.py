"""One camera's streaming perception, rclpy-free: image in -> features (+ depth, pose, points) out.

The perception node holds one :class:`PerceptionSession` per camera; the simulator harnesses and the
demo use it directly. Work that nobody asked for is skipped: no hidden states, no DPT and no camera head
unless depth/pose/points are wanted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import OmniStreamModel, OmniStreamSession
from .model.configuration_omnistream import CONFIG_NAME
from .model.geometry import depth_to_world_points, intrinsics_from_fov, pose_encoding_to_matrix
from .model.heads import GeometryHeads
from .model.modeling_omnistream import WEIGHTS_NAME, resolve_pretrained_dir
from .model.streaming import as_dtype
from .processor import OmniStreamImageProcessor, pool_patch_tokens

# The camera_token setting as a string (ROS parameter, launch files) -> PerceptionConfig.camera_token.
CAMERA_TOKEN_CHOICES: dict[str, bool | None] = {"auto": None, "true": True, "false": False}


@dataclass
class PerceptionConfig:
    checkpoint: str
    device: str = "cpu"
    dtype: str = "float32"
    max_side: int | None = None  # resize keeping aspect so the longer side is <= max_side
    window: int | None = None  # bounded KV cache (frames); None keeps the whole stream
    sink: int = 1
    feature_pooling: int = 2  # 2x2 average pooling per frame, as the paper feeds the LLM; 1 = none
    camera_token: bool | None = None  # None: on when geometry heads are present
    feature_dtype: str = "float16"  # of the published patch tokens: "float16" | "float32"

    def __post_init__(self) -> None:
        if self.feature_dtype not in ("float16", "float32"):
            raise ValueError(f"feature_dtype must be 'float16' or 'float32', got {self.feature_dtype!r}")
        if self.feature_pooling < 1:
            raise ValueError(f"feature_pooling must be >= 1, got {self.feature_pooling}")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be >= 16 pixels, got {self.max_side}")

    @classmethod
    def from_node_parameters(cls, params: dict) -> PerceptionConfig:
        """From perception_node's parameter values (0 = no limit for max_side and window)."""
        return cls(
            checkpoint=params["checkpoint"],
            device=params["device"],
            dtype=params["dtype"],
            max_side=params["max_side"] or None,
            window=params["window"] or None,
            sink=params["sink"],
            feature_pooling=params["feature_pooling"],
            camera_token=CAMERA_TOKEN_CHOICES[params["camera_token"]],
            feature_dtype=params["feature_dtype"],
        )


def check_device(device: str) -> torch.device:
    """``device`` as a torch device; ValueError when this machine or torch build cannot run on it."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} is not available: this torch build or machine has no CUDA; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available on this machine; use cpu")
    return dev


def load_backbone_and_heads(checkpoint: str | Path) -> tuple[OmniStreamModel, GeometryHeads | None]:
    """The backbone of ``checkpoint`` and its geometry heads when saved beside it (None otherwise)."""
    directory = resolve_pretrained_dir(checkpoint, [CONFIG_NAME, WEIGHTS_NAME])
    model = OmniStreamModel.from_pretrained(directory)
    heads = GeometryHeads.from_pretrained(directory) if GeometryHeads.present(Path(directory)) else None
    return model, heads


@dataclass
class PerceptionResult:
    frame_index: int
    grid: tuple[int, int]  # feature grid after pooling
    patch_tokens: np.ndarray  # (gh, gw, D) in feature_dtype
    cls_token: np.ndarray  # (D,) float32
    camera_token: np.ndarray | None
    depth: np.ndarray | None = None  # (H, W) float32 at the input resolution
    confidence: np.ndarray | None = None
    pose: np.ndarray | None = None  # (4, 4) camera-to-world, world = first camera frame of the stream
    intrinsics: np.ndarray | None = None  # (3, 3) predicted, for the input resolution
    points: np.ndarray | None = None  # (N, 3) float32 world points (N = H*W)
    timings: dict[str, float] = field(default_factory=dict)


class PerceptionSession:
    def __init__(self, model: OmniStreamModel, heads: GeometryHeads | None, config: PerceptionConfig) -> None:
        self.config = config
        self.device = check_device(config.device)
        self.dtype = as_dtype(config.dtype)
        self.model = model.to(self.device, self.dtype).eval()
        self.heads = heads.to(self.device, self.dtype).eval() if heads is not None else None
        use_camera = config.camera_token if config.camera_token is not None else heads is not None
        self.processor = OmniStreamImageProcessor(config.max_side, model.config.patch_size * config.feature_pooling)
        # The stream holds the KV cache, the frame counter and the resolution guard (a new model input size restarts it).
        self.stream = OmniStreamSession(self.model, window=config.window, sink=config.sink, camera_token=use_camera)

    @classmethod
    def from_config(cls, config: PerceptionConfig) -> PerceptionSession:
        check_device(config.device)  # before loading a large checkpoint for nothing
        return cls(*load_backbone_and_heads(config.checkpoint), config)

    # -- state ----------------------------------------------------------------------------------------
    @property
    def has_heads(self) -> bool:
        return self.heads is not None

    @property
    def frames_seen(self) -> int:
        return self.stream.frames_seen

    @property
    def cached_frames(self) -> int:
        return self.stream.cached_frames

    @property
    def cache_bytes(self) -> int:
        return self.stream.cache_bytes

    def reset(self) -> None:
        self.stream.reset()

    # -- one frame ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def process(
        self,
        rgb: np.ndarray,
        want_depth: bool = True,
        want_pose: bool = True,
        want_points: bool = False,
        intrinsics: np.ndarray | None = None,
    ) -> PerceptionResult:
        """Encodes the next frame. ``intrinsics`` (3x3, e.g. from CameraInfo) override the predicted ones for points."""
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            desc = f"{type(rgb).__name__} {getattr(rgb, 'dtype', '')} {getattr(rgb, 'shape', '')}"
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got {desc}")
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise ValueError(f"empty image: {rgb.shape}")
        timings: dict[str, float] = {}
        size = rgb.shape[:2]
        t0 = time.perf_counter()
        pixels = self.processor(rgb, self.device, self.dtype)
        t1 = time.perf_counter()
        heads = self.heads
        want_depth = heads is not None and (want_depth or want_points)
        want_pose = heads is not None and self.stream.camera_token and (want_pose or want_points)
        out = self.stream.step(pixels, output_hidden_states=heads.layers if want_depth else False)
        t2 = time.perf_counter()
        timings["preprocess_ms"] = (t1 - t0) * 1e3
        timings["backbone_ms"] = (t2 - t1) * 1e3

        tokens = pool_patch_tokens(out.last_hidden_state[0, 0], out.grid_size, self.config.feature_pooling)
        result = PerceptionResult(
            frame_index=int(out.frame_indices[-1]),
            grid=(tokens.shape[0], tokens.shape[1]),
            patch_tokens=tokens.to(getattr(torch, self.config.feature_dtype)).cpu().numpy(),
            cls_token=out.pooler_output[0, 0].float().cpu().numpy(),
            camera_token=None if out.camera_token is None else out.camera_token[0, 0].float().cpu().numpy(),
        )
        if want_depth or want_pose:
            self._run_heads(out, pixels.shape[-2:], size, want_depth, want_pose, want_points, intrinsics, result)
        timings["heads_ms"] = (time.perf_counter() - t2) * 1e3
        result.timings = timings
        return result

    def _run_heads(self, out, model_size, input_size, want_depth, want_pose, want_points, intrinsics, result) -> None:
        assert self.heads is not None
        h, w = input_size
        if want_pose:
            pose_enc = self.heads.camera_head(out.camera_token[0, 0]).float()
            result.pose = pose_encoding_to_matrix(pose_enc).double().cpu().numpy()
            result.intrinsics = intrinsics_from_fov(pose_enc[7:9], h, w).double().cpu().numpy()
        if want_depth:
            pred = self.heads(out, tuple(model_size), rays=False)
            depth = pred["depth"][0, 0].float()
            conf = pred["depth_conf"][0, 0].float()
            if tuple(depth.shape) != (h, w):
                both = F.interpolate(
                    torch.stack([depth, conf])[None], size=(h, w), mode="bilinear", align_corners=False
                )[0]
                depth, conf = both[0], both[1]
            result.depth = depth.cpu().numpy()
            result.confidence = conf.cpu().numpy()
            if want_points:
                k = intrinsics if intrinsics is not None else result.intrinsics
                pose = result.pose if result.pose is not None else np.eye(4)
                if k is None:
                    raise ValueError("points need intrinsics: pass CameraInfo or run with the camera token")
                pts = depth_to_world_points(
                    depth, torch.as_tensor(k, dtype=torch.float32), torch.as_tensor(pose, dtype=torch.float32)
                )
                result.points = pts.reshape(-1, 3).cpu().numpy()
