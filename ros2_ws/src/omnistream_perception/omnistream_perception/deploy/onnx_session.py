"""An onnxruntime-backed streaming session with the interface of ``OmniStreamSession``.

The exported graph (``onnx_export.py``) computes one frame against ``window`` cache slots; this class keeps
the slots in numpy and decides where each new frame goes, with the semantics of the torch windowed
``KVCache``: the first ``sink`` frames of the stream stay, the other ``window - sink`` slots hold the most
recent frames (the newest replaces the oldest), and time is always the absolute frame index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cpu_threads import default_threads
from ..model.modeling_omnistream import OmniStreamOutput
from ..model.streaming import OmniStreamSession, warn_stream_restart
from .onnx_export import FORMAT_VERSION, METADATA_KEY, _float32_cpu


@dataclass
class OnnxStreamOutput(OmniStreamOutput):
    """``OmniStreamOutput`` plus what the geometry heads inside the graph computed (B, T, ...), if any."""

    heads: dict[str, torch.Tensor] | None = None


def read_metadata(path: str | Path) -> dict:
    """The step's metadata (window, sink, resolution, outputs, ...) from an exported file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} is not an OmniStream streaming step (no {METADATA_KEY!r} metadata)")
    meta = json.loads(props[METADATA_KEY])
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has step format {meta.get('format_version')}, this code reads {FORMAT_VERSION}: export it again"
        )
    return meta


def ring_slot(frame_index: int, window: int, sink: int) -> int | None:
    """The cache slot of frame ``frame_index``; None when it is not kept (window of sinks only, already full)."""
    if frame_index < window:
        return frame_index
    recent = window - sink
    return sink + (frame_index - sink) % recent if recent > 0 else None


class OnnxStreamSession:
    """Drop-in for ``OmniStreamSession(model, window=W, sink=S, camera_token=...)`` backed by an exported step."""

    def __init__(self, path: str | Path, *, threads: int | None = None, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.meta = read_metadata(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            # The stack's CPU policy (cpu_threads.py) for torch, applied to onnxruntime's own pool: idle workers
            # sleep at once instead of spinning against other processes for the same cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.path), options, providers=list(providers or ["CPUExecutionProvider"])
        )
        m = self.meta
        self.window: int = m["window"]
        self.sink: int = m["sink"]
        self.batch_size: int = m["batch_size"]
        self.camera_token: bool = m["camera_token"]
        self.resolution: tuple[int, int] = tuple(m["resolution"])
        self.grid: tuple[int, int] = tuple(m["grid"])
        self.output_names: list[str] = m["outputs"]
        n = m["tokens_per_frame"]
        self._cache_shape = (m["layers"], self.batch_size, m["num_heads"], self.window * n, m["head_dim"])
        self.reset()

    # -- the OmniStreamSession interface ---------------------------------------------------------------
    @property
    def has_heads(self) -> bool:
        return bool(self.meta["heads"])

    @property
    def head_layers(self) -> list[int]:
        return list(self.meta["head_layers"])

    @property
    def cached_frames(self) -> int:
        return int(self._valid.sum())

    @property
    def cache_bytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes

    def reset(self) -> None:
        """Forgets every frame: the next one is frame 0 again (first-frame tokens, time 0)."""
        self._keys = np.zeros(self._cache_shape, dtype=np.float32)
        self._values = np.zeros(self._cache_shape, dtype=np.float32)
        self._valid = np.zeros(self.window, dtype=bool)
        self.frames_seen = 0
        self._resolution: tuple[int, int] | None = None
        self.last_output: OnnxStreamOutput | None = None

    def step(
        self,
        pixel_values: torch.Tensor | np.ndarray,
        aspect_ratio: float | torch.Tensor | None = None,
        *,
        output_hidden_states: bool | Sequence[int] = False,
    ) -> OnnxStreamOutput:
        """Encodes the next frame ``(B, 3, H, W)`` or the next ``k`` frames ``(B, k, 3, H, W)`` (one by one)."""
        if aspect_ratio is not None:
            raise ValueError("the exported step uses the aspect ratio of its resolution; aspect_ratio must be None")
        wanted = output_hidden_states
        if wanted is not False and (wanted is True or not self.has_heads or list(wanted) != self.head_layers):
            # The heads' layers are what PerceptionSession asks for: they are consumed inside the graph.
            raise ValueError(
                f"the exported step returns no hidden states (its heads use layers {self.head_layers} inside the graph)"
            )
        pixels = pixel_values.detach().float().cpu().numpy() if torch.is_tensor(pixel_values) else pixel_values
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim == 4:
            pixels = pixels[:, None]
        if pixels.ndim != 5 or pixels.shape[2] != 3:
            raise ValueError(f"pixel_values must have shape (batch, [frames,] 3, height, width), got {pixels.shape}")
        b, k, _, h, w = pixels.shape
        if self._resolution is not None and (h, w) != self._resolution:
            # A new size ends the stream, as in the torch session, even though the graph then refuses the frame.
            warn_stream_restart(self._resolution, (h, w))
            self.reset()
        if b != self.batch_size or (h, w) != self.resolution:
            raise ValueError(
                f"the exported step takes batch {self.batch_size} at {self.resolution[0]}x{self.resolution[1]} (HxW), "
                f"got batch {b} at {h}x{w}: export again with that resolution"
            )
        if k == 0:
            raise ValueError("pixel_values has no frames")
        steps = [self._step_one(np.ascontiguousarray(pixels[:, i])) for i in range(k)]
        self._resolution = (h, w)
        per = {name: np.stack([s[name] for s in steps], axis=1) for name in self.output_names if "new_" not in name}
        as_t = torch.from_numpy
        heads = {n: as_t(per[n]) for n in ("depth", "depth_conf", "rays", "points", "pose_enc") if n in per}
        out = OnnxStreamOutput(
            last_hidden_state=as_t(per["last_hidden_state"]),
            pooler_output=as_t(per["pooler_output"]),
            camera_token=as_t(per["camera_token"]) if self.camera_token else None,
            hidden_states=None,
            patch_start_idx=self.meta["patch_start_idx"],
            grid_size=self.grid,
            frame_indices=torch.arange(self.frames_seen - k, self.frames_seen),
            heads=heads or None,
        )
        self.last_output = out
        return out

    def _step_one(self, frame: np.ndarray) -> dict[str, np.ndarray]:
        t = self.frames_seen
        feeds = {"pixel_values": frame, "frame_index": np.array([t], dtype=np.int64), "past_valid": self._valid}
        for i in range(self._cache_shape[0]):  # contiguous per-layer views: onnxruntime reads them in place
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = self._keys[i], self._values[i]
        result = dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
        slot = ring_slot(t, self.window, self.sink)
        if slot is not None:
            n = self.meta["tokens_per_frame"]
            self._keys[:, :, :, slot * n : (slot + 1) * n] = result["new_key"]
            self._values[:, :, :, slot * n : (slot + 1) * n] = result["new_value"]
            self._valid[slot] = True
        self.frames_seen = t + 1
        return result


class OnnxGeometryHeads:
    """Stands in for ``GeometryHeads`` where the heads ran inside the exported graph: returns their results.

    Callers that use ``heads(output, image_size, rays=...)`` and ``heads.camera_head(output.camera_token[0, -1])``
    (``PerceptionSession``) get the graph's depth/confidence and pose of the step that produced ``output``.
    """

    def __init__(self, session: OnnxStreamSession) -> None:
        if not session.has_heads:
            raise ValueError(f"{session.path} was exported without geometry heads")
        self.session = session

    @property
    def layers(self) -> list[int]:
        return self.session.head_layers

    def to(self, *args, **kwargs) -> OnnxGeometryHeads:
        return self

    def eval(self) -> OnnxGeometryHeads:
        return self

    def __call__(self, output: OmniStreamOutput, image_size: tuple[int, int], *, rays: bool = True):
        heads = getattr(output, "heads", None)
        if heads is None:
            raise ValueError("this output did not come from an exported step with heads")
        if tuple(image_size) != self.session.resolution:
            raise ValueError(f"the heads were exported for {self.session.resolution}, asked for {tuple(image_size)}")
        if rays and "rays" not in heads:
            raise ValueError("the step was exported without rays: export again with rays")
        wanted = ("depth", "depth_conf") + (("rays", "points") if rays else ())
        return {name: heads[name] for name in wanted}

    def camera_head(self, camera_token: torch.Tensor) -> torch.Tensor:
        """The pose encoding of the latest frame, whose camera token is ``camera_token``."""
        last = self.session.last_output
        if last is None or last.heads is None or "pose_enc" not in last.heads:
            raise ValueError("no pose: the exported step has no camera head output yet")
        if not torch.equal(camera_token, last.camera_token[0, -1]):
            raise ValueError("camera_head() expects the camera token of the latest step")
        return last.heads["pose_enc"][0, -1]


def attach_onnxruntime(perception, path: str | Path, *, threads: int | None = None) -> OnnxStreamSession:
    """Switches a ``PerceptionSession`` to an exported step: same ``process()`` results, onnxruntime inside.

    The session's window/sink/camera token must match the file (they are part of the graph); its images must
    come out of the processor at the exported resolution.
    """
    onnx_stream = OnnxStreamSession(path, threads=threads)
    torch_stream = perception.stream
    wanted = (torch_stream.window, torch_stream.sink, torch_stream.camera_token)
    have = (onnx_stream.window, onnx_stream.sink, onnx_stream.camera_token)
    if wanted != have:
        raise ValueError(f"{path} has (window, sink, camera_token) = {have}, the perception session {wanted}")
    if onnx_stream.batch_size != 1:
        raise ValueError(f"{path} was exported for batch {onnx_stream.batch_size}; perception streams one camera")
    perception.reset()
    perception.stream = onnx_stream
    perception.heads = OnnxGeometryHeads(onnx_stream) if onnx_stream.has_heads else None
    return onnx_stream


def compare_with_torch(
    model, heads, path: str | Path, *, frames: int = 40, seed: int = 0, threads: int | None = None
) -> dict[str, float]:
    """Streams ``frames`` random frames through the exported step and through torch (same window, sink and
    camera token, float32); returns the max abs difference of every output over the whole stream."""
    onnx_stream = OnnxStreamSession(path, threads=threads)
    model = _float32_cpu(model)
    heads = _float32_cpu(heads) if heads is not None and onnx_stream.has_heads else None
    stream = OmniStreamSession(
        model,
        batch_size=onnx_stream.batch_size,
        window=onnx_stream.window,
        sink=onnx_stream.sink,
        camera_token=onnx_stream.camera_token,
    )
    rays = bool(onnx_stream.meta["rays"])
    generator = torch.Generator().manual_seed(seed)
    diffs: dict[str, float] = {}
    for _ in range(frames):
        frame = torch.randn(onnx_stream.batch_size, 3, *onnx_stream.resolution, generator=generator)
        got = onnx_stream.step(frame)
        with torch.inference_mode():
            ref = stream.step(frame, output_hidden_states=heads.layers if heads is not None else False)
            pairs = {"last_hidden_state": (ref.last_hidden_state, got.last_hidden_state)}
            pairs["pooler_output"] = (ref.pooler_output, got.pooler_output)
            if ref.camera_token is not None:
                pairs["camera_token"] = (ref.camera_token, got.camera_token)
            if heads is not None:
                pred = heads(ref, onnx_stream.resolution, rays=rays)
                if ref.camera_token is not None:
                    pred["pose_enc"] = heads.camera_head(ref.camera_token)
                pairs.update({name: (value, got.heads[name]) for name, value in pred.items()})
        for name, (a, b) in pairs.items():
            diffs[name] = max(diffs.get(name, 0.0), float((a.float() - b.float()).abs().max()))
    return diffs
