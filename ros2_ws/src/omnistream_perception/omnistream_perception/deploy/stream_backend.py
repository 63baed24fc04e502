"""Which runtime runs a ``PerceptionSession``'s streaming step: torch (the session as built) or onnxruntime.

``onnxruntime`` runs the float32 step that ``omnistream export onnx`` wrote, on the CPU, through the drop-in
``attach_onnxruntime``. The file is required, never exported on the fly: its resolution is fixed in the graph and
follows from the camera's image size, which the node only learns from its first image, and an export of the
published model takes minutes and the exporter's packages, neither of which belongs in a robot's start-up.

Everything that can be known before the first image is checked when the backend is built and attached, each
problem as one ``ValueError`` naming the fix (the node turns it into one FATAL line and exit 2): onnxruntime
missing, the file missing or not a streaming step, and a file whose window, sink, batch, resolution, backbone,
heads, camera token or weights do not fit the node's settings and checkpoint. A camera whose images become
another size than the file's is refused frame by frame at run time (``OnnxStreamSession.step``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..perception import PerceptionConfig, PerceptionSession

BACKENDS = ("torch", "onnxruntime")
# Relative to the largest value of an output: the exported float32 step matches torch to ~1e-6 of it (README, ONNX),
# a file exported from other weights is off by the order of the values themselves.
WEIGHTS_TOLERANCE = 1e-3
EXPORT_HINT = (
    "omnistream export onnx --checkpoint CKPT --window W --sink S --resolution WIDTHxHEIGHT --out FILE, "
    "WIDTHxHEIGHT being what max_side makes of the camera's images (640x480 at max_side 224: 224x160)"
)


class StreamBackend:
    """The node's ``backend`` / ``onnx_file`` settings, checked against its other settings on construction."""

    def __init__(self, name: str, onnx_file: str, config: PerceptionConfig, *, threads: int | None = None) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
        self.name = name
        self.path = Path(onnx_file) if onnx_file else None
        self.threads = threads
        self.meta: dict | None = None
        self._weights_checked = False
        if self.exported:
            self.meta = self._check_file(config)

    @classmethod
    def from_node_parameters(cls, params: dict, config: PerceptionConfig) -> StreamBackend:
        return cls(params["backend"], params["onnx_file"], config)

    @property
    def exported(self) -> bool:
        return self.name == "onnxruntime"

    def describe(self) -> str:
        return f"onnxruntime ({self.path})" if self.exported else "torch"

    # -- before the checkpoint is loaded ------------------------------------------------------------------------
    def _check_file(self, config: PerceptionConfig) -> dict:
        if config.device != "cpu" or config.dtype != "float32":
            raise ValueError(
                f"backend onnxruntime runs the exported float32 step on the CPU: set device cpu and dtype float32 "
                f"(got device {config.device}, dtype {config.dtype}), or use backend torch"
            )
        if self.path is None:
            raise ValueError(f"backend onnxruntime needs onnx_file, the streaming step written by `{EXPORT_HINT}`")
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                f"backend onnxruntime needs the onnxruntime and onnx packages ({exc}): "
                "pip install -r requirements.txt, or use backend torch"
            ) from exc
        from .onnx_session import read_metadata

        if not self.path.is_file():
            raise ValueError(f"onnx_file {self.path}: no such file (write it with `{EXPORT_HINT}`)")
        try:
            meta = read_metadata(self.path)
        except ValueError as exc:
            raise ValueError(f"onnx_file {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - onnx raises protobuf's own errors for a file that is not ONNX
            raise ValueError(f"onnx_file {self.path} is not a readable ONNX file: {_one_line(exc)}") from exc
        self._check_settings(meta, config)
        return meta

    def _check_settings(self, meta: dict, config: PerceptionConfig) -> None:
        path, window, sink = self.path, meta["window"], meta["sink"]
        if config.window is None:
            raise ValueError(
                f"window 0 (a cache that grows) cannot run an exported step, whose cache has a fixed number of "
                f"slots: set window {window} and sink {sink} as onnx_file {path} was exported"
            )
        if (config.window, config.sink) != (window, sink):
            raise ValueError(
                f"onnx_file {path} was exported with window {window} and sink {sink}, the node has window "
                f"{config.window} and sink {config.sink}: set them to match, or export again with the node's"
            )
        if meta["batch_size"] != 1:
            raise ValueError(f"onnx_file {path} was exported for batch {meta['batch_size']}; export it with batch 1")
        height, width = meta["resolution"]
        multiple = meta["patch_size"] * config.feature_pooling
        if height % multiple or width % multiple:
            raise ValueError(
                f"onnx_file {path} takes {width}x{height} images, a size the node's images never become: with "
                f"feature_pooling {config.feature_pooling} both sides are multiples of {multiple} px; export again "
                f"with `{EXPORT_HINT}`"
            )
        if config.max_side is not None and max(height, width) > config.max_side:
            raise ValueError(
                f"onnx_file {path} takes {width}x{height} images, larger than max_side {config.max_side} lets any "
                f"image become: raise max_side, or export again with `{EXPORT_HINT}`"
            )

    # -- with the checkpoint loaded -----------------------------------------------------------------------------
    def attach(self, session: PerceptionSession) -> PerceptionSession:
        """``session`` with its streaming step on this backend (unchanged for torch); ValueError when the file
        does not fit the session's backbone, heads or camera token, or was exported from other weights."""
        if not self.exported:
            return session
        from .onnx_session import attach_onnxruntime

        meta, path = self.meta, self.path
        assert meta is not None
        cfg = session.model.config
        have = (meta["patch_size"], meta["hidden_size"], meta["layers"], meta["num_heads"])
        wanted = (cfg.patch_size, cfg.hidden_size, cfg.depth, cfg.num_attention_heads)
        if have != wanted:
            raise ValueError(
                f"onnx_file {path} was exported from another backbone: (patch, hidden size, layers, heads) = {have}, "
                f"the checkpoint's {wanted}; export it from this checkpoint"
            )
        if meta["heads"] != session.has_heads:
            raise ValueError(
                f"onnx_file {path} was exported with geometry heads and the checkpoint has none: export it from "
                "this checkpoint"
                if meta["heads"]
                else f"the checkpoint has geometry heads and onnx_file {path} was exported without them (--no-heads):"
                " depth and pose would be missing; export it again with its heads"
            )
        if session.has_heads and list(meta["head_layers"]) != list(session.heads.layers):
            raise ValueError(f"onnx_file {path}'s heads read layers {meta['head_layers']}, the checkpoint's heads "
                             f"{session.heads.layers}: export it from this checkpoint")  # fmt: skip
        if meta["camera_token"] != session.stream.camera_token:
            raise ValueError(
                f"onnx_file {path} was exported with camera token {str(meta['camera_token']).lower()}, the node runs "
                f"with {str(session.stream.camera_token).lower()}: set camera_token to match, or export again"
            )
        frame = torch.randn(1, 3, *meta["resolution"], generator=torch.Generator().manual_seed(0))
        reference = None if self._weights_checked else _torch_outputs(session, frame, tuple(meta["resolution"]))
        try:
            attach_onnxruntime(session, path, threads=self.threads)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors for a graph it cannot load
            raise ValueError(f"onnx_file {path}: onnxruntime cannot load it: {_one_line(exc)}") from exc
        if reference is not None:
            got = _exported_outputs(session, frame)
            session.reset()
            for name, value in reference.items():
                scale = max(float(value.abs().max()), 1e-6)
                diff = float((got[name] - value).abs().max())
                if diff > WEIGHTS_TOLERANCE * scale:
                    raise ValueError(
                        f"onnx_file {path} was not exported from checkpoint {session.config.checkpoint}: its {name} "
                        f"differs by {diff:.3g} (largest value {scale:.3g}) on a test frame; export it from this "
                        "checkpoint"
                    )
            self._weights_checked = True  # one model for every camera: once is enough
        return session


def _torch_outputs(session: PerceptionSession, frame: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """torch's features (and depth and pose with heads) of ``frame`` as a stream's first frame; stream left empty."""
    stream, heads = session.stream, session.heads
    with torch.inference_mode():
        out = stream.step(frame, output_hidden_states=heads.layers if heads is not None else False)
        result = {"features": out.last_hidden_state[0, -1], "cls": out.pooler_output[0, -1]}
        if heads is not None:
            result["depth"] = heads(out, size, rays=False)["depth"][0, -1]
            if out.camera_token is not None:
                result["pose"] = heads.camera_head(out.camera_token[0, -1])
    stream.reset()
    return result


def _exported_outputs(session: PerceptionSession, frame: torch.Tensor) -> dict[str, torch.Tensor]:
    out = session.stream.step(frame)
    result = {"features": out.last_hidden_state[0, -1], "cls": out.pooler_output[0, -1]}
    if out.heads is not None:
        result["depth"] = out.heads["depth"][0, -1]
        if "pose_enc" in out.heads:
            result["pose"] = out.heads["pose_enc"][0, -1]
    return result


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
