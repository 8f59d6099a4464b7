"""Report figures: integer ticks on layer axes, every space labelled at panel sizes of 10 and more."""

import numpy as np
from matplotlib.figure import Figure

from lvaa_jax.alignment import report


def saved_figure(monkeypatch, draw):
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: figures.append(self))
    draw()
    (figure,) = figures
    return figure


def test_layer_axes_have_integer_ticks(monkeypatch, tmp_path):
    curves = {f"space{i}": [0.1, 0.5, 0.3] for i in range(12)}
    figure = saved_figure(monkeypatch, lambda: report.layer_curves(tmp_path / "c.png", "action", curves, 0.03, 15))
    ax = figure.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks == [0, 1, 2]
    assert len(ax.get_legend().get_texts()) == 13  # every space and the chance line


def test_heatmap_labels_every_space(monkeypatch, tmp_path):
    names = [f"model_{i}" for i in range(14)]
    matrix = np.random.default_rng(0).random((14, 14))
    figure = saved_figure(monkeypatch, lambda: report.heatmap(tmp_path / "h.png", names, matrix, "title"))
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert len(ax.texts) == 14 * 14
