"""face-api's pretrained ResNet descriptor as a federated backbone: a frozen trunk and a trainable tail.

Input and output follow MobileFaceNet's contract, so the federation, evaluation and datasets need no
special case: [N, 3, 112, 112] ArcFace-aligned crops scaled as (x - 127.5) / 128 in, L2-normalised
[N, 128] embeddings out. Inside, one fixed similarity (align.arcface_to_dlib_transform, the geometry of
pipeline.FacePipeline.embed_aligned_crops) re-frames the crop into the 150x150 dlib chip the net was
trained on, with border replication outside the crop, then face-api's normalisation applies.

`trainable` says how many of the net's trailing stages are fine-tuned, always with the final projection:
- "projection": the 256 -> 128 linear map only
- "last":  conv256_down_out (dlib's last level) + projection
- "last2": the conv256 stage too
- "all":   everything (the trunk is then only the fixed re-framing)
The rest is the `trunk`: pretrained weights read from `weights_dir` on each machine, frozen
(requires_grad False) and always in eval mode. Only `tail` tensors are trained, shared and checkpointed.

`shared` says which of the tail's tensors travel (the federated payload, and what a checkpoint holds):
- "tail": all of them;
- "scale_shift": camera adaptation (model_zoo.camera_adapt): only the per-channel scales and shifts (dlib's
  affine layers) outside the `personal` part, a device's own ("last": conv256_down_out and the projection;
  "projection": the projection alone; "none"). Every other tensor comes from the pretrained weights on each
  machine, like the trunk, or from the device's own personal part, which never leaves it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import align
from ..faceapi.loader import ENV_VAR, RECOGNITION_MANIFEST, default_models_dir
from ..faceapi.recognition import MEAN_RGB, ConvScale, FaceRecognitionNet
from ..faceapi.tfjs_ops import normalize
from ..faceapi.tfjs_weights import read_tfjs_weights

EMBEDDING_SIZE = 128

# The net's residual blocks grouped into dlib's levels, input to output; "stem" is conv32_down + max pool.
STAGES: tuple[tuple[str, ...], ...] = (
    ("stem", "conv32_1", "conv32_2", "conv32_3"),
    ("conv64_down", "conv64_1", "conv64_2", "conv64_3"),
    ("conv128_down", "conv128_1", "conv128_2"),
    ("conv256_down", "conv256_1", "conv256_2"),
    ("conv256_down_out",),
)
TRAINABLE_STAGES = {"projection": 0, "last": 1, "last2": 2, "all": len(STAGES)}  # trailing stages trained too
SHARED_PARTS = ("tail", "scale_shift")
# A device's personal part under camera adaptation: the tail tensors it keeps (by name prefix).
PERSONAL_PARTS = {"last": ("tail.conv256_down_out.", "tail.projection."), "projection": ("tail.projection.",),
                  "none": ()}
_SCALE_SHIFT = ("scale_weight", "scale_bias")


def load_pretrained_net(weights_dir: str | Path | None = None) -> FaceRecognitionNet:
    """The ported descriptor net from weights_dir (None: face-api loader default, $FACEFED_FACEAPI_DIR)."""
    root = Path(weights_dir) if weights_dir is not None else default_models_dir()
    manifest = root / RECOGNITION_MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"face-api recognition weights not found: {manifest}. Set {ENV_VAR} or weights_dir "
                                "to the folder holding the @vladmandic/face-api model files.")
    return FaceRecognitionNet.from_tfjs(read_tfjs_weights(manifest))


def chip_sampling_grid(crop_size: int = align.ARCFACE_SIZE, chip_size: int = align.DLIB_CHIP_SIZE) -> torch.Tensor:
    """[1, chip, chip, 2] grid_sample grid (align_corners=True) that warps an ArcFace crop into the dlib chip."""
    crop_to_chip = np.vstack([align.arcface_to_dlib_transform(crop_size, chip_size), [0.0, 0.0, 1.0]])

    def to_normalized(size: int) -> np.ndarray:
        # align_corners=True: pixel centre 0 -> -1 and size - 1 -> +1, the pixel-index convention of align.
        return np.array([[2.0 / (size - 1), 0.0, -1.0], [0.0, 2.0 / (size - 1), -1.0], [0.0, 0.0, 1.0]])

    theta = to_normalized(crop_size) @ np.linalg.inv(crop_to_chip) @ np.linalg.inv(to_normalized(chip_size))
    theta = torch.tensor(theta[:2], dtype=torch.float32)[None]
    return F.affine_grid(theta, [1, 3, chip_size, chip_size], align_corners=True)


class ChipInput(nn.Module):
    """MobileFaceNet-scaled ArcFace crops -> face-api-normalised dlib chips (bilinear, edge replication)."""

    def __init__(self, crop_size: int = align.ARCFACE_SIZE) -> None:
        super().__init__()
        self.crop_size = crop_size
        self.register_buffer("grid", chip_sampling_grid(crop_size), persistent=False)  # fixed: never shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (3, self.crop_size, self.crop_size):
            raise ValueError(f"expected [N, 3, {self.crop_size}, {self.crop_size}] crops, got {tuple(x.shape)}")
        pixels = x * 128.0 + 127.5  # undo data.normalize_pixels
        chips = F.grid_sample(pixels, self.grid.expand(x.shape[0], -1, -1, -1), mode="bilinear",
                              padding_mode="border", align_corners=True)
        return normalize(chips, MEAN_RGB)


class Stem(nn.Module):
    def __init__(self, conv: ConvScale) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv(x)), 3, 2)


class Projection(nn.Module):
    """Global average pool -> the 256 -> 128 linear map -> L2 normalisation."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """face-api's own unnormalised 128-d descriptor (compared by raw L2)."""
        return self.fc(x.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.descriptor(x), dim=1)


class FaceApiResNet(nn.Module):
    arch = "faceapi-resnet"

    def __init__(self, trainable: str = "last", weights_dir: str | None = None, shared: str = "tail",
                 personal: str = "none") -> None:
        super().__init__()
        if trainable not in TRAINABLE_STAGES:
            raise ValueError(f"trainable must be one of {sorted(TRAINABLE_STAGES)}, got {trainable!r}")
        if shared not in SHARED_PARTS:
            raise ValueError(f"shared must be one of {', '.join(SHARED_PARTS)}, got {shared!r}")
        if personal not in PERSONAL_PARTS:
            raise ValueError(f"personal must be one of {', '.join(PERSONAL_PARTS)}, got {personal!r}")
        if personal != "none" and shared == "tail":
            raise ValueError("a personal part needs shared: scale_shift (with shared: tail every tensor travels)")
        # Recorded in checkpoints: keep weights_dir None unless every machine has that path. shared and personal
        # only where set, so that specs and checkpoints written before they existed stay as they were.
        self.arch_kwargs = {"trainable": trainable, "weights_dir": None if weights_dir is None else str(weights_dir),
                            **({"shared": shared, "personal": personal} if shared != "tail" else {})}
        self.shared, self.personal = shared, personal
        net = load_pretrained_net(weights_dir)
        blocks: dict[str, nn.Module] = {"stem": Stem(net.stem), **net.layers}
        split = len(STAGES) - TRAINABLE_STAGES[trainable]
        frozen = [name for stage in STAGES[:split] for name in stage]
        trained = [name for stage in STAGES[split:] for name in stage]
        self.trunk = nn.Sequential(OrderedDict([("chip", ChipInput()), *((n, blocks[n]) for n in frozen)]))
        self.tail = nn.Sequential(OrderedDict([*((n, blocks[n]) for n in trained),
                                               ("projection", Projection(net.fc))]))
        self.trunk.requires_grad_(False)
        # Set by model_zoo.export.quantize_trunk: the trunk's layers as an int8 runtime, [N,3,150,150] chips ->
        # features. Machine-local, like the trunk's weights: never shared or checkpointed.
        self.trunk_runtime: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.eval()

    def parts(self, personal: str | None = None) -> tuple[list[str], list[str]]:
        """(shared scale/shift, personal) parameter names of camera adaptation: disjoint; the personal part takes
        its stage's scale/shift too. Only the tail trains: a frozen trunk (an int8 one) has nothing to share."""
        prefixes = PERSONAL_PARTS[self.personal if personal is None else personal]
        names = [n for n, _ in self.tail.named_parameters(prefix="tail")]
        personal_names = [n for n in names if n.startswith(prefixes)] if prefixes else []
        return [n for n in names if n.endswith(_SCALE_SHIFT) and n not in personal_names], personal_names

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The tensors that travel and are checkpointed (`shared`); the trunk comes from each machine's weights."""
        state = self.tail.state_dict(prefix="tail.")
        if self.shared == "scale_shift":
            names = set(self.parts()[0])
            state = {n: t for n, t in state.items() if n in names}
        return state

    def train(self, mode: bool = True) -> FaceApiResNet:
        super().train(mode)
        self.trunk.eval()  # frozen means frozen: nothing in the trunk may change with the mode
        return self

    def trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.trunk_runtime is None:
            return self.trunk(x)
        return self.trunk_runtime(self.trunk.chip(x))

    def trunk_layers(self) -> nn.Sequential:
        """The trunk after the fixed re-framing: the frozen pretrained layers, chips in, features out."""
        return nn.Sequential(OrderedDict(list(self.trunk.named_children())[1:]))

    def forward_tail(self, features: torch.Tensor) -> torch.Tensor:
        return self.tail(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tail(self.trunk_features(x))

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """face-api's own unnormalised 128-d descriptor: forward without the final L2 normalisation."""
        *blocks, projection = self.tail
        features = self.trunk_features(x)
        for block in blocks:
            features = block(features)
        return projection.descriptor(features)


class RawDescriptor(nn.Module):
    """A FaceApiResNet whose forward is its raw descriptor (for embedders of a model scored by "l2")."""

    def __init__(self, net: FaceApiResNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.descriptor(x)
