"""Face embedding backends for a device: one interface, three runtimes (torch, ONNX Runtime, TFLite).

A device profile names the backend and the thread count; load_embedder picks the implementation from the
model file's suffix: .safetensors (a FaceFed checkpoint, torch), .onnx (onnxruntime), .tflite
(ai_edge_litert, else tflite_runtime). Exported files are read with their JSON sidecar
(model_zoo.exported), which gives the input convention.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from model_zoo.exported import InputSpec, OnnxModel, TfliteModel, embed_batches, read_card

SUFFIX_BACKENDS = {".safetensors": "torch", ".onnx": "onnx", ".tflite": "tflite"}


class Embedder(ABC):
    """uint8 RGB faces [N, H, W, 3] -> float32 [N, D] embeddings, L2-normalised when compared by cosine (score:
    model_zoo.backbones.model_score), raw descriptors when compared by l2."""

    backend: str
    score: str = "cosine"
    input: InputSpec
    embedding_size: int
    batch_size: int = 32

    def embed(self, images) -> np.ndarray:
        return embed_batches(self._forward, self.input, images, self.batch_size, normalize=self.score == "cosine")

    @abstractmethod
    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        """Prepared float32 input (self.input's layout and normalisation) -> raw embeddings."""


class TorchEmbedder(Embedder):
    backend = "torch"

    def __init__(self, backbone, threads: int = 1, score: str = "cosine") -> None:
        """score "l2": the backbone's forward gives raw descriptors (model_zoo.backbones.RawDescriptor)."""
        self.backbone = backbone.eval()
        self.threads = threads
        self.score = score
        self.input = InputSpec()  # the backbone's own convention: NCHW, (x - 127.5) / 128
        probe = np.zeros((1, 3, self.input.size, self.input.size), np.float32)
        self.embedding_size = int(self._forward(probe).shape[1])

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with _torch_threads(self.threads), torch.inference_mode():
            return self.backbone(torch.from_numpy(pixels)).numpy()


@contextmanager
def _torch_threads(threads: int):
    """torch's thread count is process-wide: set it for the call only."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _ExportedEmbedder(Embedder):
    """An exported file run by `runtime`, described by its sidecar."""

    runtime: type

    def __init__(self, path, threads: int = 1) -> None:
        self.card = read_card(path)
        self.input = self.card.input
        self.embedding_size = self.card.embedding_size
        self._model = self.runtime(path, threads)

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        return self._model(pixels)


class OnnxEmbedder(_ExportedEmbedder):
    backend = "onnx"
    runtime = OnnxModel


class TfliteEmbedder(_ExportedEmbedder):
    backend = "tflite"
    runtime = TfliteModel


def load_embedder(path_or_checkpoint, backend: str | None = None, threads: int = 1) -> Embedder:
    """The embedder for a checkpoint (.safetensors) or an exported .onnx / .tflite file.

    backend, when given (e.g. from the device profile), must agree with the file's suffix.
    """
    path = Path(path_or_checkpoint)
    implied = SUFFIX_BACKENDS.get(path.suffix)
    if implied is None:
        raise ValueError(f"{path}: expected a {', '.join(SUFFIX_BACKENDS)} file")
    if backend is not None and backend != implied:
        raise ValueError(f"backend {backend!r} cannot run {path.name}; a {path.suffix} file needs {implied!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if implied == "torch":
        from model_zoo.checkpoint import load_checkpoint

        return TorchEmbedder(load_checkpoint(path)[0], threads)
    return {"onnx": OnnxEmbedder, "tflite": TfliteEmbedder}[implied](path, threads)
