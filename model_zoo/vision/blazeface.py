"""BlazeFace (MediaPipe face detection, short and full range): anchors, box and keypoint decoding, NMS.

Written from the published model description (MediaPipe's face_detection graph configs and model card): the
net sees the frame letterboxed into a square (128 px short range, 192 px full range) as RGB in [-1, 1] and
scores a fixed grid of SSD anchors. Each anchor regresses 16 numbers in input pixels: the box centre offset
and size (x, y, w, h) and six keypoints (subject's right eye, left eye, nose tip, mouth centre, right ear
tragion, left ear tragion), all relative to the anchor centre. Anchors have unit size ("fixed anchor size"),
so decoding is centre + offset / input_size. Overlapping boxes are merged by weighted NMS (score-weighted mean
of each cluster, MediaPipe's choice for faces, steadier from frame to frame than greedy NMS) or plain NMS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from . import Detection, load_model

KEYPOINTS = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear", "left_ear")  # the subject's right/left


@dataclass(frozen=True)
class BlazeFaceSpec:
    file_name: str
    input_size: int
    strides: tuple[int, ...]  # one per SSD layer; layers of equal stride share a grid
    anchors_per_layer: int  # aspect ratio 1 plus, where interpolated, one more anchor per layer
    score_threshold: float


SHORT_RANGE = BlazeFaceSpec("face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2, 0.5)
FULL_RANGE = BlazeFaceSpec("face_detection_full_range.tflite", 192, (4,), 1, 0.6)
MODELS = {"short": SHORT_RANGE, "full": FULL_RANGE}


def anchor_centres(spec: BlazeFaceSpec) -> np.ndarray:
    """[A, 2] anchor centres (x, y) in [0, 1], in the order the net's outputs come: grid by grid (strides merged),
    row by row, then the anchors of one cell."""
    centres = []
    layer = 0
    while layer < len(spec.strides):
        stride = spec.strides[layer]
        same = sum(1 for s in spec.strides[layer:] if s == stride)  # consecutive layers with this stride
        cells = int(np.ceil(spec.input_size / stride))
        ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, same * spec.anchors_per_layer, axis=0))
        layer += same
    return np.concatenate(centres)


def decode(regressors: np.ndarray, logits: np.ndarray, anchors: np.ndarray, input_size: int,
           score_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw outputs [A, 16] and [A] -> (scores [K], boxes [K, 4] as x0, y0, x1, y1, keypoints [K, 6, 2]) in [0, 1]
    input coordinates, for the anchors scoring at least score_threshold. Pure numpy."""
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -100.0, 100.0)))
    keep = scores >= score_threshold
    reg = regressors[keep].astype(np.float64) / input_size
    centre = anchors[keep]
    xy = centre + reg[:, 0:2]
    half = reg[:, 2:4] / 2.0
    boxes = np.concatenate([xy - half, xy + half], axis=1)
    keypoints = centre[:, None, :] + reg[:, 4:16].reshape(-1, 6, 2)
    return scores[keep], boxes, keypoints


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x0, y0, x1, y1 box with each of boxes [N, 4]."""
    inter = (np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
             * np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None))
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


def non_max_suppression(scores: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray, iou_threshold: float = 0.3,
                        weighted: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best box first; the boxes overlapping it by more than iou_threshold form its cluster and are dropped. Weighted:
    the kept box and keypoints are the score-weighted mean of the cluster, with the best score. Pure numpy."""
    order = np.argsort(-scores, kind="stable")
    out_scores, out_boxes, out_points = [], [], []
    while len(order):
        best = order[0]
        overlap = iou(boxes[best], boxes[order]) > iou_threshold
        overlap[0] = True
        cluster = order[overlap]
        if weighted:
            w = scores[cluster] / scores[cluster].sum()
            out_boxes.append(w @ boxes[cluster])
            out_points.append(np.tensordot(w, keypoints[cluster], axes=1))
        else:
            out_boxes.append(boxes[best])
            out_points.append(keypoints[best])
        out_scores.append(scores[best])
        order = order[~overlap]
    if not out_scores:
        return np.empty(0), np.empty((0, 4)), np.empty((0, 6, 2))
    return np.array(out_scores), np.stack(out_boxes), np.stack(out_points)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping the aspect ratio and pad to size x size, centred (zeros: black after [-1, 1] scaling is -1).
    Returns (float32 [size, size, 3] in [-1, 1], scale, (pad_x, pad_y)) with input = frame * scale + pad."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
    # The resize maps pixel edges to pixel edges: x_in = x * new_w / width (per axis), here taken as one scale.
    return canvas / 127.5 - 1.0, new_w / width, (float(pad_x), float(pad_y))


class BlazeFace:
    """detect(frame) -> [Detection], best first. range "short" (faces within ~2 m) or "full" (up to ~5 m)."""

    def __init__(self, range_: Literal["short", "full"] = "short", threads: int = 1, root=None,
                 score_threshold: float | None = None, iou_threshold: float = 0.3, weighted_nms: bool = True) -> None:
        if range_ not in MODELS:
            raise ValueError(f"BlazeFace range must be one of {', '.join(MODELS)}, got {range_!r}")
        self.spec = MODELS[range_]
        self.model = load_model(self.spec.file_name, root, threads)
        self.anchors = anchor_centres(self.spec)
        self.score_threshold = self.spec.score_threshold if score_threshold is None else score_threshold
        self.iou_threshold = iou_threshold
        self.weighted_nms = weighted_nms

    def detect(self, frame: np.ndarray) -> list[Detection]:
        size = self.spec.input_size
        batch, scale, (pad_x, pad_y) = letterbox(frame, size)
        outputs = self.model(batch[None])
        regressors, logits = sorted(outputs, key=lambda o: o.shape[-1], reverse=True)  # [1, A, 16], [1, A, 1]
        scores, boxes, points = decode(regressors[0], logits[0, :, 0], self.anchors, size, self.score_threshold)
        scores, boxes, points = non_max_suppression(scores, boxes, points, self.iou_threshold, self.weighted_nms)
        # Input [0, 1] -> frame pixels: undo the padding and the scale.
        pad = np.array([pad_x, pad_y])
        boxes = (boxes.reshape(-1, 2, 2) * size - pad) / scale
        points = (points * size - pad) / scale
        return [Detection(float(s), (float(b[0, 0]), float(b[0, 1]), float(b[1, 0] - b[0, 0]),
                                     float(b[1, 1] - b[0, 1])), p)
                for s, b, p in zip(scores, boxes, points)]


def pad_frame(frame: np.ndarray, fraction: float) -> tuple[np.ndarray, int]:
    """The frame inside a black border of fraction x its longer side on every side, and the border in pixels."""
    border = int(round(fraction * max(frame.shape[:2])))
    return cv2.copyMakeBorder(frame, border, border, border, border, cv2.BORDER_CONSTANT, value=0), border


def shift(detections: list[Detection], dx: float, dy: float) -> list[Detection]:
    offset = np.array([dx, dy])
    return [Detection(d.score, (d.box[0] + dx, d.box[1] + dy, d.box[2], d.box[3]),
                      None if d.keypoints is None else d.keypoints + offset) for d in detections]


def tiles(height: int, width: int, side: int) -> list[tuple[int, int]]:
    """Top-left corners of side x side squares covering the frame with half a square of overlap."""
    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        count = int(np.ceil((length - side) / (side / 2))) + 1
        return [round(v) for v in np.linspace(0, length - side, count)]
    return [(x, y) for y in starts(height) for x in starts(width)]


class CropAwareBlazeFace:
    """Faces in any photo, one model call when a face is plain to see, more only where it finds none:
    1. the short-range model on the frame;
    2. on the frame padded by PAD_FRACTION: a tight crop (an aligned celeb-dev image) fills more of the frame than
       the model's training faces do (measured on celeb-dev crops: 99.0 % found as they are, 100 % padded);
    3. the full-range model on the frame (faces up to ~5 m);
    4. the short-range model on overlapping tiles of TILE_FRACTION of the frame's shorter side, detections merged by
       NMS: a small, distant face in a large frame (the letterbox shrinks a 60 px face in a 640 px frame to 12 px,
       below what the short-range model sees).
    A frame without a face pays for all four (bench/vision_bench.py measures the recall of the cascade).
    """

    PAD_FRACTION = 0.25
    TILE_FRACTION = 0.5

    def __init__(self, threads: int = 1, root=None) -> None:
        self.short = BlazeFace("short", threads, root)
        self.full = BlazeFace("full", threads, root)

    def detect(self, frame: np.ndarray) -> list[Detection]:
        found = self.short.detect(frame)
        if found:
            return found
        padded, border = pad_frame(frame, self.PAD_FRACTION)
        found = shift(self.short.detect(padded), -border, -border)
        return found or self.full.detect(frame) or self.detect_tiled(frame)

    def detect_tiled(self, frame: np.ndarray) -> list[Detection]:
        height, width = frame.shape[:2]
        side = max(self.short.spec.input_size, round(self.TILE_FRACTION * min(height, width)))
        if side >= max(height, width):
            return []
        found = [d for x, y in tiles(height, width, side)
                 for d in shift(self.short.detect(frame[y:y + side, x:x + side]), x, y)]
        if not found:
            return []
        boxes = np.array([[d.box[0], d.box[1], d.box[0] + d.box[2], d.box[1] + d.box[3]] for d in found])
        scores, boxes, points = non_max_suppression(np.array([d.score for d in found]), boxes,
                                                    np.stack([d.keypoints for d in found]), self.short.iou_threshold,
                                                    self.short.weighted_nms)
        return [Detection(float(s), (float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])), p)
                for s, b, p in zip(scores, boxes, points)]
