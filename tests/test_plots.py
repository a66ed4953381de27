"""The training plots: real PNG files, written without touching the caller's matplotlib backend."""

from __future__ import annotations

import numpy as np
import pytest

from cnnpack import plots

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def svg_backend():
    """Any backend but Agg stands in for a notebook's inline one; the previous one comes back after."""
    import matplotlib

    old = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(old)


def test_plots_leave_the_backend_alone(tmp_path, svg_backend):
    """A notebook's inline backend must survive `train()` (it used to be switched to Agg)."""
    import matplotlib

    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_acc": 0.5 + e / 10,
                "val_acc": 0.4 + e / 10} for e in (1, 2, 3)]
    plots.curves(history, tmp_path / "curves.png")
    plots.confusion(np.array([[3, 1], [0, 4]]), ["a", "b"], tmp_path / "confusion.png")
    images = np.random.default_rng(0).integers(0, 255, (3, 3, 8, 8), dtype=np.uint8)
    plots.samples(images, [0, 1, 1], [0, 0, 1], ["a", "b"], tmp_path / "samples.png")
    assert matplotlib.get_backend() == "svg"
    for name in ("curves.png", "confusion.png", "samples.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name


@pytest.mark.parametrize("span", [(0.085, 0.52), (5500, 20500), (0.3, 0.45), (1, 5000), (0.31, 0.36),
                                  (0.002, 100), (20, 120000), (0.05, 1000)])
@pytest.mark.parametrize("width", [4.5, 9])  # a panel of precision.png, tune.png
def test_log_axis_labels_do_not_overlap_as_drawn(span, width):
    """Every minor tick was labelled: "0.090.1" and "8000 9000 10000" ran into each other in report.html; labels a
    fixed 0.1 decade apart still did over 5 decades ("0.00203.0507.1", "3000050000 70000100000")."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cnnpack.plots import spaced_log_ticks

    fig = Figure(figsize=(width, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set_xscale("log")
    ax.set_xlim(*span)
    spaced_log_ticks(ax, fontsize=8)
    ax.tick_params(axis="x", which="both", labelsize=8)
    fig.canvas.draw()
    labels = [t for t in ax.get_xticklabels() if t.get_text() and span[0] <= t.get_position()[0] <= span[1]]
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    assert boxes and all(a.x1 + 2 < b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]
    assert len(boxes) >= min(3, 1 + int(np.log10(span[1] / span[0])))  # and not bare: a label per decade, where 3 fit
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{t:g}" for t in ax.get_xticks()]


def test_class_names_are_drawn_as_they_are_and_long_ones_shortened(tmp_path):
    """A `$` pair is matplotlib's math: "x$^$y" stopped the training's plots with a traceback, "cost $5 or $10" lost
    its dollars; a 77-letter name ran into its neighbours."""
    names = ["x$^$y", "cost $5 or $10", "a" * 77]
    plots.confusion(np.eye(3, dtype=int) * 2, names, tmp_path / "confusion.png")
    images = np.zeros((3, 3, 8, 8), dtype=np.uint8)
    plots.samples(images, [0, 1, 2], [1, 2, 0], names, tmp_path / "samples.png")
    assert (tmp_path / "confusion.png").read_bytes()[:8] == PNG and (tmp_path / "samples.png").read_bytes()[:8] == PNG
    from matplotlib import cbook

    assert not cbook.is_math_text(plots.shown("cost $5 or $10", 24))  # drawn as it is, not as math
    assert cbook.is_math_text("cost $5 or $10")  # (which it was)
    assert plots.shown("a" * 77, 24) == "a" * 23 + "…"


def test_past_thirty_classes_the_matrix_is_numbered_and_the_report_lists_the_numbers(tmp_path):
    from cnnpack.report import _data_and_training
    from cnnpack.report_render import to_markdown
    from cnnpack.rundir import Run

    k = plots.CONFUSION_NAMED + 1
    m = {"model": {"arch": "cnn", "image_size": 32},
         "stages": {"train": {"data": {"classes": [f"c{i}" for i in range(k)], "train_per_class": [1] * k,
                                       "val_per_class": [1] * k}}}}
    md = to_markdown("r", _data_and_training(m, Run(tmp_path)))
    assert "| # | class | train images | val images |" in md and f"| {k - 1} | c{k - 1} | 1 | 1 |" in md
    m["stages"]["train"]["data"] = {"classes": ["a", "b"], "train_per_class": [1, 1], "val_per_class": [1, 1]}
    assert "| class | train images | val images |" in to_markdown("r", _data_and_training(m, Run(tmp_path)))


def test_one_epoch_s_curves_have_its_tick_alone(tmp_path, monkeypatch):
    """A one-epoch training's curves were ticked 0.96, 0.98, 1.00, 1.02, 1.04."""
    from cnnpack import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.extend(ax.get_xticks().tolist() for ax in fig.axes))
    plots.curves([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "train_acc": 0.5, "val_acc": 0.4}], tmp_path / "c.png")
    assert seen == [[1.0], [1.0]]
