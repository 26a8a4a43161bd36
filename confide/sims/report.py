"""Plots of a federation's history: accuracy and loss per round, as a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: sites and CI machines have no display

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from confide.server.history import History

_SERIES = (
    ("train", "train_accuracy", "train_loss"),
    ("federated eval", "eval_accuracy", "eval_loss"),
    ("central test", "test_accuracy", "test_loss"),
)


def plot_history(history: History, path: Path) -> Path:
    """Write accuracy and loss against round number to ``path`` (PNG) and return it."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for label, acc_key, loss_key in _SERIES:
        xs, ys = history.series(acc_key)
        if xs:
            ax_acc.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=label)
        xs, ys = history.series(loss_key)
        if xs:
            ax_loss.plot(xs, ys, marker="o", markersize=3, label=label)
    ax_acc.set(xlabel="round", ylabel="accuracy (%)", title=f"{history.task}: accuracy")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title=f"{history.task}: loss")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
