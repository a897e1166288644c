"""Exported face models (.onnx, .tflite): the JSON sidecar that describes them and the runtimes that run them.

Torch-free, so an inference-only device needs only numpy plus onnxruntime or a TFLite runtime. The sidecar
sits next to the model file with the same stem and a .json suffix.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SIDECAR_FORMAT = "facefed-export"
# The backbone's input convention, (x - 127.5) / 128 on RGB pixels: model_zoo.data.normalize_pixels
# (a test keeps the two equal).
PIXEL_MEAN = 127.5
PIXEL_STD = 128.0
LAYOUTS = ("NCHW", "NHWC")
# ai_edge_litert is the current TFLite runtime (same Interpreter API) and works with numpy 2;
# tflite_runtime 2.14 needs numpy<2, so it is only the fallback for devices that have just that.
TFLITE_RUNTIMES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def check_faces(images, size: int) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB faces [N,{size},{size},3], got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("no images to embed")
    return images


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), np.float32(1e-12))


@dataclass(frozen=True)
class InputSpec:
    size: int = 112
    layout: str = "NCHW"  # NCHW for torch and ONNX; NHWC for TFLite, its native layout
    mean: float = PIXEL_MEAN
    std: float = PIXEL_STD
    color: str = "RGB"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    def prepare(self, images) -> np.ndarray:
        """uint8 NHWC RGB faces -> float32 model input, normalised and in this layout."""
        images = check_faces(images, self.size)
        pixels = (images.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2) if self.layout == "NCHW" else pixels)


@dataclass(frozen=True)
class Quantization:
    scheme: str  # e.g. "static PTQ, QDQ"
    weights: str
    activations: str
    calibration: str  # observer / calibration method
    calibration_images: int
    float_layers: list[str] = field(default_factory=list)  # layers kept in float32


@dataclass(frozen=True)
class AgreementCheck:
    """The exported file against the torch model on the calibration images (or synthetic ones)."""

    data: str  # where the images came from
    images: int
    mean_cosine: float
    min_cosine: float
    torch_accuracy: float | None  # verification accuracy, when the images are labelled
    export_accuracy: float | None


@dataclass(frozen=True)
class ExportCard:
    export_format: str  # onnx, onnx-int8, tflite, tflite-int8
    model_file: str
    model_version: int
    arch: str
    arch_kwargs: dict
    embedding_size: int
    input: InputSpec
    source_sha256: str  # sha256 of the source checkpoint file (of a module: its tensors as safetensors)
    source_path: str | None
    file_sha256: str
    file_bytes: int
    quantization: Quantization | None
    check: AgreementCheck
    tools: dict  # package versions that produced the file
    format: str = SIDECAR_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: dict) -> ExportCard:
        if raw.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"not a {SIDECAR_FORMAT} sidecar (format={raw.get('format')!r})")
        quantization = raw.get("quantization")
        return cls(**{**raw, "input": InputSpec(**raw["input"]), "check": AgreementCheck(**raw["check"]),
                      "quantization": Quantization(**quantization) if quantization else None})


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(model_path) -> Path:
    return Path(model_path).with_suffix(".json")


def read_card(model_path) -> ExportCard:
    """The sidecar of an exported model, checked against the model file's size and sha256."""
    model_path = Path(model_path)
    path = sidecar_path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{model_path} has no sidecar {path}: export it with `facefed export`")
    try:
        card = ExportCard.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:  # truncated or edited: one line naming the file
        raise ValueError(f"{path}: not a usable sidecar ({type(exc).__name__}: {exc})") from None
    if sha256_file(model_path) != card.file_sha256:
        raise ValueError(f"{model_path} does not match its sidecar {path.name} (sha256 differs)")
    return card


class OnnxModel:
    """onnxruntime session on the CPU: float32 model input -> raw embeddings."""

    def __init__(self, path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # the graph is a chain: no parallel branches to run
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels})[0]


def tflite_interpreter_class() -> tuple[type, str]:
    """(Interpreter class, module name): the first of TFLITE_RUNTIMES that imports."""
    for module in TFLITE_RUNTIMES:
        try:
            return importlib.import_module(module).Interpreter, module
        except ImportError:
            continue
    raise ImportError("no TFLite runtime: pip install 'facefed-edge[tflite]' (ai-edge-litert), or tflite-runtime "
                      "on a device with numpy<2")


class TfliteModel:
    """TFLite interpreter: float32 NHWC model input -> raw embeddings, one face per invoke."""

    def __init__(self, path, threads: int = 1) -> None:
        interpreter_class, self.runtime = tflite_interpreter_class()
        self.interpreter = interpreter_class(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        if self._output["dtype"] != np.float32:
            raise ValueError(f"{path}: expected a float32 output, got {self._output['dtype']}")

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        # Converted with a fixed batch of 1 (the converter traces static shapes).
        return np.concatenate([self._invoke(pixels[i:i + 1]) for i in range(len(pixels))])

    def _invoke(self, pixels: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self._input["index"], quantize_input(pixels, self._input))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output["index"]).copy()


def quantize_input(pixels: np.ndarray, detail: dict) -> np.ndarray:
    """An int8 model's input tensor takes quantized values: q = round(x / scale) + zero_point, saturated."""
    scale, zero_point = detail["quantization"]
    dtype = detail["dtype"]
    if not scale:
        return pixels.astype(dtype, copy=False)
    limits = np.iinfo(dtype)
    return np.clip(np.round(pixels / scale) + zero_point, limits.min, limits.max).astype(dtype)


RUNTIMES = {".onnx": OnnxModel, ".tflite": TfliteModel}


def open_runtime(path, threads: int = 1):
    """OnnxModel or TfliteModel, by the file's suffix."""
    suffix = Path(path).suffix
    if suffix not in RUNTIMES:
        raise ValueError(f"{path}: exported models end in {' or '.join(RUNTIMES)}")
    return RUNTIMES[suffix](path, threads)


def embed_batches(forward, spec: InputSpec, images, batch_size: int = 32, normalize: bool = True) -> np.ndarray:
    """float32 [N, D] embeddings of uint8 faces, L2-normalised unless normalize is False (a model scored by raw
    L2); forward maps prepared input to raw embeddings."""
    images = check_faces(images, spec.size)
    chunks = [np.asarray(forward(spec.prepare(images[i:i + batch_size])), dtype=np.float32)
              for i in range(0, len(images), batch_size)]
    embeddings = np.concatenate(chunks)
    return l2_normalize(embeddings) if normalize else embeddings
