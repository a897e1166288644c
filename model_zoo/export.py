"""Export a face backbone for on-device inference: ONNX fp32 / int8 and TFLite fp32 / int8, with a JSON sidecar.

- onnx: torch.onnx's dynamo exporter, one self-contained file, dynamic batch.
- onnx-int8: onnxruntime static post-training quantization: QDQ, int8 per-channel weights, uint8 per-tensor
  activations (the fast pairing on x86), MinMax ranges from calibration images; the first convolution stays
  float (faster so), and with float_ends the last one too.
- tflite / tflite-int8: litert-torch (the optional `tflite-convert` extra), NHWC input, batch 1; int8 by PT2E
  static quantization (int8 per-channel weights, int8 activations, histogram calibration).

Files are named by model version, `facefed-v{version}-{format}.{onnx|tflite}`, and the sidecar records the
input convention, the source checkpoint hash and how well the file agrees with the torch model on the
calibration images (mean cosine, and verification accuracy when the images are labelled).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save as safetensors_bytes
from torch import nn

from .backbones import PRETRAINED_FACEAPI, backbone_spec, build_backbone
from .checkpoint import load_checkpoint, shared_tensors
from .data import IMAGE_EXTENSIONS, IMAGE_SIZE, letterbox, load_dataset, read_image, to_model_input, to_rgb
from .exported import (AgreementCheck, ExportCard, InputSpec, Quantization, check_faces, embed_batches,
                       open_runtime, sha256_file, sidecar_path)
from .metrics import verification_report
from .train import embed_images

PRETRAINED = PRETRAINED_FACEAPI  # export_model's name for the pretrained face-api descriptor, unmodified
FORMATS = ("onnx", "onnx-int8", "tflite", "tflite-int8")
SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".onnx", "tflite": ".tflite", "tflite-int8": ".tflite"}
INPUT_NAME, OUTPUT_NAME = "pixels", "embedding"
# Calibration and the agreement check use at most this many images, evenly spread over the set given:
# ranges settle well before that, and TFLite calibration runs one image at a time.
CALIBRATION_LIMIT = 256
SYNTHETIC_CHECK_IMAGES = 16  # fp32 exports without calibration images are checked on seeded noise
# torch.onnx.export keeps process-wide state while it runs: one export at a time (devices simulated as threads
# in one process each quantize their own trunk).
_ONNX_EXPORT = threading.Lock()
TOOLS = {"onnx": ("torch", "onnx", "onnxscript", "onnxruntime"), "tflite": ("torch", "litert-torch")}


@dataclass(frozen=True)
class ExportResult:
    model_path: Path
    sidecar_path: Path
    card: ExportCard


@dataclass(frozen=True)
class Faces:
    images: np.ndarray  # uint8 [N, H, W, 3] RGB
    labels: np.ndarray | None  # identity labels when the folder is a labelled dataset
    origin: str


@dataclass(frozen=True)
class Source:
    backbone: nn.Module  # a private eval-mode copy
    sha256: str
    path: str | None
    meta: dict


def export_file_name(model_version: int, fmt: str) -> str:
    return f"facefed-v{model_version}-{fmt}{SUFFIXES[fmt]}"


def export_model(model, fmt: str, out_dir, calibration=None, model_version: int | None = None, *,
                 float_ends: bool = False) -> ExportResult:
    """Export a checkpoint path, a backbone module or PRETRAINED to out_dir and write its sidecar.

    calibration: uint8 NHWC faces or a folder of them (required for the int8 formats).
    model_version: default is the checkpoint's meta["model_version"].
    float_ends: onnx-int8 only; keep the last convolution in float32 as well as the first (always float).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if float_ends and fmt != "onnx-int8":
        raise ValueError("float_ends applies to onnx-int8 only (the PT2E quantizer cannot skip modules)")
    source = load_source(model)
    version = _model_version(model_version, source.meta)
    faces = calibration_faces(calibration)
    quantized = fmt.endswith("-int8")
    if quantized and faces is None:
        raise ValueError(f"{fmt} needs calibration images (an array or a folder)")
    faces = _spread(faces or _synthetic_faces(), CALIBRATION_LIMIT)
    spec = InputSpec(size=IMAGE_SIZE, layout="NHWC" if fmt.startswith("tflite") else "NCHW")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / export_file_name(version, fmt)
    # Build in a scratch folder and move into place, so a reader never sees half a file.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as scratch:
        built = Path(scratch) / path.name
        calibration_pixels = spec.prepare(faces.images) if quantized else None
        quantization = _build(fmt, source.backbone, built, calibration_pixels, float_ends)
        arch, arch_kwargs = backbone_spec(source.backbone)
        card = ExportCard(
            export_format=fmt, model_file=path.name, model_version=version, arch=arch, arch_kwargs=arch_kwargs,
            embedding_size=_embedding_size(source.backbone), input=spec,
            source_sha256=source.sha256, source_path=source.path,
            file_sha256=sha256_file(built), file_bytes=built.stat().st_size,
            quantization=quantization, check=agreement_check(source.backbone, built, spec, faces),
            tools=_tool_versions(fmt))
        sidecar_path(built).write_text(card.to_json(), encoding="utf-8")
        os.replace(built, path)
        os.replace(sidecar_path(built), sidecar_path(path))
    return ExportResult(path, sidecar_path(path), card)


def _build(fmt: str, backbone: nn.Module, path: Path, pixels: np.ndarray | None,
           float_ends: bool) -> Quantization | None:
    """Write the model file; returns how it was quantized (None for fp32)."""
    if fmt == "onnx":
        export_onnx(backbone, path)
        return None
    if fmt == "tflite":
        _export_tflite_fp32(backbone, path)
        return None
    if fmt == "onnx-int8":
        return _export_onnx_int8(backbone, path, pixels, float_ends)
    return _export_tflite_int8(backbone, path, pixels)


def load_source(model) -> Source:
    """A checkpoint path (hash of the file), a backbone module (hash of its tensors as safetensors), or
    PRETRAINED ("faceapi"): the pretrained face-api descriptor as a faceapi-resnet backbone, model version 0."""
    if isinstance(model, str) and model == PRETRAINED:
        source = load_source(build_backbone("faceapi-resnet"))
        return Source(source.backbone, source.sha256, None, {"model_version": 0})
    if isinstance(model, nn.Module):
        digest = hashlib.sha256(safetensors_bytes(shared_tensors(model))).hexdigest()
        backbone = copy.deepcopy(model).eval()
        if getattr(backbone, "trunk_runtime", None) is not None:
            backbone.trunk_runtime = None  # export the float graph: the format says how it is quantized
        return Source(backbone, digest, None, {})
    backbone, meta = load_checkpoint(model)
    return Source(backbone, sha256_file(model), str(model), meta)


def _model_version(given: int | None, meta: dict) -> int:
    version = given if given is not None else meta.get("model_version")
    if version is None:
        raise ValueError("no model version: pass model_version (the checkpoint's meta has none)")
    if not isinstance(version, int) or version < 0:
        raise ValueError(f"model_version must be a non-negative integer, got {version!r}")
    return version


def _embedding_size(backbone: nn.Module) -> int:
    with torch.inference_mode():
        return int(backbone(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).shape[1])


def calibration_faces(calibration) -> Faces | None:
    """None, an array of uint8 faces, or a folder: images directly in it (unlabelled), else a labelled dataset."""
    if calibration is None:
        return None
    if isinstance(calibration, np.ndarray):
        return Faces(check_faces(calibration, IMAGE_SIZE), None, "array")
    folder = Path(calibration)
    if not folder.is_dir():
        raise ValueError(f"calibration folder {folder} is not a directory")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if files:
        images = np.stack([to_rgb(letterbox(read_image(f), IMAGE_SIZE)) for f in files])
        return Faces(images, None, str(folder))
    dataset = load_dataset(folder)
    return Faces(dataset.images, dataset.labels, str(folder))



def _spread(faces: Faces, limit: int) -> Faces:
    if len(faces.images) <= limit:
        return faces
    keep = np.unique(np.linspace(0, len(faces.images) - 1, limit).round().astype(np.int64))
    labels = None if faces.labels is None else faces.labels[keep]
    return Faces(faces.images[keep], labels, faces.origin)


def _synthetic_faces() -> Faces:
    images = np.random.default_rng(0).integers(0, 256, (SYNTHETIC_CHECK_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3))
    return Faces(images.astype(np.uint8), None, "synthetic noise")


def agreement_check(backbone: nn.Module, path: Path, spec: InputSpec, faces: Faces) -> AgreementCheck:
    reference = embed_images(backbone, faces.images)
    exported = embed_batches(open_runtime(path), spec, faces.images)
    cosine = np.sum(reference * exported, axis=1)
    return AgreementCheck(data=faces.origin, images=len(faces.images), mean_cosine=float(cosine.mean()),
                          min_cosine=float(cosine.min()), torch_accuracy=_accuracy(reference, faces.labels),
                          export_accuracy=_accuracy(exported, faces.labels))


def _accuracy(embeddings: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None or len(np.unique(labels)) < 2 or np.bincount(labels).max() < 2:
        return None  # verification needs genuine and impostor pairs
    return verification_report(embeddings, labels).accuracy


def _tool_versions(fmt: str) -> dict:
    return {name: metadata.version(name) for name in TOOLS[fmt.split("-")[0]]}


# --- ONNX ---

def export_onnx(backbone: nn.Module, path: Path, input_shape: tuple[int, ...] = (3, IMAGE_SIZE, IMAGE_SIZE),
                input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME) -> None:
    """One-file ONNX with a dynamic batch; input_shape excludes the batch dimension."""
    import onnx

    # Every export warns that torchvision's ops are not registered; the face models use none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # A batch of 2 in the example: torch.export specialises a batch of 1 into a constant.
    example = torch.zeros(2, *input_shape)
    # (catch_warnings is process-wide state too: inside the lock)
    with _ONNX_EXPORT, warnings.catch_warnings():  # torch.export's deprecation notice (LeafSpec), not ours to act on
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        torch.onnx.export(backbone, (example,), str(path), dynamo=True, external_data=False,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    # When the forward pins the batch size, the exporter falls back to a fixed batch without failing.
    batch = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        raise ValueError(f"{type(backbone).__name__} exported with a fixed batch of {batch.dim_value}: its forward "
                         "specialises the batch size, so it cannot be exported with a dynamic one")


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over prepared input, 16 images per batch."""

    def __init__(self, inputs: np.ndarray, input_name: str) -> None:
        self._batches = iter([{input_name: inputs[i:i + 16]} for i in range(0, len(inputs), 16)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def _float_nodes(path: Path, float_ends: bool) -> list[str]:
    """ONNX nodes left unquantized.

    - the first convolution: int8 kernels are slow on its 3 input channels (one thread: 168 us int8 against
      82 us float, the whole model ~10 % faster with it float), and its weights are 7 KB;
    - the embedding's BatchNorm: per-channel quantization does not fit its rank-1 weights, and it is tiny;
    - with float_ends, the last convolution (the embedding projection) too.
    """
    import onnx

    nodes = onnx.load(str(path)).graph.node
    convs = [node.name for node in nodes if node.op_type == "Conv"]
    norms = [node.name for node in nodes if node.op_type == "BatchNormalization"]
    return [convs[0], *norms] + ([convs[-1]] if float_ends else [])


def prepare_for_quantization(fp32: Path, prepared: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Symbolic shape inference cannot follow the Expand in F.normalize; ONNX's own inference suffices.
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)


def quantize_onnx_static(prepared: Path, out: Path, inputs: np.ndarray, input_name: str = INPUT_NAME,
                         float_layers: list[str] | None = None) -> None:
    """Static PTQ: QDQ, int8 per-channel weights, uint8 activations (the fast pairing on x86), MinMax ranges."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(prepared), str(out), _CalibrationReader(inputs, input_name), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=float_layers or [])


def _export_onnx_int8(backbone, path, pixels, float_ends) -> Quantization:
    fp32, prepared = path.with_name("fp32.onnx"), path.with_name("prepared.onnx")
    export_onnx(backbone, fp32)
    prepare_for_quantization(fp32, prepared)
    float_layers = _float_nodes(prepared, float_ends)
    quantize_onnx_static(prepared, path, pixels, float_layers=float_layers)
    return Quantization(scheme="static PTQ, QDQ (onnxruntime)", weights="int8 per-channel symmetric",
                        activations="uint8 per-tensor asymmetric", calibration="MinMax",
                        calibration_images=len(pixels), float_layers=float_layers)


class Int8Trunk:
    """A frozen trunk's layers as an int8 ONNX Runtime session (static PTQ as onnx-int8), chips -> features.

    Devices fine-tune only the tail, so the trunk runs once per local image (features are cached): running it
    int8 is what makes the fine-tuned model quantized on the device, and the tail then learns on exactly the
    features the deployed int8 model computes.
    """

    def __init__(self, layers: nn.Module, calibration_chips: np.ndarray, threads: int = 1) -> None:
        from .exported import OnnxModel

        with tempfile.TemporaryDirectory(prefix="int8-trunk-") as scratch:
            fp32, prepared, int8 = (Path(scratch) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
            export_onnx(layers, fp32, calibration_chips.shape[1:], input_name="chip", output_name="features")
            prepare_for_quantization(fp32, prepared)
            quantize_onnx_static(prepared, int8, calibration_chips, input_name="chip")
            self._model = OnnxModel(int8, threads)  # the session holds the model: the file may go

    def __call__(self, chips: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._model(np.ascontiguousarray(chips.numpy(), dtype=np.float32)))

    def __deepcopy__(self, memo) -> Int8Trunk:
        return self  # an inference session never changes, and cannot be copied


def quantize_trunk(backbone: nn.Module, calibration_images: np.ndarray, threads: int = 1,
                   limit: int = 128) -> None:
    """Run backbone's frozen trunk in int8 from now on, calibrated on (at most `limit` of) these uint8 faces."""
    if not hasattr(backbone, "trunk_layers"):
        raise ValueError(f"{type(backbone).__name__} has no separable frozen trunk to quantize")
    faces = _spread(Faces(check_faces(calibration_images, IMAGE_SIZE), None, "device images"), limit)
    with torch.no_grad():
        chips = backbone.trunk.chip(to_model_input(faces.images)).numpy()
    backbone.trunk_runtime = Int8Trunk(backbone.trunk_layers().eval(), chips, threads)


# --- TFLite ---

def _litert_torch():
    try:
        import litert_torch
    except ImportError as exc:
        raise ImportError("TFLite export needs litert-torch: pip install 'facefed-edge[tflite-convert]'") from exc
    return litert_torch


def _channel_last(backbone: nn.Module):
    litert_torch = _litert_torch()
    # NHWC in: TFLite's own layout, so the converted graph starts without a transpose.
    return litert_torch.to_channel_last_io(backbone, args=[0]).eval(), (torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, 3),)


def _export_tflite_fp32(backbone, path) -> None:
    model, sample = _channel_last(backbone)
    _litert_torch().convert(model, sample).export(str(path))


def _export_tflite_int8(backbone, path, pixels) -> Quantization:
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model, sample = _channel_last(backbone)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model, sample).module(), quantizer)
    with torch.no_grad():
        for i in range(len(pixels)):  # the exported graph has the converter's fixed batch of 1
            prepared(torch.from_numpy(pixels[i:i + 1]))
    # litert-torch then warns the graph is "in training mode": exported graphs keep training=True, but this
    # one was traced from the eval-mode model, so BatchNorm already uses its running statistics.
    quantized = convert_pt2e(prepared, fold_quantize=False)
    converted = _litert_torch().convert(quantized, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    converted.export(str(path))
    return Quantization(scheme="static PTQ, PT2E (litert-torch)", weights="int8 per-channel symmetric",
                        activations="int8 per-tensor asymmetric", calibration="histogram",
                        calibration_images=len(pixels))
