"""Model export: file naming, the JSON sidecar, int8 calibration from folders, and refused requests."""
import hashlib
import json
import shutil
import sys

import cv2
import numpy as np
import onnx
import pytest
import torch
from face_models import blob_faces, briefly_trained_backbone
from safetensors.numpy import save as safetensors_bytes

import facefed.cli
from model_zoo.checkpoint import save_checkpoint, shared_tensors
from model_zoo.data import FaceDataset, save_folders
from model_zoo.export import ExportResult, calibration_faces, export_model
from model_zoo.exported import InputSpec, read_card, sidecar_path


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "round-0005.safetensors"
    save_checkpoint(path, briefly_trained_backbone(), {"model_version": 5, "round": 5})
    return path


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """4 identities x 6 blob faces, one folder per identity."""
    root = tmp_path_factory.mktemp("calibration")
    save_folders(FaceDataset(blob_faces(24, seed=1), np.arange(24) % 4, ["ann", "bob", "cid", "dee"]), root)
    return root


@pytest.fixture(scope="module")
def fp32(checkpoint, labelled_folder, tmp_path_factory):
    """The fp32 ONNX export, made by `facefed export`."""
    out = tmp_path_factory.mktemp("fp32")
    assert facefed.cli.main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(out),
                             "--calibration", str(labelled_folder)]) == 0
    path = out / "facefed-v5-onnx.onnx"
    return ExportResult(path, sidecar_path(path), read_card(path))


@pytest.fixture(scope="module")
def int8(checkpoint, labelled_folder, tmp_path_factory):
    return export_model(checkpoint, "onnx-int8", tmp_path_factory.mktemp("int8"), labelled_folder)


def test_fp32_export_is_named_by_version_and_described_by_its_sidecar(checkpoint, labelled_folder, fp32):
    assert sorted(p.name for p in fp32.model_path.parent.iterdir()) == ["facefed-v5-onnx.json",
                                                                         "facefed-v5-onnx.onnx"]
    card = fp32.card
    raw = json.loads(fp32.sidecar_path.read_text())
    assert raw["input"] == {"size": 112, "layout": "NCHW", "mean": 127.5, "std": 128.0, "color": "RGB"}
    assert (card.export_format, card.model_file, card.model_version) == ("onnx", "facefed-v5-onnx.onnx", 5)
    assert card.arch == "mobilefacenet" and card.arch_kwargs == {"embedding_size": 128, "act": "relu"}
    assert card.embedding_size == 128 and card.quantization is None
    assert card.source_sha256 == _sha256(checkpoint) and card.source_path == str(checkpoint)
    assert card.file_sha256 == _sha256(fp32.model_path) and card.file_bytes == fp32.model_path.stat().st_size
    assert {"torch", "onnx", "onnxruntime"} <= set(card.tools)
    check = card.check
    assert check.data == str(labelled_folder) and check.images == 24 and check.mean_cosine >= 0.9999
    assert check.export_accuracy == pytest.approx(check.torch_accuracy, abs=0.01)
    graph = onnx.load(str(fp32.model_path)).graph
    assert [i.name for i in graph.input] == ["pixels"] and [o.name for o in graph.output] == ["embedding"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_int8_export_quantizes_weights_and_reports_calibration_accuracy(fp32, int8):
    card = int8.card
    assert int8.model_path.name == "facefed-v5-onnx-int8.onnx"
    q = card.quantization
    assert q.weights == "int8 per-channel symmetric" and q.activations == "uint8 per-tensor asymmetric"
    assert q.calibration_images == 24
    model = onnx.load(str(int8.model_path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    batchnorms = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert _float_convs(model) == q.float_layers[:1] and q.float_layers[1:] == batchnorms
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == 49  # every convolution but the first
    assert card.file_bytes * 2.5 < fp32.card.file_bytes
    check = card.check
    assert check.images == 24 and check.mean_cosine >= 0.99 and check.min_cosine > 0.95
    assert check.torch_accuracy is not None and abs(check.export_accuracy - check.torch_accuracy) <= 0.05


def _float_convs(model) -> list[str]:
    """Convolutions whose weight is read straight from a float tensor (not through DequantizeLinear)."""
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in floats]


def test_float_ends_keep_the_last_convolution_in_float_too(checkpoint, labelled_folder, int8, tmp_path):
    result = export_model(checkpoint, "onnx-int8", tmp_path, labelled_folder, float_ends=True)
    model = onnx.load(str(result.model_path))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert _float_convs(model) == [convs[0], convs[-1]]
    layers = result.card.quantization.float_layers
    assert layers[0] == convs[0] and layers[-1] == convs[-1] and len(layers) == 3
    assert result.card.file_bytes > int8.card.file_bytes


def test_module_export_needs_a_version_and_hashes_its_tensors(tmp_path):
    backbone = briefly_trained_backbone()
    with pytest.raises(ValueError, match="model_version"):
        export_model(backbone, "onnx", tmp_path)
    result = export_model(backbone, "onnx", tmp_path, model_version=12)
    assert result.model_path.name == "facefed-v12-onnx.onnx" and result.card.source_path is None
    assert result.card.source_sha256 == hashlib.sha256(safetensors_bytes(shared_tensors(backbone))).hexdigest()
    # Without calibration images the check runs on seeded noise, without accuracy.
    check = result.card.check
    assert check.data == "synthetic noise" and check.images == 16
    assert check.mean_cosine >= 0.9999 and check.torch_accuracy is None


def test_export_refuses_bad_requests(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(checkpoint, "coreml", tmp_path)
    with pytest.raises(ValueError, match="needs calibration images"):
        export_model(checkpoint, "onnx-int8", tmp_path)
    with pytest.raises(ValueError, match="onnx-int8 only"):
        export_model(checkpoint, "tflite-int8", tmp_path, blob_faces(4, seed=0), float_ends=True)
    with pytest.raises(ValueError, match="non-negative"):
        export_model(checkpoint, "onnx", tmp_path, model_version=-1)
    with pytest.raises(ValueError, match="uint8 RGB faces"):
        export_model(checkpoint, "onnx-int8", tmp_path, blob_faces(4, seed=0)[:, :64])
    assert not any(tmp_path.iterdir())


class BatchPinned(torch.nn.Module):
    """Branches on the batch size, so torch.export can only trace it for the example's batch of 2."""

    def forward(self, x):
        return x.flatten(1)[:, :128] * (2.0 if x.shape[0] == 2 else 1.0)


def test_export_refuses_a_model_that_pins_its_batch_size(tmp_path):
    with pytest.raises(ValueError, match="fixed batch of 2"):
        export_model(BatchPinned(), "onnx", tmp_path, model_version=1)
    assert not any(tmp_path.iterdir())  # nothing half-built left behind


def test_tflite_export_without_the_converter_says_what_to_install(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # None: the import fails
    with pytest.raises(ImportError, match=r"facefed-edge\[tflite-convert\]"):
        export_model(checkpoint, "tflite", tmp_path)


def test_calibration_folder_of_loose_images_is_unlabelled(tmp_path):
    faces = blob_faces(3, seed=5)
    for i, face in enumerate(faces):
        cv2.imwrite(str(tmp_path / f"{i}.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    loaded = calibration_faces(tmp_path)
    assert loaded.labels is None and loaded.origin == str(tmp_path)
    np.testing.assert_array_equal(loaded.images, faces)


def test_sidecar_guards_the_model_file(fp32, tmp_path):
    model = shutil.copy(fp32.model_path, tmp_path)
    with pytest.raises(FileNotFoundError, match="no sidecar"):
        read_card(model)
    sidecar = shutil.copy(fp32.sidecar_path, tmp_path)
    with open(model, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="does not match"):
        read_card(model)
    raw = json.loads(open(sidecar).read())
    raw["format"] = "something-else"
    open(sidecar, "w").write(json.dumps(raw))
    with pytest.raises(ValueError, match="not a facefed-export sidecar"):
        read_card(model)


def test_cli_evaluates_exports_like_checkpoints_and_reports_export_errors(checkpoint, labelled_folder, fp32,
                                                                         tmp_path, capsys):
    reports = {}
    for model in (checkpoint, fp32.model_path):
        assert facefed.cli.main(["evaluate", "--model", str(model), "--data", str(labelled_folder)]) == 0
        reports[model.suffix] = json.loads(capsys.readouterr().out)
    assert reports[".onnx"]["images"] == 24
    assert reports[".onnx"]["accuracy"] == pytest.approx(reports[".safetensors"]["accuracy"], abs=0.01)
    assert facefed.cli.main(["export", "--model", str(checkpoint), "--format", "onnx-int8", "--out",
                             str(tmp_path), "--calibration", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_input_spec_rejects_unknown_layouts():
    with pytest.raises(ValueError, match="layout"):
        InputSpec(layout="CHWN")
