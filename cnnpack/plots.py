"""The plots a person wants after training: curves, confusion matrix, a prediction grid."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from cnnpack.atomic import atomic_path


def _figure(**kwargs):
    """A figure outside pyplot: no GUI, and the caller's backend is left alone (switching it to Agg
    would stop a notebook that calls `train()` from showing its own plots inline)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: Path) -> None:
    # a class name in a script the font lacks (Chinese, say) is drawn as boxes: said once per letter as a raw Python
    # warning on stderr, it told the user nothing the plot does not show
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from", category=UserWarning)
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


CONFUSION_NAMED = 30  # the most classes confusion.png names (and writes counts for); beyond, their indices


def shown(name: str, limit: int) -> str:
    """A class name as a plot draws it: as it is (a `$` pair is matplotlib's math: "x$^$y" stopped the training's
    plots with a traceback, "cost $5 or $10" lost its dollars), at most `limit` characters (a long name ran into
    its neighbours)."""
    name = name if len(name) <= limit else name[:limit - 1] + "…"
    return name.replace("$", r"\$")


def curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train and val side by side."""
    ep = [h["epoch"] for h in history]
    fig = _figure(figsize=(10, 3.8))
    a, b = fig.subplots(1, 2)
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a.set(title="loss", xlabel="epoch")
    b.plot(ep, [100 * h["train_acc"] for h in history], "o-", label="train")
    b.plot(ep, [100 * h["val_acc"] for h in history], "o-", label="val")
    b.set(title="top-1 accuracy (%)", xlabel="epoch")
    best = max(history, key=lambda h: h["val_acc"])
    b.plot([best["epoch"]], [100 * best["val_acc"]], "*", color="black", markersize=12, zorder=3,
           label=f"best val {100 * best['val_acc']:.2f}% (epoch {best['epoch']})")
    for ax in (a, b):
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs, not 1.5, 2.5, ...
        if len(ep) == 1:  # one epoch: its tick alone (the locator drew 0.96 ... 1.04)
            ax.set_xticks(ep)
            ax.set_xlim(ep[0] - 0.5, ep[0] + 0.5)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def confusion(cm: np.ndarray, classes: list[str], path: Path, title: str = "confusion matrix (val)") -> None:
    """Row-normalised confusion matrix with the raw counts written in each cell."""
    k = len(classes)
    side = min(1.0 + 0.6 * k, 14.0)  # 100 classes would otherwise make a 60-inch figure
    fig = _figure(figsize=(side, side - 0.2))
    ax = fig.subplots()
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= CONFUSION_NAMED:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), [shown(c, 24) for c in classes], rotation=45, ha="right")
        ax.set_yticks(range(k), [shown(c, 24) for c in classes])
        ax.set(xlabel="predicted", ylabel="true", title=title)
    else:  # no room for names: the index of each class, which the report's Data table lists beside its name
        ax.set(xlabel="predicted (class index: see the report's Data table)", ylabel="true (class index)",
               title=title)
    _save(fig, path)


def samples(images: np.ndarray, true: list[int], pred: list[int], classes: list[str], path: Path) -> None:
    """A grid of images (N, 3, H, W uint8) titled `pred (true)`; mistakes in red."""
    n = len(images)
    cols = min(8, n)
    rows = (n + cols - 1) // cols
    fig = _figure(figsize=(1.6 * cols, 1.8 * rows), layout="constrained")  # (titles kept off the heading)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(images[i].transpose(1, 2, 0), interpolation="nearest")  # the pixels the model saw
        ok = true[i] == pred[i]
        label = shown(classes[pred[i]], 20) if ok else f"{shown(classes[pred[i]], 20)}\n(true: {shown(classes[true[i]], 13)})"
        ax.set_title(label, fontsize=7, color="green" if ok else "red")
        if not ok:
            for spine in ax.spines.values():
                spine.set(visible=True, color="red", linewidth=2)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("validation predictions (red: mistakes)", fontsize=9)
    _save(fig, path)


def spaced_log_ticks(ax, fontsize: float = 8) -> None:
    """Labels on a log x axis that do not run into each other: the decades first, then 2x and 5x, then the other
    multiples, each where its label clears its neighbours' at the axis's width. Every minor tick labelled ran
    together ("0.090.1", "5060708090100"), and so did labels a fixed 0.1 decade apart on an axis of 5 decades."""
    import matplotlib.ticker

    lo, hi = ax.get_xlim()
    inch_per_decade = ax.get_position().width * ax.get_figure().get_figwidth() / (math.log10(hi) - math.log10(lo))
    char_in = 0.65 * fontsize / 72  # a digit's advance in the default sans font, a little over

    def clear(a: float, b: float) -> bool:  # half of each label, and two characters between them
        need = ((len(f"{a:g}") + len(f"{b:g}")) / 2 + 2) * char_in
        return abs(math.log10(a) - math.log10(b)) * inch_per_decade >= need

    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    candidates = [(0 if m == 1 else 1 if m in (2, 5) else 2, m * 10.0 ** d) for d in decades for m in range(1, 10)]
    shown: list[float] = []
    for _, t in sorted(c for c in candidates if lo <= c[1] <= hi):
        t = float(f"{t:.12g}")  # 3 x 0.1 is 0.30000000000000004, whose label is as long
        if all(clear(t, u) for u in shown):
            shown.append(t)
    if not shown:  # a span between two multiples (one point and its margins): its middle
        shown = [float(f"{math.sqrt(lo * hi):.2g}")]
    ax.set_xticks(sorted(shown), [f"{t:g}" for t in sorted(shown)])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlim(lo, hi)
