"""PNG figures: training curves per round and ROC curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(rounds: Sequence[Mapping], path: Path) -> Path:
    """Held-out accuracy and mean training loss per round, side by side."""
    plt = _pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc = [(r["round"], r["val_accuracy"]) for r in rounds if r.get("val_accuracy") is not None]
    loss = [(r["round"], r["train_loss"]) for r in rounds if r.get("train_loss") is not None]
    if acc:
        acc_ax.plot(*zip(*acc), marker="o")
    acc_ax.set(title="Held-out verification accuracy", xlabel="round", ylabel="accuracy")
    acc_ax.grid(alpha=0.3)
    if loss:
        loss_ax.plot(*zip(*loss), marker="o", color="tab:red")
    loss_ax.set(title="Train loss (n_k-weighted mean)", xlabel="round", ylabel="loss")
    loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "ROC") -> Path:
    """TAR against FAR (log scale), one line per named (fpr, tpr) curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, (fpr, tpr) in curves.items():
        positive = fpr > 0
        ax.plot(fpr[positive], tpr[positive], label=name)
    ax.set_xscale("log")
    ax.set(title=title, xlabel="false accept rate (FAR)", ylabel="true accept rate (TAR)", ylim=(0, 1.01))
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_method_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path,
                       title: str = "Held-out verification accuracy per round",
                       xlabel: str = "round (local_epochs each)", ylabel: str = "held-out accuracy",
                       legend_loc: str = "lower right") -> Path:
    """One line per method of (round, score) points, all in one figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name,
                    linestyle="--" if name.startswith("1 identity") else "-")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
