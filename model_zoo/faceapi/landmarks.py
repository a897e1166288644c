"""face-api FaceLandmark68Net: dense depthwise-separable feature extractor + FC -> 68 (x, y) points."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tfjs_ops import conv_weight, depthwise_weight, normalize, pad_same, to_net_input

INPUT_SIZE = 112
MEAN_RGB = (122.782, 117.001, 104.298)
NUM_POINTS = 68
_BLOCK_CHANNELS = (32, 64, 128, 256)


class SeparableConv(nn.Module):
    """tf.separableConv2d 3x3 (TF 'same' padding) + bias, no activation."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(pad_same(x, 3, self.stride)))

    def load_tfjs(self, weights: Mapping[str, np.ndarray], prefix: str) -> None:
        with torch.no_grad():
            self.depthwise.weight.copy_(depthwise_weight(weights[f"{prefix}/depthwise_filter"]))
            self.pointwise.weight.copy_(conv_weight(weights[f"{prefix}/pointwise_filter"]))
            self.pointwise.bias.copy_(torch.from_numpy(weights[f"{prefix}/bias"]))


class PlainConv(nn.Module):
    """Regular 3x3 conv + bias with TF 'same' padding (first layer of the first dense block)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(cin, cout, 3, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_same(x, 3, self.stride))

    def load_tfjs(self, weights: Mapping[str, np.ndarray], prefix: str) -> None:
        with torch.no_grad():
            self.conv.weight.copy_(conv_weight(weights[f"{prefix}/filters"]))
            self.conv.bias.copy_(torch.from_numpy(weights[f"{prefix}/bias"]))


class DenseBlock4(nn.Module):
    """Four convs, the first strided; each later conv sees relu(sum of all earlier outputs)."""

    def __init__(self, cin: int, cout: int, first: bool) -> None:
        super().__init__()
        conv0 = PlainConv(cin, cout, 2) if first else SeparableConv(cin, cout, 2)
        self.convs = nn.ModuleList([conv0] + [SeparableConv(cout, cout, 1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [F.relu(self.convs[0](x))]
        for conv in self.convs[1:]:
            outs.append(conv(F.relu(_sum_like_faceapi(outs))))  # relu is a no-op on the lone first output
        return F.relu(_sum_like_faceapi(outs))

    def load_tfjs(self, weights: Mapping[str, np.ndarray], prefix: str) -> None:
        for i, conv in enumerate(self.convs):
            conv.load_tfjs(weights, f"{prefix}/conv{i}")


def _sum_like_faceapi(outs: list[torch.Tensor]) -> torch.Tensor:
    """out1 + (out2 + (out3 + ...)): face-api's nesting, kept for float32-identical sums."""
    total = outs[-1]
    for out in reversed(outs[:-1]):
        total = out + total
    return total


class FaceLandmark68Net(nn.Module):
    """Input: float [N, 3, 112, 112] RGB in 0..255. Output: [N, 136] interleaved x, y in 0..1 of the input."""

    def __init__(self) -> None:
        super().__init__()
        cins = (3,) + _BLOCK_CHANNELS[:-1]
        self.blocks = nn.ModuleList(
            DenseBlock4(cin, cout, first=i == 0) for i, (cin, cout) in enumerate(zip(cins, _BLOCK_CHANNELS))
        )
        self.fc = nn.Linear(_BLOCK_CHANNELS[-1], 2 * NUM_POINTS)

    @classmethod
    def from_tfjs(cls, weights: Mapping[str, np.ndarray]) -> FaceLandmark68Net:
        net = cls()
        for i, block in enumerate(net.blocks):
            block.load_tfjs(weights, f"dense{i}")
        with torch.no_grad():
            net.fc.weight.copy_(torch.from_numpy(weights["fc/weights"].T.copy()))
            net.fc.bias.copy_(torch.from_numpy(weights["fc/bias"]))
        return net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = normalize(x, MEAN_RGB)
        for block in self.blocks:
            out = block(out)
        out = F.avg_pool2d(out, 7, 2)  # 7x7 feature map -> 1x1
        return self.fc(out.flatten(1))


def preprocess(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB face crop -> [1, 3, 112, 112] net input (centred square pad, tfjs bilinear)."""
    return to_net_input(image, INPUT_SIZE, center=True)


def to_pixel_coords(output: torch.Tensor, height: int, width: int) -> np.ndarray:
    """face-api postProcess + FaceLandmarks: net output [136] -> [68, 2] pixel coords of the image.

    The net sees the image centre-padded to a square, so the padding is removed before scaling.
    """
    scale = INPUT_SIZE / max(height, width)
    scaled_w, scaled_h = width * scale, height * scale
    pad_x = abs(scaled_w - scaled_h) / 2 if scaled_w < scaled_h else 0.0
    pad_y = abs(scaled_w - scaled_h) / 2 if scaled_h < scaled_w else 0.0
    points = output.reshape(NUM_POINTS, 2)
    # float32 tensor ops as in face-api, then the JS (float64) multiply by the image size.
    pad = torch.tensor([pad_x, pad_y], dtype=torch.float32)
    size = torch.tensor([scaled_w, scaled_h], dtype=torch.float32)
    relative = ((points * INPUT_SIZE - pad) / size).double().numpy()
    return relative * np.array([width, height], dtype=np.float64)


@torch.no_grad()
def detect_landmarks(net: FaceLandmark68Net, image: np.ndarray) -> np.ndarray:
    """face-api detectLandmarks(...).positions for one uint8 HWC RGB image: [68, 2] (x, y) pixels."""
    return to_pixel_coords(net(preprocess(image))[0], image.shape[0], image.shape[1])
