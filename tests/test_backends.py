"""Embedding backends: torch, ONNX Runtime and TFLite run the same model and agree within the issue's tolerances.

TFLite cases need the optional converter (pip install 'facefed-edge[tflite-convert]') and skip without it.
"""
import importlib.util
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from face_models import blob_faces, briefly_trained_backbone

from edge_agent.backends import OnnxEmbedder, TfliteEmbedder, TorchEmbedder, load_embedder
from model_zoo.checkpoint import save_checkpoint
from model_zoo.data import to_model_input
from model_zoo.export import export_model
from model_zoo.exported import InputSpec, quantize_input, tflite_interpreter_class

HAS_CONVERTER = importlib.util.find_spec("litert_torch") is not None
needs_converter = pytest.mark.skipif(not HAS_CONVERTER, reason="litert-torch not installed (tflite-convert extra)")
# Mean cosine against torch that each format must reach (the 'done' bar).
MIN_MEAN_COSINE = {"onnx": 0.9999, "onnx-int8": 0.99, "tflite": 0.9999, "tflite-int8": 0.99}
FORMATS = ["onnx", "onnx-int8", pytest.param("tflite", marks=needs_converter),
           pytest.param("tflite-int8", marks=needs_converter)]
PROBE = blob_faces(12, seed=2)  # seen by neither training nor calibration


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """One checkpoint and its exports, by format ('torch' is the checkpoint)."""
    out = tmp_path_factory.mktemp("models")
    checkpoint = out / "global.safetensors"
    save_checkpoint(checkpoint, briefly_trained_backbone(), {"model_version": 5})
    formats = [f for f in MIN_MEAN_COSINE if HAS_CONVERTER or not f.startswith("tflite")]
    calibration = blob_faces(32, seed=1)
    return {"torch": checkpoint, **{f: export_model(checkpoint, f, out, calibration).model_path for f in formats}}


@pytest.fixture(scope="module")
def reference(models) -> np.ndarray:
    return load_embedder(models["torch"]).embed(PROBE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_backend_agrees_with_torch(models, reference, fmt):
    embedder = load_embedder(models[fmt], threads=2)
    assert isinstance(embedder, OnnxEmbedder if fmt.startswith("onnx") else TfliteEmbedder)
    assert embedder.input.layout == ("NCHW" if fmt.startswith("onnx") else "NHWC")  # TFLite takes NHWC
    embeddings = embedder.embed(PROBE)
    assert embeddings.shape == (len(PROBE), 128) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(embeddings * reference, axis=1)
    assert cosine.mean() >= MIN_MEAN_COSINE[fmt]
    if fmt.endswith("-int8"):
        assert cosine.min() < 0.99999  # really quantized, not a float copy
    else:
        np.testing.assert_allclose(embeddings, reference, atol=1e-4)
    # Batch size must not change a face's embedding (TFLite runs one face per invoke, ONNX whole batches).
    np.testing.assert_allclose(embedder.embed(PROBE[3:5]), embeddings[3:5], atol=1e-5)


def test_torch_embedder_matches_embed_images_and_restores_threads(models):
    threads = torch.get_num_threads()
    embedder = load_embedder(models["torch"], backend="torch", threads=1)
    assert isinstance(embedder, TorchEmbedder) and embedder.embedding_size == 128
    embeddings = embedder.embed(PROBE)
    assert torch.get_num_threads() == threads
    backbone = briefly_trained_backbone()
    with torch.inference_mode():
        expected = backbone(to_model_input(PROBE)).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-6)


def test_input_spec_reproduces_the_training_normalisation():
    faces = blob_faces(3, seed=4)
    expected = to_model_input(faces).numpy()
    np.testing.assert_array_equal(InputSpec().prepare(faces), expected)
    np.testing.assert_array_equal(InputSpec(layout="NHWC").prepare(faces), expected.transpose(0, 2, 3, 1))


def test_load_embedder_checks_suffix_backend_threads_and_images(models):
    with pytest.raises(ValueError, match="needs 'torch'"):
        load_embedder(models["torch"], backend="onnx")
    with pytest.raises(ValueError, match="needs 'onnx'"):
        load_embedder(models["onnx"], backend="tflite")
    with pytest.raises(ValueError, match="expected a"):
        load_embedder(models["torch"].with_suffix(".pt"))
    with pytest.raises(ValueError, match="threads"):
        load_embedder(models["onnx"], threads=0)
    embedder = load_embedder(models["onnx"], backend="onnx")
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed(PROBE.astype(np.float32))
    with pytest.raises(ValueError, match="112,112"):
        embedder.embed(PROBE[:, :100])


def test_tflite_runtime_prefers_ai_edge_litert_then_tflite_runtime(monkeypatch):
    fallback = types.ModuleType("tflite_runtime.interpreter")
    fallback.Interpreter = type("Interpreter", (), {})
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # None: import fails
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fallback)
    assert tflite_interpreter_class() == (fallback.Interpreter, "tflite_runtime.interpreter")
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(ImportError, match=r"facefed-edge\[tflite\]"):
        tflite_interpreter_class()


def test_exported_model_backends_import_without_torch():
    # An inference-only device installs onnxruntime or ai-edge-litert, not torch.
    code = "import sys, edge_agent.backends; print(sorted({'torch', 'cv2'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_int8_input_quantization_rounds_and_saturates():
    detail = {"quantization": (0.5, -3), "dtype": np.int8}
    pixels = np.array([0.0, 0.74, 1.0, -1000.0, 1000.0], dtype=np.float32)
    np.testing.assert_array_equal(quantize_input(pixels, detail), [-3, -2, -1, -128, 127])
    float_detail = {"quantization": (0.0, 0), "dtype": np.float32}
    assert quantize_input(pixels, float_detail) is pixels
