"""Plots of certified robustness: accuracy versus eps, radius histograms, training schedules.

Every function draws on a matplotlib ``Axes`` that you pass, or on a new
:class:`matplotlib.figure.Figure` that it creates without :mod:`matplotlib.pyplot`, so nothing
here needs a display or changes the global backend: save the result with
``ax.figure.savefig("plot.png")``. matplotlib is an optional dependency, imported only when a
plot is drawn (``pip install certdistill[plot]``).

:func:`certified_accuracy_curve` computes the data of :func:`plot_certified_accuracy_curve` from
a network or a fitted estimator with one call of
:func:`~certdistill.certification.certify.certified_radius`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from certdistill.certification.certify import DEFAULT_METHOD

if TYPE_CHECKING:  # pragma: no cover - for type hints only
    from matplotlib.axes import Axes

__all__ = [
    "certified_accuracy_curve",
    "pareto_front",
    "plot_certified_accuracy_curve",
    "plot_pareto_fronts",
    "plot_radius_histogram",
    "plot_training_schedule",
]

SCHEDULE_KEYS = ("eps", "kappa", "beta", "alpha", "lr")
"""History keys that :func:`plot_training_schedule` plots by default: the values recorded by the
schedule callbacks of the estimators, and the learning rate."""

#: Keyword arguments of :func:`certdistill.certification.certify.certify` (used for the clean pass
# at eps 0).
_CERTIFY_KWARGS = ("lower", "upper", "batch_size", "backend")


# ------------------------------------------------------------------------------- helpers
def _import_matplotlib():
    """Import matplotlib, or explain how to install it."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "certdistill.plotting needs matplotlib: install it with "
            "`pip install certdistill[plot]` (or `pip install matplotlib`)."
        ) from error
    return matplotlib, Figure


def _new_axes(ax: Axes | None, figsize: tuple[float, float] = (5.0, 3.5)) -> Axes:
    """Return ``ax``, or the single Axes of a new headless Figure."""
    _, Figure = _import_matplotlib()
    if ax is not None:
        if not hasattr(ax, "plot") or not hasattr(ax, "figure"):
            raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}.")
        return ax
    figure = Figure(figsize=figsize, layout="constrained")
    return figure.add_subplot()


def _as_1d(values, name: str) -> np.ndarray:
    """A finite, non-empty 1-D float array, or a ValueError naming ``name``."""
    try:
        array = np.asarray(
            values.detach().cpu().numpy() if hasattr(values, "detach") else values,
            dtype=np.float64,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return array


def _named_series(data, what: str) -> dict[str, Any]:
    """``{name: series}`` from a mapping, or ``{"": data}`` for a single unnamed series."""
    if isinstance(data, Mapping):
        if not data:
            raise ValueError(f"No {what} to plot: the mapping is empty.")
        return {str(name): value for name, value in data.items()}
    return {"": data}


# ------------------------------------------------------------------ certified accuracy
def _float32_ceiling(value: float) -> float:
    """Smallest float32 number not below ``value`` (exactly representable in float32 and 64)."""
    rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded)


def certified_accuracy_curve(
    model,
    X,
    y,
    eps_grid,
    method: str | Sequence[str] = DEFAULT_METHOD,
    **certify_kwargs,
) -> np.ndarray:
    """Certified accuracy at each radius of a grid, from one certified-radius computation.

    The certified radius ``r_i`` of every sample is computed once, by bisection up to
    ``max_eps = max(eps_grid)``; the certified accuracy at ``eps > 0`` is then the fraction of
    samples with ``r_i >= eps``, and at ``eps == 0`` the clean accuracy.

    Parameters
    ----------
    model : torch.nn.Module or estimator
        Either a network accepted by :func:`certdistill.certification.certify.certified_radius`
        (then ``X`` must
        already have the shape the network expects and ``y`` hold class indices), or any object
        with a ``certified_radius(X, y=..., method=..., max_eps=..., **kwargs)`` method and a
        ``predict(X)`` method, such as a fitted ``CertifiedTeacher`` or ``DistilledStudent``
        (then ``X`` and ``y`` are what the object's ``predict`` and ``score`` accept).
    X : array-like or Tensor of shape (n_samples, ...)
        Inputs.
    y : array-like of shape (n_samples,)
        True labels.
    eps_grid : array-like of shape (n_eps,)
        Non-negative radii, in any order.
    method : str or sequence of str, default=("ibp", "crown-ibp", "crown")
        Bound method, or cascade of methods, of the certificates.
    **certify_kwargs
        Passed on to ``certified_radius``: for a network ``lower``, ``upper``, ``tol``,
        ``batch_size``, ``backend``; for an estimator whatever its method accepts (e.g. ``tol``).
        ``max_eps`` may be given to search further than ``max(eps_grid)``.

    Returns
    -------
    ndarray of shape (n_eps,)
        Certified accuracy (a fraction in [0, 1]) at each radius of ``eps_grid``.

    Raises
    ------
    ValueError
        For an empty or non-finite grid, a negative radius, a ``max_eps`` below the grid's
        largest radius, or labels whose length differs from the number of samples.
    TypeError
        If ``model`` is neither a ``torch.nn.Module`` nor has a ``certified_radius`` method.

    Notes
    -----
    The bisection returns, for each sample, a radius at which it *is* certified; the radius
    that the method could certify lies at most ``tol`` above it. Since a certificate at radius
    ``r`` holds for every smaller ball, ``r_i >= eps`` proves that sample ``i`` is robustly
    classified correctly at ``eps``: each value is a sound lower bound of the robust accuracy.
    It can differ from the fraction that :func:`certdistill.certification.certify.certify`
    certifies at
    exactly that ``eps``: it is lower by the samples whose radius lies less than ``tol`` above
    ``eps``, and since the bounds of the relaxation methods need not be monotone in ``eps``, a
    sample may rarely count as certified at ``eps`` although ``certify`` at ``eps`` fails (it is
    still proven robust there, by the certificate at its radius). Call ``certify`` at each
    radius where the per-eps fraction of one method must be reproduced exactly.

    At ``eps == 0`` the ball is the point itself, and a radius of 0 cannot tell a correct
    sample from a misclassified one, so the clean accuracy is reported there: the fraction of
    samples whose reference class strictly wins (network) or whose ``predict`` equals ``y``
    (estimator).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from torch import nn
    >>> from certdistill.plotting import certified_accuracy_curve
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> X, y = torch.rand(20, 4), np.zeros(20, dtype=int)
    >>> certified_accuracy_curve(net, X, y, [0.0, 0.01, 0.1], method="ibp").shape
    (3,)
    """
    from torch import nn

    eps = _checked_eps_grid(eps_grid)
    labels = _checked_labels(y, X)
    is_module = isinstance(model, nn.Module)
    if not is_module and not callable(getattr(model, "certified_radius", None)):
        raise TypeError(
            "model must be a torch.nn.Module or have a certified_radius(X, y=..., method=..., "
            f"max_eps=...) method (a fitted certdistill estimator); got {type(model).__name__}."
        )

    accuracy = np.empty_like(eps)
    at_zero = eps == 0
    if at_zero.any():
        accuracy[at_zero] = _clean_accuracy(model, X, labels, is_module, certify_kwargs)

    positive = ~at_zero
    if positive.any():
        max_eps = _radius_search_limit(certify_kwargs.pop("max_eps", None), float(eps.max()))
        radius = _certified_radii(model, X, labels, method, max_eps, is_module, certify_kwargs)
        accuracy[positive] = np.mean(radius[:, None] >= eps[positive][None, :], axis=0)
    return accuracy


def _checked_eps_grid(eps_grid) -> np.ndarray:
    """The grid as a finite, non-empty, non-negative 1-D array, or a ValueError."""
    eps = _as_1d(eps_grid, "eps_grid")
    if np.any(eps < 0):
        raise ValueError(f"eps_grid must be non-negative, got minimum {eps.min()!r}.")
    return eps


def _checked_labels(y, X) -> np.ndarray:
    """``y`` as a NumPy array of one label per sample of ``X``, or a ValueError."""
    labels = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y)
    if labels.ndim != 1 or labels.shape[0] != len(X):
        raise ValueError(
            f"y must have shape ({len(X)},) (one label per sample), got {labels.shape}."
        )
    return labels


def _clean_accuracy(
    model, X, labels: np.ndarray, is_module: bool, certify_kwargs: Mapping[str, Any]
) -> float:
    """The accuracy at eps 0: a strictly winning reference class, or ``predict`` equal to y."""
    if is_module:
        from certdistill.certification.certify import certify

        # certify accepts only some of certified_radius's options (no tol, no max_eps).
        kwargs = {k: v for k, v in certify_kwargs.items() if k in _CERTIFY_KWARGS}
        clean = certify(model, X, 0.0, method="ibp", y=labels, **kwargs).certified
    else:
        if not callable(getattr(model, "predict", None)):
            raise TypeError(
                "eps_grid contains 0 (clean accuracy), which needs model.predict; "
                f"{type(model).__name__} has none."
            )
        clean = np.asarray(model.predict(X)) == labels
    return float(np.mean(clean))


def _radius_search_limit(max_eps: float | None, largest: float) -> float:
    """The ``max_eps`` of the bisection: the given one, checked, or just above ``largest``."""
    if max_eps is None:
        # Representable in float32: a float32 network stores it exactly, so samples
        # certified at max_eps compare >= every radius of the grid.
        return _float32_ceiling(largest)
    if not max_eps >= largest:
        raise ValueError(
            f"max_eps={max_eps!r} is below the largest radius of eps_grid ({largest!r})."
        )
    return max_eps


def _certified_radii(
    model,
    X,
    labels: np.ndarray,
    method: str | Sequence[str],
    max_eps: float,
    is_module: bool,
    certify_kwargs: Mapping[str, Any],
) -> np.ndarray:
    """Every sample's certified radius, as a flat float64 array."""
    if is_module:
        from certdistill.certification.certify import certified_radius

        radius = certified_radius(
            model, X, method=method, y=labels, max_eps=max_eps, **certify_kwargs
        )
    else:
        radius = model.certified_radius(
            X, y=labels, method=method, max_eps=max_eps, **certify_kwargs
        )
    return np.asarray(radius, dtype=np.float64).reshape(-1)


def plot_certified_accuracy_curve(
    curves: Mapping[str, tuple[Any, Any]] | tuple[Any, Any],
    ax: Axes | None = None,
    *,
    title: str | None = "Certified accuracy",
    xlabel: str = r"$\epsilon$ ($L_\infty$ radius)",
    marker: str | None = "o",
    percent: bool = True,
    **plot_kwargs,
) -> Axes:
    """Plot certified accuracy versus eps for one or several models.

    Parameters
    ----------
    curves : mapping of str to (eps, accuracy), or one (eps, accuracy) pair
        For each model (the mapping's keys label the legend), the radii and the certified
        accuracy at each, as fractions in [0, 1]; e.g. the output of
        :func:`certified_accuracy_curve`. Curves may use different grids.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; by default a new headless :class:`~matplotlib.figure.Figure`.
    title : str or None, default="Certified accuracy"
        Title of the axes; ``None`` leaves it unchanged.
    xlabel : str, default=r"$\\epsilon$ ($L_\\infty$ radius)"
        Label of the x axis.
    marker : str or None, default="o"
        Marker of the data points.
    percent : bool, default=True
        Label the y axis in percent (the data stay fractions).
    **plot_kwargs
        Passed to :meth:`matplotlib.axes.Axes.plot` for every curve.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on; ``ax.figure.savefig(path)`` writes it.

    Raises
    ------
    ValueError
        For an empty mapping, a curve that is not an (eps, accuracy) pair, arrays of different
        lengths, non-finite values, negative radii or accuracies outside [0, 1].

    Examples
    --------
    >>> from certdistill.plotting import plot_certified_accuracy_curve
    >>> ax = plot_certified_accuracy_curve(
    ...     {"teacher": ([0, 0.1, 0.2], [0.95, 0.8, 0.5]),
    ...      "student": ([0, 0.1, 0.2], [0.93, 0.7, 0.3])})
    >>> ax.figure.savefig("certified_accuracy.png")  # doctest: +SKIP
    """
    matplotlib, _ = _import_matplotlib()
    series = _named_series(curves, "curves")
    checked = {}
    for name, curve in series.items():
        label = f"curve {name!r}" if name else "curve"
        if not (isinstance(curve, Sequence | np.ndarray) and len(curve) == 2):
            raise ValueError(
                f"{label} must be a pair (eps, accuracy) of arrays, got {type(curve).__name__}."
            )
        eps, accuracy = (
            _as_1d(curve[0], f"eps of {label}"),
            _as_1d(curve[1], f"accuracy of {label}"),
        )
        if eps.shape != accuracy.shape:
            raise ValueError(
                f"{label}: eps has {eps.size} values but accuracy has {accuracy.size}."
            )
        if np.any(eps < 0):
            raise ValueError(f"{label}: eps must be non-negative.")
        if np.any((accuracy < 0) | (accuracy > 1)):
            raise ValueError(f"{label}: accuracy must be a fraction in [0, 1] (not a percentage).")
        order = np.argsort(eps, kind="stable")
        checked[name] = (eps[order], accuracy[order])

    ax = _new_axes(ax)
    for name, (eps, accuracy) in checked.items():
        ax.plot(eps, accuracy, marker=marker, label=name or None, **plot_kwargs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    if percent:
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(xmax=1.0))
    ax.grid(True, alpha=0.3)
    if any(checked):
        ax.legend()
    if title is not None:
        ax.set_title(title)
    return ax


# ------------------------------------------------------------------------- radius histogram
def pareto_front(points) -> np.ndarray:
    """Indices of the points no other point beats in both coordinates, by the first coordinate.

    Parameters
    ----------
    points : array-like of shape (n, 2)
        E.g. (clean accuracy, certified accuracy) of each configuration; larger is better in
        both.

    Returns
    -------
    ndarray of int
        The non-dominated points, sorted by increasing first coordinate.
    """
    values = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(values)):
        raise ValueError("points must be finite.")
    keep = []
    for i, (a, b) in enumerate(values):
        others = np.delete(values, i, axis=0)
        dominated = np.any(
            (others[:, 0] >= a) & (others[:, 1] >= b) & ((others[:, 0] > a) | (others[:, 1] > b))
        )
        if not dominated:
            keep.append(i)
    keep = np.asarray(keep, dtype=int)
    return keep[np.argsort(values[keep, 0], kind="stable")]


def plot_pareto_fronts(
    groups: Mapping[str, Any],
    ax: Axes | None = None,
    *,
    title: str | None = "Clean versus certified accuracy",
    xlabel: str = "clean accuracy",
    ylabel: str = "certified accuracy",
    percent: bool = True,
) -> Axes:
    """Scatter each group's points and draw its Pareto front (the non-dominated ones).

    Parameters
    ----------
    groups : mapping of str to array-like of shape (n, 2)
        For each group (e.g. "alone", "distilled"), the (x, y) of its configurations, fractions
        in [0, 1] when ``percent``; larger is better on both axes.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; by default a new headless figure.
    title, xlabel, ylabel : str
        Labels.
    percent : bool, default=True
        Label the axes in percent (the data stay fractions).

    Returns
    -------
    matplotlib.axes.Axes
    """
    matplotlib, _ = _import_matplotlib()
    series = _named_series(groups, "groups")
    ax = _new_axes(ax)
    for (name, points), color in zip(
        series.items(), matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] * 4, strict=False
    ):
        values = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        front = values[pareto_front(values)]
        ax.scatter(values[:, 0], values[:, 1], color=color, alpha=0.35, s=18)
        ax.plot(front[:, 0], front[:, 1], marker="o", color=color, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    if percent:
        from matplotlib.ticker import PercentFormatter

        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend()
    ax.grid(True, alpha=0.3)
    return ax


def plot_radius_histogram(
    radii: Mapping[str, Any] | Any,
    ax: Axes | None = None,
    *,
    bins: int | Sequence[float] | str = 20,
    title: str | None = "Certified radius",
    xlabel: str = r"certified $L_\infty$ radius",
    density: bool = False,
    **hist_kwargs,
) -> Axes:
    """Histogram of per-sample certified radii, overlaid for several models.

    Parameters
    ----------
    radii : mapping of str to array-like, or array-like
        Certified radius of each sample (e.g. from
        :func:`certdistill.certification.certify.certified_radius`
        or an estimator's ``certified_radius``), per model; the keys label the legend. A radius
        of 0 means not certified at any positive radius (or misclassified when labels were
        given).
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; by default a new headless :class:`~matplotlib.figure.Figure`.
    bins : int, sequence of float or str, default=20
        As in :func:`numpy.histogram_bin_edges`; the edges are computed once from all models'
        radii together, so the bars line up.
    title : str or None, default="Certified radius"
        Title of the axes; ``None`` leaves it unchanged.
    xlabel : str, default=r"certified $L_\\infty$ radius"
        Label of the x axis.
    density : bool, default=False
        Plot fractions of each model's samples instead of counts (for models evaluated on
        different numbers of samples).
    **hist_kwargs
        Passed to :meth:`matplotlib.axes.Axes.hist` for every model.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.

    Raises
    ------
    ValueError
        For an empty mapping or array, non-finite or negative radii, or radii that are not
        one-dimensional.

    Examples
    --------
    >>> import numpy as np
    >>> from certdistill.plotting import plot_radius_histogram
    >>> rng = np.random.default_rng(0)
    >>> ax = plot_radius_histogram({"teacher": rng.uniform(0, 0.2, 100),
    ...                             "student": rng.uniform(0, 0.1, 100)})
    """
    _import_matplotlib()
    series = _named_series(radii, "radii")
    checked = {}
    for name, values in series.items():
        label = f"radii of {name!r}" if name else "radii"
        array = _as_1d(values, label)
        if np.any(array < 0):
            raise ValueError(f"{label} must be non-negative.")
        checked[name] = array
    edges = np.histogram_bin_edges(np.concatenate(list(checked.values())), bins=bins)

    ax = _new_axes(ax)
    several = len(checked) > 1
    for name, array in checked.items():
        weights = np.full(array.shape, 1.0 / array.size) if density else None
        options = {
            "histtype": "stepfilled",
            "alpha": 0.45 if several else 0.8,
            "edgecolor": "black",
            "linewidth": 0.8,
        }
        options.update(hist_kwargs)
        ax.hist(array, bins=edges, weights=weights, label=name or None, **options)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples" if density else "samples")
    ax.grid(True, alpha=0.3)
    if any(checked):
        ax.legend()
    if title is not None:
        ax.set_title(title)
    return ax


# -------------------------------------------------------------------------- training schedule
def _history_rows(history) -> list[Mapping]:
    """The per-epoch rows of a skorch History, a list of dicts, or an estimator's history."""
    if not isinstance(history, Sequence) and hasattr(history, "history"):
        history = history.history  # a fitted skorch net
    if isinstance(history, str | bytes) or not isinstance(history, Iterable):
        raise TypeError(
            "history must be a skorch History, a list of per-epoch dicts or a fitted skorch "
            f"net, got {type(history).__name__}."
        )
    rows = list(history)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"history must hold one dict per epoch; entry {index} is {type(row).__name__}."
            )
    if not rows:
        raise ValueError("history is empty: nothing to plot (was the net fitted?).")
    return rows


def _as_float(value) -> float:
    """A recorded value as a float; NaN for missing or non-numeric values."""
    if value is None or isinstance(value, str | bytes):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot_training_schedule(
    history,
    keys: Sequence[str] = SCHEDULE_KEYS,
    ax: Axes | None = None,
    *,
    per_batch: bool = False,
    title: str | None = "Training schedule",
) -> dict[str, Axes]:
    """Plot the scheduled values of a training run (eps ramp, kappa, beta, alpha, learning rate).

    Parameters
    ----------
    history : skorch.history.History, list of dict, or fitted skorch net
        One dict per epoch, as in ``net.history``; a net with a ``history`` attribute is read
        through it.
    keys : sequence of str, default=("eps", "kappa", "beta", "alpha", "lr")
        History keys to plot. Keys recorded in no epoch are skipped; epochs that lack a key
        leave a gap in its line.
    ax : matplotlib.axes.Axes, optional
        Draw every key on this one axes (a legend tells them apart). By default a new headless
        :class:`~matplotlib.figure.Figure` with one panel per key found, sharing the epoch axis,
        so that values of different scales (``lr`` and ``kappa``) stay readable.
    per_batch : bool, default=False
        Plot the per-batch values recorded under ``history[epoch]["batches"]`` (x in fractional
        epochs) instead of one value per epoch. Epochs without per-batch values fall back to
        their per-epoch value.
    title : str or None, default="Training schedule"
        Title of the figure (of ``ax`` when given); ``None`` sets none.

    Returns
    -------
    dict of str to matplotlib.axes.Axes
        The axes each found key was drawn on, in the order of ``keys`` (all the same axes when
        ``ax`` is given); ``next(iter(result.values())).figure`` is the figure.

    Raises
    ------
    TypeError
        If ``history`` is not a sequence of per-epoch dicts, or ``keys`` is a single string.
    ValueError
        If the history is empty or none of ``keys`` was recorded in it.

    Examples
    --------
    >>> from certdistill.plotting import plot_training_schedule
    >>> history = [{"epoch": e, "eps": min(1, e / 5) * 0.1, "kappa": 1 - 0.05 * e}
    ...            for e in range(1, 11)]
    >>> sorted(plot_training_schedule(history))
    ['eps', 'kappa']
    """
    # Fail with the install hint before any argument is checked.
    _import_matplotlib()
    if isinstance(keys, str):
        raise TypeError(f"keys must be a sequence of history keys, not the string {keys!r}.")
    rows = _history_rows(history)
    series = _schedule_series(rows, keys, per_batch)
    marker = None if per_batch or len(rows) > 30 else "."
    if ax is not None:
        return _plot_schedule_on_axes(_new_axes(ax), series, marker, title)
    return _plot_schedule_panels(series, marker, title)


def _epoch_numbers(rows: Sequence[Mapping]) -> np.ndarray:
    """Each row's recorded epoch, or its 1-based position where none is recorded."""
    epochs = np.array([_as_float(row.get("epoch", index + 1)) for index, row in enumerate(rows)])
    return np.where(np.isfinite(epochs), epochs, np.arange(1, len(rows) + 1))


def _key_points(
    rows: Sequence[Mapping], epochs: np.ndarray, key: str, per_batch: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) points of ``key``: per batch where asked and recorded, else per epoch."""
    xs: list[float] = []
    ys: list[float] = []
    for epoch, row in zip(epochs, rows, strict=True):
        batches = row.get("batches") if per_batch else None
        batch_values = (
            [_as_float(b.get(key)) if isinstance(b, Mapping) else math.nan for b in batches]
            if isinstance(batches, Sequence) and batches
            else []
        )
        if any(np.isfinite(batch_values)):
            count = len(batch_values)
            xs.extend(epoch - 1 + (np.arange(count) + 1) / count)
            ys.extend(batch_values)
        else:
            xs.append(float(epoch))
            ys.append(_as_float(row.get(key)))
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def _schedule_series(
    rows: Sequence[Mapping], keys: Sequence[str], per_batch: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The points of each of ``keys`` recorded at least once, in order; a ValueError if none."""
    epochs = _epoch_numbers(rows)
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in dict.fromkeys(keys):
        x, y = _key_points(rows, epochs, key, per_batch)
        if np.isfinite(y).any():
            series[key] = (x, y)
    if not series:
        recorded = sorted({k for row in rows for k in row if k != "batches"})
        raise ValueError(
            f"None of the keys {list(keys)} was recorded in the history; it has {recorded}."
        )
    return series


def _label_epoch_axis(ax: Axes) -> None:
    """Label the x axis as epochs, with integer ticks only."""
    matplotlib, _ = _import_matplotlib()
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _plot_schedule_on_axes(
    ax: Axes,
    series: Mapping[str, tuple[np.ndarray, np.ndarray]],
    marker: str | None,
    title: str | None,
) -> dict[str, Axes]:
    """Draw every series on ``ax``, told apart by a legend."""
    axes: dict[str, Axes] = {}
    for key, (x, y) in series.items():
        ax.plot(x, y, marker=marker, label=key)
        axes[key] = ax
    _label_epoch_axis(ax)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title is not None:
        ax.set_title(title)
    return axes


def _plot_schedule_panels(
    series: Mapping[str, tuple[np.ndarray, np.ndarray]],
    marker: str | None,
    title: str | None,
) -> dict[str, Axes]:
    """Draw each series on its own panel of a new headless Figure, sharing the epoch axis."""
    _, Figure = _import_matplotlib()
    figure = Figure(figsize=(5.0, 1.2 + 1.3 * len(series)), layout="constrained")
    panels = figure.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{i}" for i in range(len(series))]
    axes: dict[str, Axes] = {}
    for panel, color, (key, (x, y)) in zip(panels, colors, series.items(), strict=True):
        panel.plot(x, y, marker=marker, color=color)
        panel.set_ylabel(key)
        panel.grid(True, alpha=0.3)
        # A learning rate that decays by orders of magnitude flattens to zero on a linear axis.
        if key == "lr" and np.all(y[np.isfinite(y)] > 0):
            finite = y[np.isfinite(y)]
            if finite.max() / finite.min() > 50:
                panel.set_yscale("log")
        axes[key] = panel
    _label_epoch_axis(panels[-1])
    if title is not None:
        figure.suptitle(title)
    return axes
