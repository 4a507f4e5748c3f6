"""Plotting helpers: headless drawing, PNG output, the certified-accuracy curve, input errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from certdistill import certified_radius, certify  # noqa: E402
from certdistill.plotting import (  # noqa: E402
    certified_accuracy_curve,
    plot_certified_accuracy_curve,
    plot_radius_histogram,
    plot_training_schedule,
)


def _save(ax_or_figure, path) -> None:
    figure = ax_or_figure if isinstance(ax_or_figure, Figure) else ax_or_figure.figure
    figure.savefig(path, dpi=50)
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def toy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    X = torch.rand(40, 4)
    with torch.no_grad():
        y = net(X).argmax(1).numpy()
    y[:5] = (y[:5] + 1) % 3  # a few misclassified samples
    return net, X, y


# ------------------------------------------------------------------ headless, no pyplot
def test_draws_headless_without_pyplot(tmp_path):
    """No display, an interactive backend requested: plotting must still work, without pyplot."""
    script = (
        "import sys\n"
        "from certdistill.plotting import plot_certified_accuracy_curve\n"
        "ax = plot_certified_accuracy_curve(([0, 0.1], [0.9, 0.5]))\n"
        f"ax.figure.savefig({str(tmp_path / 'headless.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert (tmp_path / "headless.png").stat().st_size > 1000


# ----------------------------------------------------------------- certified accuracy curve
def test_certified_accuracy_curve_module(toy):
    net, X, y = toy
    grid = np.array([0.0, 0.01, 0.05, 0.2])
    curve = certified_accuracy_curve(net, X, y, grid, method="ibp", tol=1e-4)
    assert curve.shape == grid.shape
    assert np.all((curve >= 0) & (curve <= 1))
    assert np.all(np.diff(curve) <= 0)  # non-increasing in eps
    clean = (net(X).argmax(1).numpy() == y).mean()
    assert curve[0] == pytest.approx(clean)
    # Sound: never above what certify finds at exactly that eps (IBP is monotone in eps).
    for eps, value in zip(grid[1:], curve[1:], strict=True):
        exact = certify(net, X, eps, method="ibp", y=y).certified.mean()
        assert value <= exact + 1e-12
        assert value >= exact - 3 / len(y)  # only samples within tol of eps may differ


def test_certified_accuracy_curve_counts_samples_certified_at_max_eps():
    # A constant network is certified everywhere: every grid point must read 100 %, including
    # the largest, whose float32 rounding falls below the float64 value (0.7).
    net = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([1.0, 0.0]))
    X, y = torch.rand(5, 2), np.zeros(5, dtype=int)
    curve = certified_accuracy_curve(net, X, y, [0.0, 0.3, 0.7], method="crown")
    np.testing.assert_array_equal(curve, [1.0, 1.0, 1.0])


def test_certified_accuracy_curve_duck_typed_estimator(toy):
    net, X, y = toy
    calls = []

    class Estimator:
        def predict(self, X):
            with torch.no_grad():
                return net(torch.as_tensor(X)).argmax(1).numpy()

        def certified_radius(self, X, *, y=None, method="crown", max_eps=1.0, tol=1e-3):
            calls.append((method, max_eps, tol))
            return certified_radius(net, X, y=y, method=method, max_eps=max_eps, tol=tol)

    grid = [0.2, 0.0, 0.05]
    curve = certified_accuracy_curve(Estimator(), X.numpy(), y, grid, method="ibp", tol=1e-4)
    expected = certified_accuracy_curve(net, X, y, grid, method="ibp", tol=1e-4)
    np.testing.assert_allclose(curve, expected)
    assert len(calls) == 1 and calls[0][0] == "ibp" and calls[0][1] >= 0.2


def test_certified_accuracy_curve_errors(toy):
    net, X, y = toy
    with pytest.raises(ValueError, match="non-negative"):
        certified_accuracy_curve(net, X, y, [-0.1, 0.1])
    with pytest.raises(ValueError, match="empty"):
        certified_accuracy_curve(net, X, y, [])
    with pytest.raises(ValueError, match="NaN"):
        certified_accuracy_curve(net, X, y, [0.1, np.nan])
    with pytest.raises(ValueError, match="one label per sample"):
        certified_accuracy_curve(net, X, y[:-1], [0.1])
    with pytest.raises(ValueError, match="max_eps"):
        certified_accuracy_curve(net, X, y, [0.1, 0.2], max_eps=0.1)
    with pytest.raises(TypeError, match="certified_radius"):
        certified_accuracy_curve(object(), X, y, [0.1])


# ------------------------------------------------------------------------------ plots
def test_plot_certified_accuracy_curve_writes_png(tmp_path):
    curves = {
        "teacher": (np.array([0.0, 0.1, 0.2]), np.array([0.95, 0.8, 0.5])),
        "student": ([0.2, 0.0, 0.1], [0.3, 0.93, 0.7]),  # unsorted grids are sorted
    }
    ax = plot_certified_accuracy_curve(curves)
    assert isinstance(ax, Axes)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["teacher", "student"]
    np.testing.assert_allclose(ax.lines[1].get_xdata(), [0.0, 0.1, 0.2])
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.93, 0.7, 0.3])
    _save(ax, tmp_path / "curve.png")


def test_plot_certified_accuracy_curve_on_given_axes_and_single_pair(tmp_path):
    figure = Figure()
    ax = figure.add_subplot()
    out = plot_certified_accuracy_curve(([0, 0.1], [1.0, 0.2]), ax=ax, title=None)
    assert out is ax and ax.get_legend() is None and len(ax.lines) == 1
    _save(figure, tmp_path / "single.png")


@pytest.mark.parametrize(
    ("curves", "error", "match"),
    [
        ({}, ValueError, "empty"),
        ({"a": ([0, 0.1], [0.9])}, ValueError, "2 values but accuracy has 1"),
        ({"a": ([0, 0.1], [90, 50])}, ValueError, r"fraction in \[0, 1\]"),
        ({"a": ([-0.1, 0.1], [0.9, 0.5])}, ValueError, "non-negative"),
        ({"a": ([0, 0.1], [0.9, np.nan])}, ValueError, "NaN"),
        ({"a": ([0, 0.1],)}, ValueError, "pair"),
        ({"a": ([[0, 0.1]], [[0.9, 0.5]])}, ValueError, "one-dimensional"),
        ({"a": (["x", "y"], [0.9, 0.5])}, ValueError, "numeric"),
    ],
)
def test_plot_certified_accuracy_curve_bad_input(curves, error, match):
    with pytest.raises(error, match=match):
        plot_certified_accuracy_curve(curves)


def test_plot_rejects_non_axes():
    with pytest.raises(TypeError, match="Axes"):
        plot_certified_accuracy_curve(([0, 0.1], [1.0, 0.5]), ax="not an axes")


def test_plot_radius_histogram_writes_png(tmp_path, toy):
    net, X, y = toy
    radius = certified_radius(net, X, y=y, method="ibp", max_eps=0.3)
    ax = plot_radius_histogram(
        {"net": radius, "other": radius / 2, "torch": torch.tensor(radius)}, bins=10, density=True
    )
    assert isinstance(ax, Axes)
    assert len(ax.get_legend().get_texts()) == 3
    # Shared bin edges: every model's bars start at the same left edge.
    lefts = {round(patch.get_path().vertices[:, 0].min(), 12) for patch in ax.patches}
    assert len(lefts) == 1
    _save(ax, tmp_path / "hist.png")
    single = plot_radius_histogram(radius)
    assert single.get_legend() is None
    _save(single, tmp_path / "hist_single.png")


@pytest.mark.parametrize(
    ("radii", "match"),
    [
        ({}, "empty"),
        ([], "empty"),
        ({"a": [0.1, -0.2]}, "non-negative"),
        ({"a": [0.1, np.inf]}, "infinite"),
        (np.zeros((2, 2)), "one-dimensional"),
    ],
)
def test_plot_radius_histogram_bad_input(radii, match):
    with pytest.raises(ValueError, match=match):
        plot_radius_histogram(radii)


def _history(epochs: int = 6, batches: int = 3):
    rows = []
    for epoch in range(1, epochs + 1):
        ramp = min(1.0, (epoch - 1) / 3)
        row = {
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "eps": 0.1 * ramp,
            "kappa": 1.0 - 0.5 * ramp,
            "lr": 1e-3 * 0.5**epoch,
            "batches": [
                {"train_loss": 1.0, "eps": 0.1 * ramp * (i + 1) / batches} for i in range(batches)
            ],
        }
        if epoch > 2:
            row["beta"] = 1.0 - ramp  # a key recorded only from epoch 3 on
        rows.append(row)
    return rows


def test_plot_training_schedule_panels(tmp_path):
    axes = plot_training_schedule(_history())
    assert list(axes) == ["eps", "kappa", "beta", "lr"]  # alpha never recorded: skipped
    assert all(isinstance(a, Axes) for a in axes.values())
    assert len({id(a) for a in axes.values()}) == 4
    beta = axes["beta"].lines[0].get_ydata()
    assert np.isnan(beta[:2]).all() and np.isfinite(beta[2:]).all()  # gap where missing
    _save(axes["eps"].figure, tmp_path / "schedule.png")


def test_plot_training_schedule_skorch_history_and_net(tmp_path):
    from skorch.history import History

    history = History()
    for row in _history(epochs=3):
        history.new_epoch()
        for key, value in row.items():
            if key != "batches":
                history.record(key, value)
        for batch in row["batches"]:
            history.new_batch()
            for key, value in batch.items():
                history.record_batch(key, value)

    class Net:  # a fitted skorch net exposes .history
        pass

    net = Net()
    net.history = history
    axes = plot_training_schedule(net, keys=["eps", "train_loss"], per_batch=True)
    assert list(axes) == ["eps", "train_loss"]
    x = axes["eps"].lines[0].get_xdata()
    np.testing.assert_allclose(x, np.arange(1, 10) / 3)  # 3 batches per epoch
    np.testing.assert_allclose(axes["eps"].lines[0].get_ydata()[-1], 0.1 * 2 / 3)
    _save(axes["eps"].figure, tmp_path / "schedule_batches.png")


def test_plot_training_schedule_single_axes(tmp_path):
    figure = Figure()
    ax = figure.add_subplot()
    axes = plot_training_schedule(_history(), keys=("eps", "kappa", "missing"), ax=ax)
    assert list(axes) == ["eps", "kappa"] and all(a is ax for a in axes.values())
    assert len(ax.lines) == 2
    _save(figure, tmp_path / "schedule_single.png")


def test_plot_training_schedule_errors():
    with pytest.raises(ValueError, match="None of the keys"):
        plot_training_schedule(_history(), keys=("alpha",))
    with pytest.raises(ValueError, match="empty"):
        plot_training_schedule([])
    with pytest.raises(TypeError, match="dict per epoch"):
        plot_training_schedule([1, 2, 3])
    with pytest.raises(TypeError, match="history"):
        plot_training_schedule(42)
    with pytest.raises(TypeError, match="string"):
        plot_training_schedule(_history(), keys="eps")


def test_pareto_front_keeps_the_non_dominated_points_in_order():
    from certdistill.plotting import pareto_front

    points = [[0.90, 0.70], [0.92, 0.68], [0.91, 0.72], [0.89, 0.71], [0.93, 0.60], [0.91, 0.72]]
    # Ties are not dominated by each other; (0.90, 0.70) and (0.89, 0.71) are by (0.91, 0.72).
    np.testing.assert_array_equal(pareto_front(points), [2, 5, 1, 4])
    with pytest.raises(ValueError, match="finite"):
        pareto_front([[0.5, np.nan]])


def test_plot_pareto_fronts_draws_one_front_per_group():
    from certdistill.plotting import plot_pareto_fronts

    ax = plot_pareto_fronts(
        {"alone": [[0.9, 0.7], [0.92, 0.65]], "distilled": [[0.91, 0.74], [0.93, 0.7], [0.9, 0.6]]}
    )
    fronts = [line for line in ax.get_lines()]
    assert [line.get_label() for line in fronts] == ["alone", "distilled"]
    np.testing.assert_allclose(fronts[1].get_xydata(), [[0.91, 0.74], [0.93, 0.7]])
