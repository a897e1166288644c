"""Face datasets as uint8 RGB arrays: ORL, Yale (full frames, Haar-cropped) and folder-per-identity layouts."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".bmp", ".gif")
LAYOUTS = ("orl", "yale", "folders")
REPO_ROOT = Path(__file__).resolve().parents[1]

_ORL_DIR = re.compile(r"s\d+")
_YALE_FILE = re.compile(r"subject\d+\.[A-Za-z]+")
_HAAR_FILE = "haarcascade_frontalface_default.xml"
_FACE_BOX_GROWTH = 1.2  # Haar boxes are tight around the eyes-mouth region; keep forehead and chin too


@dataclass
class FaceDataset:
    images: np.ndarray  # uint8 [N, H, W, 3] RGB
    labels: np.ndarray  # int64 [N], dense in range(len(identities))
    identities: list[str]  # label -> identity name

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[3] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels shape {self.labels.shape} does not match {len(self.images)} images")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.identities)):
            raise ValueError(f"labels must lie in [0, {len(self.identities)})")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def subset(self, indices) -> FaceDataset:
        """The given samples, with labels renumbered densely over the identities they contain."""
        indices = np.asarray(indices, dtype=np.int64)
        kept, labels = np.unique(self.labels[indices], return_inverse=True)
        return FaceDataset(self.images[indices], labels.astype(np.int64), [self.identities[k] for k in kept])

    def first_per_identity(self, limit: int) -> FaceDataset:
        """The first `limit` samples of each identity (file order), every identity kept."""
        return self.subset(np.concatenate([np.flatnonzero(self.labels == label)[:limit]
                                           for label in range(self.num_classes)]))

    def of_identities(self, names: list[str]) -> FaceDataset:
        """Every sample of the named identities."""
        wanted = [self.identities.index(name) for name in names]
        return self.subset(np.flatnonzero(np.isin(self.labels, wanted)))


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def detect_layout(root) -> str:
    """'orl' (sN/*.pgm), 'yale' (subjectNN.<condition> files) or 'folders' (<identity>/<image>)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset root {root} is not a directory")
    subdirs = [d for d in root.iterdir() if d.is_dir()]
    if subdirs and all(_ORL_DIR.fullmatch(d.name) for d in subdirs) and any(
            any(d.glob("*.pgm")) for d in subdirs):
        return "orl"
    if any(_YALE_FILE.fullmatch(f.name) for f in root.iterdir() if f.is_file()):
        return "yale"
    if any(_is_image(f) for d in subdirs for f in d.iterdir()):
        return "folders"
    raise ValueError(
        f"no known dataset layout in {root}: looked for ORL sN/*.pgm folders, Yale subjectNN.<condition> files, "
        f"or <identity>/ folders holding {'/'.join(IMAGE_EXTENSIONS)} images")


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Pad the short side by repeating edge pixels to a square, then resize: keeps the aspect ratio."""
    h, w = image.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = cv2.copyMakeBorder(image, top, side - h - top, left, side - w - left, cv2.BORDER_REPLICATE)
    return resize_square(square, size)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrinking = image.shape[0] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def to_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def read_image(path: Path) -> np.ndarray:
    """uint8 RGB [H,W,3] or grey [H,W]; GIF goes through Pillow since OpenCV cannot decode it."""
    if path.suffix.lower() == ".gif":
        return read_gif(path)
    image = cv2.imread(str(path), cv2.IMREAD_ANYCOLOR)  # 8-bit, grey stays grey, alpha dropped
    if image is None:
        raise ValueError(f"cannot decode image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image


def read_gif(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"))


@lru_cache(maxsize=1)
def _face_cascade() -> cv2.CascadeClassifier:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + _HAAR_FILE)
    if cascade.empty():
        raise RuntimeError(f"OpenCV Haar cascade {_HAAR_FILE} not found under {cv2.data.haarcascades}")
    return cascade


def face_box(grey: np.ndarray) -> tuple[int, int, int] | None:
    """(x, y, side) of the largest Haar face grown by ~20 %, or None when no face is found."""
    h, w = grey.shape
    faces = _face_cascade().detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5,
                                             minSize=(min(h, w) // 5, min(h, w) // 5))
    if len(faces) == 0:
        return None
    x, y, fw, fh = max(faces, key=lambda f: f[2] * f[3])
    side = int(round(max(fw, fh) * _FACE_BOX_GROWTH))
    return int(x + fw / 2 - side / 2), int(y + fh / 2 - side / 2), side


def crop_face(image: np.ndarray, size: int) -> np.ndarray:
    """Square face crop of a full frame (centre square if no face is found), resized to size x size."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    box = face_box(grey)
    h, w = grey.shape
    if box is None:
        side = min(h, w)
        box = ((w - side) // 2, (h - side) // 2, side)
    x, y, side = box
    # A grown box may leave the frame: pad with edge pixels rather than shift or shrink the crop.
    pad = max(0, -x, -y, x + side - w, y + side - h)
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else image
    return resize_square(padded[y + pad:y + pad + side, x + pad:x + pad + side], size)


def _orl_samples(root: Path) -> list[tuple[str, Path]]:
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: _natural_key(d.name))
    return [(d.name, f) for d in dirs for f in sorted(d.glob("*.pgm"), key=lambda f: _natural_key(f.name))]


def _yale_samples(root: Path) -> list[tuple[str, Path]]:
    files = sorted((f for f in root.iterdir() if f.is_file() and _YALE_FILE.fullmatch(f.name)),
                   key=lambda f: _natural_key(f.name))
    return [(f.name.split(".", 1)[0], f) for f in files]


def _folder_samples(root: Path) -> list[tuple[str, Path]]:
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name)
    return [(d.name, f) for d in dirs for f in sorted(filter(_is_image, d.iterdir()), key=lambda f: _natural_key(f.name))]


def _load_letterboxed(path: Path, size: int) -> np.ndarray:
    return letterbox(read_image(path), size)


def _load_yale(path: Path, size: int) -> np.ndarray:
    return crop_face(read_gif(path), size)


_SAMPLERS = {"orl": _orl_samples, "yale": _yale_samples, "folders": _folder_samples}
_LOADERS = {"orl": _load_letterboxed, "yale": _load_yale, "folders": _load_letterboxed}


def load_dataset(root, layout: str = "auto", size: int = IMAGE_SIZE) -> FaceDataset:
    """Every image under root as a size x size RGB face crop, labelled by identity (sorted by name)."""
    root = Path(root)
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    samples = _SAMPLERS[layout](root)
    if not samples:
        raise ValueError(f"no images found in {root} for layout {layout!r}")
    identities = list(dict.fromkeys(name for name, _ in samples))
    index = {name: i for i, name in enumerate(identities)}
    load = _LOADERS[layout]
    images = np.stack([to_rgb(load(path, size)) for _, path in samples])
    labels = np.array([index[name] for name, _ in samples], dtype=np.int64)
    return FaceDataset(images, labels, identities)


def load_datasets(roots: list, size: int = IMAGE_SIZE) -> FaceDataset:
    """Concatenation of several datasets; identities become '<dataset folder>_<identity>' to stay distinct."""
    if not roots:
        raise ValueError("load_datasets needs at least one root")
    names = [Path(r).name for r in roots]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset folder names must be distinct to prefix identities, got {names}")
    parts = [load_dataset(r, size=size) for r in roots]
    offsets = np.cumsum([0] + [p.num_classes for p in parts[:-1]])
    return FaceDataset(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels + off for p, off in zip(parts, offsets)]),
        [f"{name}_{ident}" for name, p in zip(names, parts) for ident in p.identities],
    )


def save_folders(dataset: FaceDataset, out_dir) -> None:
    """Write out_dir/<identity>/<k>.png (lossless), loadable again with layout 'folders'."""
    out_dir = Path(out_dir)
    for name in dataset.identities:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"identity {name!r} cannot be used as a folder name")
    counts = np.zeros(dataset.num_classes, dtype=np.int64)
    for image, label in zip(dataset.images, dataset.labels):
        folder = out_dir / dataset.identities[label]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{counts[label]}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {path}")
        counts[label] += 1


def candidate_data_roots() -> list[Path]:
    return [Path.cwd() / ".." / "shared" / "datasets" / "orl", REPO_ROOT / ".." / "shared" / "datasets" / "orl"]


def default_data_root() -> Path | None:
    """$FACEFED_DATA if set, else the first existing candidate_data_roots() entry, else None."""
    if os.environ.get("FACEFED_DATA"):
        return Path(os.environ["FACEFED_DATA"])
    return next((p.resolve() for p in candidate_data_roots() if p.is_dir()), None)


def shared_datasets_root() -> Path:
    """Where the project's shared test datasets live: $FACEFED_DATA_ROOT, default <repo>/../shared/datasets."""
    return Path(os.environ.get("FACEFED_DATA_ROOT") or REPO_ROOT.parent / "shared" / "datasets")


def shared_dataset_dir(name: str) -> Path | None:
    """shared_datasets_root()/name if that folder exists (tests skip on None)."""
    path = shared_datasets_root() / name
    return path if path.is_dir() else None


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC RGB -> float32 NCHW scaled as (x - 127.5) / 128, the backbone's input convention."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected uint8 images [N,H,W,3], got shape {images.shape}")
    return normalize_pixels(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float())


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 255] -> roughly [-1, 1], the scaling MobileFaceNet is trained with."""
    return (pixels - 127.5) / 128.0
