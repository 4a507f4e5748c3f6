"""Generate the figures of the documentation into ``docs/img/``.

Run from the repository root (about half a minute on one CPU core)::

    python docs/make_figures.py

Every figure is computed here from small networks trained on the spot, with fixed seeds, so the
pictures follow the code: re-run the script after a change to the bound engine or the plots.
Needs matplotlib (``pip install certdistill[plot]``) and scikit-learn's bundled data only.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from certdistill.bounds import margin_lower_bounds
from certdistill.plotting import (
    certified_accuracy_curve,
    plot_certified_accuracy_curve,
    plot_radius_histogram,
    plot_training_schedule,
)

OUT = Path(__file__).resolve().parent / "img"
DPI = 110
METHOD_STYLE = {  # method -> (label, colour)
    "ibp": ("IBP", "C3"),
    "crown-ibp": ("CROWN-IBP", "C1"),
    "crown": ("CROWN", "C0"),
    "alpha-crown": (r"$\alpha$-CROWN", "C2"),
}


def _save(figure: Figure, name: str) -> None:
    from PIL import Image  # a dependency of matplotlib

    path = OUT / name
    figure.savefig(path, dpi=DPI)
    # Plots use few colours: a 256-colour palette keeps them sharp at a third of the size.
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    print(f"wrote {path.relative_to(OUT.parent.parent)} ({path.stat().st_size // 1024} KiB)")


# ------------------------------------------------------------------------- 2-D toy network
def _toy_network() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """A 2-32-32-2 ReLU network fitted (plainly, not certifiably) to the two-moons data."""
    from sklearn.datasets import make_moons

    X, y = make_moons(n_samples=300, noise=0.15, random_state=0)
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    X_t, y_t = torch.as_tensor(X), torch.as_tensor(y)
    for _ in range(400):
        loss = nn.functional.cross_entropy(net(X_t), y_t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval(), X, y


def _grid_minimum(net: nn.Module, x0: np.ndarray, eps: float, ref: int, n: int = 121) -> float:
    """Smallest margin ``z_ref - z_other`` on a dense grid of the box (near the true minimum)."""
    axis = np.linspace(-eps, eps, n, dtype=np.float32)
    points = x0 + np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    with torch.no_grad():
        z = net(torch.as_tensor(points))
    return float((z[:, ref] - z[:, 1 - ref]).min())


def _bound(net: nn.Module, x0: np.ndarray, eps: float, ref: int, method: str) -> float:
    with torch.no_grad():
        margins = margin_lower_bounds(
            net, torch.as_tensor(x0[None]), eps, torch.tensor([ref]), method=method
        )
    return float(margins[0, 1 - ref])


def _crossing(eps_grid: np.ndarray, values: np.ndarray) -> float:
    """Largest eps of the grid before the curve first drops to zero or below."""
    below = np.nonzero(values <= 0)[0]
    return float(eps_grid[below[0] - 1]) if below.size and below[0] > 0 else float(eps_grid[-1])


def figure_toy_bounds() -> None:
    net, X, y = _toy_network()
    x0 = np.array([-0.6, 0.1], dtype=np.float32)
    with torch.no_grad():
        ref = int(net(torch.as_tensor(x0[None])).argmax())
    eps_grid = np.linspace(0.0, 0.6, 61)
    exact = np.array([_grid_minimum(net, x0, e, ref) for e in eps_grid])
    bounds = {m: np.array([_bound(net, x0, e, ref, m) for e in eps_grid]) for m in METHOD_STYLE}
    radii = {m: _crossing(eps_grid, v) for m, v in bounds.items()}
    true_radius = _crossing(eps_grid, exact)

    figure = Figure(figsize=(10.0, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=(1.0, 1.25))

    # Input space: decision regions, the sample, boxes at the radius each method certifies.
    span = np.linspace(-2.2, 2.2, 300, dtype=np.float32)
    grid = np.stack(np.meshgrid(span, span), -1).reshape(-1, 2)
    with torch.no_grad():
        z = net(torch.as_tensor(grid))
    margin = (z[:, 0] - z[:, 1]).numpy().reshape(len(span), len(span))
    left.contourf(span, span, margin > 0, levels=[-0.5, 0.5, 1.5], colors=["#cfe0f3", "#f7d9c4"])
    left.contour(span, span, margin, levels=[0], colors="black", linewidths=1.2)
    left.scatter(X[:, 0], X[:, 1], c=np.where(y == 0, "#c0504d", "#1f5fa8"), s=6, alpha=0.5)
    boxes = [
        ("ibp", radii["ibp"]),
        ("crown", radii["crown"]),
        ("true", true_radius),
        ("attack", true_radius + 0.1),
    ]
    for key, eps in boxes:
        if key == "true":
            label, color, style = f"exact radius {eps:.2f}", "black", ":"
        elif key == "attack":
            label, color, style = f"eps = {eps:.2f}: crosses the boundary", "purple", "--"
        else:
            name, color = METHOD_STYLE[key]
            label, style = f"{name} certifies eps = {eps:.2f}", "-"
        left.add_patch(
            Rectangle(
                x0 - eps,
                2 * eps,
                2 * eps,
                fill=False,
                edgecolor=color,
                linestyle=style,
                linewidth=1.8,
                label=label,
            )
        )
    left.plot(*x0, marker="*", color="gold", markeredgecolor="black", markersize=14)
    left.set_xlim(x0[0] - 0.9, x0[0] + 0.9)
    left.set_ylim(x0[1] - 0.9, x0[1] + 0.9)
    left.set_aspect("equal")
    left.set_xlabel("$x_1$")
    left.set_ylabel("$x_2$")
    left.set_title(r"$L_\infty$ balls (boxes) around one input")
    left.legend(loc="lower left", fontsize=7.5, framealpha=0.9)

    # Bounds of the margin as eps grows.
    right.plot(eps_grid, exact, color="black", linewidth=2.2, label="true minimum (dense grid)")
    for method, values in bounds.items():
        name, color = METHOD_STYLE[method]
        right.plot(
            eps_grid,
            values,
            color=color,
            linewidth=1.6,
            linestyle="--" if method == "alpha-crown" else "-",
            label=f"{name} lower bound (radius {radii[method]:.2f})",
        )
    right.axhline(0.0, color="grey", linewidth=1)
    right.set_ylim(-1.5 * exact[0], 1.15 * exact[0])
    right.set_xlim(0, eps_grid[-1])
    right.set_xlabel(r"$\epsilon$ ($L_\infty$ radius)")
    right.set_ylabel(r"margin $z_{y} - z_{other}$ over the ball")
    right.set_title("Certified where the lower bound stays above 0")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7.5, loc="lower left")
    _save(figure, "toy_bounds.png")


def figure_relu_relaxation() -> None:
    lower, upper = -1.0, 2.0
    z = np.linspace(lower, upper, 200)
    relu = np.maximum(z, 0)
    chord = upper / (upper - lower) * (z - lower)
    figure = Figure(figsize=(8.0, 3.2), layout="constrained")
    ibp, crown = figure.subplots(1, 2, sharey=True)
    for ax in (ibp, crown):
        ax.plot(z, relu, color="black", linewidth=2.2, label="ReLU(z)")
        ax.axvline(lower, color="grey", linestyle=":")
        ax.axvline(upper, color="grey", linestyle=":")
        ax.set_xlabel("pre-activation $z$ in $[l, u] = [-1, 2]$")
        ax.grid(True, alpha=0.3)
    ibp.fill_between(z, 0.0, upper, color="C3", alpha=0.25, label="IBP: $[0, u]$ for any $z$")
    ibp.set_title("IBP: an interval, the input is forgotten")
    crown.fill_between(
        z,
        z * (upper > -lower),
        chord,
        color="C0",
        alpha=0.25,
        label=r"CROWN: $\alpha z \leq$ ReLU$(z) \leq \frac{u\,(z-l)}{u-l}$"
        "\n"
        r"(adaptive $\alpha = 1$ as $u > -l$)",
    )
    crown.plot(z, chord, color="C0", linewidth=1.2)
    crown.plot(z, z * (upper > -lower), color="C0", linewidth=1.2, linestyle="--")
    crown.set_title("CROWN: two lines that keep the link to $z$")
    ibp.set_ylabel("output")
    for ax in (ibp, crown):
        ax.legend(loc="upper left", fontsize=8)
        ax.set_ylim(-1.1, 2.6)
    _save(figure, "relu_relaxation.png")


# --------------------------------------------------------------- digits: plain versus IBP
def _train_digits(X, y, eps_train: float, epochs: int, seed: int = 0):
    """A 64-64-10 MLP: plain (``eps_train=0``) or IBP-trained with an eps ramp.

    Returns the network and a history of one dict per epoch, as skorch records it.
    """
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    X_t, y_t = torch.as_tensor(X), torch.as_tensor(y)
    history = []
    for epoch in range(1, epochs + 1):
        ramp = min(1.0, (epoch - 1) / (epochs // 2))
        eps, kappa = eps_train * ramp, 1.0 - 0.5 * ramp
        losses = []
        for batch in torch.randperm(len(X_t)).split(64):
            x, target = X_t[batch], y_t[batch]
            loss = nn.functional.cross_entropy(net(x), target)
            if eps_train > 0:
                margins = margin_lower_bounds(
                    net, x, eps, target, method="ibp", lower=0.0, upper=1.0
                )
                worst = -margins.masked_fill(torch.isinf(margins), 0.0)
                loss = kappa * loss + (1 - kappa) * nn.functional.cross_entropy(worst, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "lr": optimizer.param_groups[0]["lr"],
                **({"eps": eps, "kappa": kappa} if eps_train > 0 else {}),
            }
        )
        scheduler.step()
    return net.eval(), history


def figures_digits() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X = (data.data / 16.0).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(
        X, data.target, test_size=0.3, stratify=data.target, random_state=0
    )
    X_test, y_test = X_test[:300], y_test[:300]
    plain, _ = _train_digits(X_train, y_train, eps_train=0.0, epochs=20)
    certified, history = _train_digits(X_train, y_train, eps_train=0.1, epochs=20)

    eps_grid = np.linspace(0.0, 0.12, 13)
    curves, radii = {}, {}
    for name, net in (("plain training", plain), ("IBP training", certified)):
        for method in ("ibp", "crown"):
            accuracy = certified_accuracy_curve(
                net, X_test, y_test, eps_grid, method=method, lower=0.0, upper=1.0
            )
            curves[f"{name}, {method.upper()} certificate"] = (eps_grid, accuracy)
        from certdistill import certified_radius

        radii[name] = certified_radius(
            net, X_test, y=y_test, method="crown", lower=0.0, upper=1.0, max_eps=0.2
        )

    ax = plot_certified_accuracy_curve(curves, title="Digits, MLP 64-64-10 (300 test samples)")
    ax.figure.set_size_inches(6.0, 3.8)
    ax.legend(fontsize=8)
    _save(ax.figure, "certified_accuracy.png")

    ax = plot_radius_histogram(radii, bins=20, title="CROWN certified radius per test sample")
    ax.figure.set_size_inches(6.0, 3.4)
    _save(ax.figure, "radius_histogram.png")

    axes = plot_training_schedule(
        history,
        keys=("eps", "kappa", "lr", "train_loss"),
        title="IBP training run: recorded schedule",
    )
    _save(next(iter(axes.values())).figure, "training_schedule.png")


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    figure_relu_relaxation()
    figure_toy_bounds()
    figures_digits()
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
