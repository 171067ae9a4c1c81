"""Learning curves of a run as a PNG (matplotlib, optional)."""
from __future__ import annotations

from typing import Optional

from jaxprop import checkpoint as ckpt


def plot_learning_curves(rows: list, path: str, title: str = "", eval_name: str = "test") -> Optional[str]:
    """Loss (log scale) and accuracy against step, train and ``eval_name``, as a PNG.

    ``rows``: the metrics rows of :func:`jaxprop.train.fit` (its ``history``).
    Uses matplotlib's object API (no global backend change) and writes the
    file atomically. Returns the path, or None when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return None
    has_acc = any(r.get("train_accuracy") is not None for r in rows)
    fig = Figure(figsize=(11 if has_acc else 6, 4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    steps = [r["step"] for r in rows]

    def curve(ax, key, label, style="-"):
        pts = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)

    ax = axes[0]
    curve(ax, "train_loss", "train")
    curve(ax, f"{eval_name}_loss", eval_name)
    curve(ax, "batch_loss", "mini-batches (mean since last eval)", ":")
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    if has_acc:
        curve(axes[1], "train_accuracy", "train")
        curve(axes[1], f"{eval_name}_accuracy", eval_name)
        axes[1].set_ylabel("accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    ckpt.atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)   # never a 0-byte PNG
    return path
