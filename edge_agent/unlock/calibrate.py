"""`facefed-agent calibrate`: embed a folder of labelled faces with the unlock model, score template trials as
unlock compares them (calibration.template_trials), pick the threshold for a target FAR, plot the ROC and DET
curves, and write the threshold into the device config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_zoo.data import IMAGE_EXTENSIONS, read_image, to_rgb
from model_zoo.metrics import report_from_scores

from .analyzer import FaceAnalyzer
from .calibration import (ENROL_IMAGES, ENROLMENT_DRAWS, Calibration, calibrate_threshold, draw_enrolments,
                          template_trials)


@dataclass
class LabelledEmbeddings:
    embeddings: np.ndarray  # float32 [N, D], as the model's score wants them (raw under l2)
    labels: np.ndarray  # int64 [N]
    identities: list[str]


def labelled_images(root: Path) -> list[tuple[str, Path]]:
    """(identity, image) for every image in root/<identity>/, identities and files in name order."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    samples = [(folder.name, image) for folder in sorted(p for p in root.iterdir() if p.is_dir())
               for image in sorted(folder.iterdir()) if image.is_file() and image.suffix.lower() in IMAGE_EXTENSIONS]
    identities = {name for name, _ in samples}
    if len(identities) < 2:
        raise ValueError(f"{root} needs one folder per person, at least two people with images "
                         f"({'/'.join(IMAGE_EXTENSIONS)}); found {len(identities)}")
    return samples


def embed_labelled(analyzer: FaceAnalyzer, samples: list[tuple[str, Path]],
                   identity_prefix: str = "") -> LabelledEmbeddings:
    """Each image through the unlock path (detect, landmarks, ArcFace alignment, embedding), one at a time."""
    identities = list(dict.fromkeys(identity_prefix + name for name, _ in samples))
    index = {name: i for i, name in enumerate(identities)}
    embeddings = np.stack([analyzer.analyze_photo(np.ascontiguousarray(to_rgb(read_image(path)))).embedding
                           for _, path in samples])
    labels = np.array([index[identity_prefix + name] for name, _ in samples], dtype=np.int64)
    return LabelledEmbeddings(embeddings, labels, identities)


def calibrate_embeddings(data: LabelledEmbeddings, target_far: float, score: str = "cosine",
                         enrol_images: int = ENROL_IMAGES, draws: int = ENROLMENT_DRAWS,
                         seed: int = 0) -> tuple[Calibration, np.ndarray, np.ndarray]:
    """(calibration, scores, is-genuine) over template trials under `score` (the model's): `draws` random
    enrolments of `enrol_images` images per identity, each template against every image outside its enrolment."""
    scores, genuine = template_trials(data.embeddings, data.labels,
                                      draw_enrolments(data.labels, enrol_images, draws, seed), score)
    return calibrate_threshold(scores, genuine, target_far, score), scores, genuine


def plot_roc_det(scores: np.ndarray, genuine: np.ndarray, calibration: Calibration, path: Path, title: str) -> None:
    """ROC (TAR against FAR) and DET (FRR against FAR), log-scaled FAR, the chosen operating point marked."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("calibrate's plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    report = report_from_scores(scores, genuine)
    floor = 0.5 / report.impostor_pairs  # where zero false accepts sits on a log axis
    far = np.maximum(report.fpr, floor)
    frr = np.maximum(1.0 - report.tpr, 0.5 / report.genuine_pairs)
    point = (max(calibration.far, floor), max(calibration.frr, 0.5 / report.genuine_pairs))
    fig, (roc, det) = plt.subplots(1, 2, figsize=(10, 4.2))
    roc.plot(far, report.tpr)
    roc.plot(point[0], 1.0 - calibration.frr, "o", color="C3")
    roc.set(xscale="log", xlabel="false accept rate", ylabel="true accept rate", title="ROC")
    det.plot(far, frr)
    det.plot(*point, "o", color="C3", label=f"{calibration.score} threshold {calibration.threshold:.3f}: FAR {calibration.far:.2g}, "
                                             f"FRR {calibration.frr:.2g}")
    det.set(xscale="log", yscale="log", xlabel="false accept rate", ylabel="false reject rate", title="DET")
    det.legend(loc="upper right", fontsize=8)
    for ax in (roc, det):
        ax.axvline(calibration.target_far, color="grey", linestyle=":", linewidth=1)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{title}: {report.genuine_pairs:,} genuine, {report.impostor_pairs:,} impostor trials, "
                 f"EER {report.eer:.3f}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
