"""face-api TinyFaceDetector: Tiny-YOLOv2-style face detector with its box decoding and NMS."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tfjs_ops import conv_weight, depthwise_weight, js_round, normalize, pad_same, to_net_input

MEAN_RGB = (117.001, 114.697, 97.404)
IOU_THRESHOLD = 0.4
# Anchor (width, height) in grid cells, one per predicted box per cell.
ANCHORS = ((1.603231, 2.094468), (6.041143, 7.080126), (2.882459, 3.518061),
           (4.266906, 5.178857), (9.041765, 10.66308))
BOX_ENCODING = 5  # x, y, w, h, objectness; a single class, so no class scores
_CHANNELS = (16, 32, 64, 128, 256, 512)
LEAKY_SLOPE = 0.1  # face-api: relu(x - 0.1x) + 0.1x, i.e. leaky relu with slope 0.1


@dataclass(frozen=True)
class FaceDetection:
    score: float
    box: tuple[float, float, float, float]  # x, y, width, height in pixels of the original frame


class SeparableConvLeaky(nn.Module):
    """tinyYolov2 depthwiseSeparableConv: pad 1, 3x3 depthwise, 1x1 pointwise + bias, leaky relu."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.pointwise(self.depthwise(x)), LEAKY_SLOPE)

    def load_tfjs(self, weights: Mapping[str, np.ndarray], prefix: str) -> None:
        with torch.no_grad():
            self.depthwise.weight.copy_(depthwise_weight(weights[f"{prefix}/depthwise_filter"]))
            self.pointwise.weight.copy_(conv_weight(weights[f"{prefix}/pointwise_filter"]))
            self.pointwise.bias.copy_(torch.from_numpy(weights[f"{prefix}/bias"]))


def _max_pool_same(x: torch.Tensor, stride: int) -> torch.Tensor:
    """tf.maxPool 2x2 'same': TF pads only after, and padded cells never win the max."""
    return F.max_pool2d(pad_same(x, 2, stride, value=-math.inf), 2, stride)


class TinyFaceDetector(nn.Module):
    """Input: float [N, 3, S, S] RGB in 0..255, S a multiple of 32. Output: raw grid [N, 25, S/32, S/32]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, _CHANNELS[0], 3)  # 'valid' in face-api: 320 -> 318
        self.convs = nn.ModuleList(SeparableConvLeaky(cin, cout) for cin, cout in zip(_CHANNELS, _CHANNELS[1:]))
        self.head = nn.Conv2d(_CHANNELS[-1], len(ANCHORS) * BOX_ENCODING, 1)

    @classmethod
    def from_tfjs(cls, weights: Mapping[str, np.ndarray]) -> TinyFaceDetector:
        net = cls()
        with torch.no_grad():
            net.conv0.weight.copy_(conv_weight(weights["conv0/filters"]))
            net.conv0.bias.copy_(torch.from_numpy(weights["conv0/bias"]))
            net.head.weight.copy_(conv_weight(weights["conv8/filters"]))
            net.head.bias.copy_(torch.from_numpy(weights["conv8/bias"]))
        for i, conv in enumerate(net.convs, start=1):
            conv.load_tfjs(weights, f"conv{i}")
        return net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.conv0(normalize(x, MEAN_RGB)), LEAKY_SLOPE)
        for conv in self.convs:
            out = conv(_max_pool_same(out, 2))
        return self.head(_max_pool_same(out, 1))  # the last pool keeps the grid size


def preprocess(image: np.ndarray, input_size: int = 320) -> torch.Tensor:
    """uint8 HWC RGB frame -> [1, 3, S, S]: zero-padded bottom/right to a square, tfjs bilinear resize."""
    return to_net_input(image, input_size, center=False)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def decode_boxes(
    grid: torch.Tensor, reshaped_hw: tuple[int, int], score_threshold: float
) -> list[tuple[float, tuple[float, float, float, float]]]:
    """face-api extractBoxes on one [25, G, G] output: (score, relative x, y, w, h) above the threshold.

    Coordinates are relative to the unpadded image: the correction factors undo the square padding.
    """
    height, width = reshaped_hw
    size = max(width, height)
    corr_x, corr_y = size / width, size / height
    num_cells = grid.shape[-1]
    # NCHW -> [row, col, anchor, encoding]; values as float64, as face-api reads them into JS numbers.
    cells = grid.permute(1, 2, 0).reshape(num_cells, num_cells, len(ANCHORS), BOX_ENCODING).double().numpy()
    results = []
    for row in range(num_cells):
        for col in range(num_cells):
            for anchor, (anchor_w, anchor_h) in enumerate(ANCHORS):
                tx, ty, tw, th, tscore = cells[row, col, anchor]
                score = _sigmoid(tscore)
                if score <= score_threshold:
                    continue
                ct_x = (col + _sigmoid(tx)) / num_cells * corr_x
                ct_y = (row + _sigmoid(ty)) / num_cells * corr_y
                box_w = math.exp(tw) * anchor_w / num_cells * corr_x
                box_h = math.exp(th) * anchor_h / num_cells * corr_y
                results.append((score, (ct_x - box_w / 2, ct_y - box_h / 2, box_w, box_h)))
    return results


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    inter_w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def non_max_suppression(boxes: list[tuple[float, float, float, float]], scores: list[float],
                        iou_threshold: float) -> list[int]:
    """face-api's greedy NMS: take the best remaining box, drop those overlapping it by > threshold."""
    remaining = sorted(range(len(scores)), key=lambda i: scores[i])  # stable, ascending like JS sort
    picked: list[int] = []
    while remaining:
        best = remaining.pop()
        picked.append(best)
        remaining = [i for i in remaining if _iou(boxes[best], boxes[i]) <= iou_threshold]
    return picked


@torch.no_grad()
def detect_faces(net: TinyFaceDetector, image: np.ndarray, input_size: int = 320,
                 score_threshold: float = 0.5) -> list[FaceDetection]:
    """face-api tinyFaceDetector.locateFaces(image, {inputSize, scoreThreshold}) on a uint8 HWC RGB frame."""
    height, width = image.shape[:2]
    scale = input_size / max(height, width)
    reshaped_hw = (js_round(height * scale), js_round(width * scale))
    candidates = decode_boxes(net(preprocess(image, input_size))[0], reshaped_hw, score_threshold)
    scores = [score for score, _ in candidates]
    # NMS runs on boxes scaled to the net input size, as face-api does (IoU is scale-invariant anyway).
    keep = non_max_suppression([tuple(v * input_size for v in box) for _, box in candidates], scores,
                               IOU_THRESHOLD)
    return [FaceDetection(scores[i], _to_pixels(candidates[i][1], width, height)) for i in keep]


def _to_pixels(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return (x * width, y * height, w * width, h * height)
