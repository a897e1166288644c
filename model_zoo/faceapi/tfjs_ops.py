"""Ops that reproduce tfjs / face-api behaviour bit-for-bit where PyTorch differs.

face-api preprocesses a tensor input by zero-padding it to a square and, if needed, resizing it with
tfjs `resizeBilinear(alignCorners=false, halfPixelCenters=false)`, i.e. source = dst * in/out,
which is not what `F.interpolate(mode="bilinear")` does (half-pixel centres).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def js_round(value: float) -> int:
    """JavaScript Math.round: halves round up (Python's round() rounds them to even)."""
    return math.floor(value + 0.5)


def pad_to_square(image: np.ndarray, center: bool) -> np.ndarray:
    """face-api padToSquare on an HWC array: zero rows/cols after (and, if centred, before) the image."""
    height, width = image.shape[:2]
    if height == width:
        return image
    diff = abs(height - width)
    after = js_round(diff * (0.5 if center else 1.0))
    before = diff - after if center else 0
    pad = ((before, after), (0, 0)) if height < width else ((0, 0), (before, after))
    return np.pad(image.astype(np.float32), pad + ((0, 0),))


def resize_bilinear_tfjs(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """tfjs-backend-cpu resizeBilinear (alignCorners=false, halfPixelCenters=false) on HWC."""

    def source_index(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (in_size / out_size) * np.arange(out_size, dtype=np.float64)
        lo = np.maximum(0.0, np.floor(src))
        hi = np.minimum(in_size - 1, np.ceil(src)).astype(np.int64)
        return lo.astype(np.int64), hi, src - lo

    top_i, bot_i, row_frac = source_index(image.shape[0], out_h)
    left_i, right_i, col_frac = source_index(image.shape[1], out_w)
    # Float64 with tfjs's exact operation order (JS numbers), rounded to float32 at the end.
    img = image.astype(np.float64)
    col_frac = col_frac[None, :, None]
    top = img[top_i][:, left_i] + (img[top_i][:, right_i] - img[top_i][:, left_i]) * col_frac
    bottom = img[bot_i][:, left_i] + (img[bot_i][:, right_i] - img[bot_i][:, left_i]) * col_frac
    return (top + (bottom - top) * row_frac[:, None, None]).astype(np.float32)


def to_net_input(image: np.ndarray, input_size: int, center: bool) -> torch.Tensor:
    """uint8 HWC RGB -> float32 [1, 3, S, S] in 0..255, as face-api NetInput.toBatchTensor does it."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HWC RGB image, got shape {image.shape}")
    square = pad_to_square(image, center)
    if square.shape[0] != input_size:
        square = resize_bilinear_tfjs(square, input_size, input_size)
    return torch.from_numpy(np.ascontiguousarray(square, dtype=np.float32)).permute(2, 0, 1)[None]


def normalize(x: torch.Tensor, mean_rgb: tuple[float, float, float]) -> torch.Tensor:
    """face-api normalisation: subtract the per-channel mean (float32), then divide by 255."""
    mean = torch.tensor(mean_rgb, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / 255


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TF 'same' padding; the odd pixel goes after (bottom/right), unlike symmetric torch padding."""
    pads: list[int] = []
    for size in (x.shape[3], x.shape[2]):  # F.pad order: last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def conv_weight(filters: np.ndarray) -> torch.Tensor:
    """TF conv filter [kh, kw, in, out] -> torch [out, in, kh, kw]."""
    return torch.from_numpy(np.ascontiguousarray(filters.transpose(3, 2, 0, 1)))


def depthwise_weight(filters: np.ndarray) -> torch.Tensor:
    """TF depthwise filter [kh, kw, in, mult] -> torch grouped conv weight [in * mult, 1, kh, kw]."""
    kh, kw, cin, mult = filters.shape
    return torch.from_numpy(np.ascontiguousarray(filters.transpose(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw)))
