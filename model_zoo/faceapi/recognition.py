"""face-api FaceRecognitionNet: dlib-style ResNet-34 face descriptor (150x150 RGB -> 128-d)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tfjs_ops import conv_weight, normalize, to_net_input

INPUT_SIZE = 150
MEAN_RGB = (122.782, 117.001, 104.298)

# (name, out channels, downsamples?) in network order, after the stem conv32_down + max pool.
_RESIDUAL_LAYERS: tuple[tuple[str, int, bool], ...] = (
    ("conv32_1", 32, False), ("conv32_2", 32, False), ("conv32_3", 32, False),
    ("conv64_down", 64, True), ("conv64_1", 64, False), ("conv64_2", 64, False), ("conv64_3", 64, False),
    ("conv128_down", 128, True), ("conv128_1", 128, False), ("conv128_2", 128, False),
    ("conv256_down", 256, True), ("conv256_1", 256, False), ("conv256_2", 256, False),
    ("conv256_down_out", 256, True),
)


class ConvScale(nn.Module):
    """conv + bias, then dlib's affine 'scale' layer (per-channel weight and bias), no batch norm."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        # Strided convs are 'valid' in face-api, stride-1 ones 'same' (symmetric for odd kernels).
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=0 if stride > 1 else kernel // 2)
        self.scale_weight = nn.Parameter(torch.ones(cout))
        self.scale_bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale_weight.view(1, -1, 1, 1) + self.scale_bias.view(1, -1, 1, 1)

    def load_tfjs(self, weights: Mapping[str, np.ndarray], prefix: str) -> None:
        with torch.no_grad():
            self.conv.weight.copy_(conv_weight(weights[f"{prefix}/conv/filters"]))
            self.conv.bias.copy_(torch.from_numpy(weights[f"{prefix}/conv/bias"]))
            self.scale_weight.copy_(torch.from_numpy(weights[f"{prefix}/scale/weights"]))
            self.scale_bias.copy_(torch.from_numpy(weights[f"{prefix}/scale/biases"]))


class Residual(nn.Module):
    """Two 3x3 ConvScale layers with an identity (or avg-pooled, zero-extended) shortcut."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = ConvScale(cin, cout, 3, 2 if down else 1)
        self.conv2 = ConvScale(cout, cout, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        # 'valid' stride-2 convs on odd sizes come out one smaller than the pooled shortcut:
        # face-api appends a zero row and column to the conv branch.
        out = F.pad(out, (0, shortcut.shape[3] - out.shape[3], 0, shortcut.shape[2] - out.shape[2]))
        if shortcut.shape[1] != out.shape[1]:  # channel doubling: zero channels appended
            shortcut = torch.cat([shortcut, torch.zeros_like(shortcut)], dim=1)
        return F.relu(shortcut + out)

    def load_tfjs(self, weights: Mapping[str, np.ndarray], prefix: str) -> None:
        self.conv1.load_tfjs(weights, f"{prefix}/conv1")
        self.conv2.load_tfjs(weights, f"{prefix}/conv2")


class FaceRecognitionNet(nn.Module):
    """Input: float [N, 3, 150, 150] RGB in 0..255 (see `preprocess`). Output: [N, 128] descriptors."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvScale(3, 32, 7, 2)
        layers: dict[str, nn.Module] = {}
        cin = 32
        for name, cout, down in _RESIDUAL_LAYERS:
            layers[name] = Residual(cin, cout, down)
            cin = cout
        self.layers = nn.ModuleDict(layers)
        self.fc = nn.Linear(256, 128, bias=False)

    @classmethod
    def from_tfjs(cls, weights: Mapping[str, np.ndarray]) -> FaceRecognitionNet:
        net = cls()
        net.stem.load_tfjs(weights, "conv32_down")
        for name, layer in net.layers.items():
            layer.load_tfjs(weights, name)
        with torch.no_grad():
            net.fc.weight.copy_(torch.from_numpy(weights["fc"].T.copy()))
        return net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.stem(normalize(x, MEAN_RGB))), 3, 2)
        for layer in self.layers.values():
            out = layer(out)
        return self.fc(out.mean(dim=(2, 3)))


def preprocess(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB face chip -> [1, 3, 150, 150] net input (centred square pad, tfjs bilinear)."""
    return to_net_input(image, INPUT_SIZE, center=True)


@torch.no_grad()
def compute_descriptor(net: FaceRecognitionNet, image: np.ndarray) -> np.ndarray:
    """face-api computeFaceDescriptor for one uint8 HWC RGB image: float32 [128]."""
    return net(preprocess(image))[0].numpy()
