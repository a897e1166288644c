"""MobileFaceNet (Chen et al., 2018, arXiv:1804.07573): a ~1 M parameter face embedder for 112x112 crops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("relu", "prelu")

# (expansion, out_channels, repeats, first_stride): the bottleneck table of the paper. The two stride-2
# 128-channel blocks use expansion 4 as in the paper; every other block uses 2.
BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


def _activation(act: str, channels: int) -> nn.Module:
    return nn.PReLU(channels) if act == "prelu" else nn.ReLU(inplace=True)


class ConvBN(nn.Sequential):
    """Conv -> BN -> optional activation (act=None gives the paper's 'linear' layers)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 act: str | None = None, padding: int | None = None) -> None:
        padding = kernel // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(_activation(act, cout))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise 3x3 -> linear 1x1 project; identity shortcut when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int, act: str) -> None:
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            ConvBN(cin, hidden, 1, act=act),
            ConvBN(hidden, hidden, 3, stride, groups=hidden, act=act),
            ConvBN(hidden, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """[B,3,112,112] input normalised as (x-127.5)/128 -> [B,embedding_size] L2-normalised embeddings."""

    arch = "mobilefacenet"

    def __init__(self, embedding_size: int = 128, act: str = "relu") -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        self.arch_kwargs = {"embedding_size": embedding_size, "act": act}
        layers: list[nn.Module] = [
            ConvBN(3, 64, 3, stride=2, act=act),
            ConvBN(64, 64, 3, groups=64, act=act),
        ]
        cin = 64
        for expansion, cout, repeats, stride in BOTTLENECKS:
            for i in range(repeats):
                layers.append(Bottleneck(cin, cout, stride if i == 0 else 1, expansion, act))
                cin = cout
        layers += [
            ConvBN(cin, 512, 1, act=act),
            ConvBN(512, 512, 7, groups=512, padding=0),  # global depthwise conv: 7x7 -> 1x1, linear
        ]
        self.features = nn.Sequential(*layers)
        self.embedding = nn.Conv2d(512, embedding_size, 1, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embedding(self.features(x)).flatten(1)
        return F.normalize(self.bn(x), dim=1)
