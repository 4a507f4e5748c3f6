"""beta-CROWN bounds of subdomains with different numbers of open classes (branch and bound
bounds them in one batch, padding the shorter lists of classes)."""

import torch
from torch import nn

from certdistill.bounds import Perturbation, engine_for


def _subdomains(n: int = 2):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6)
    ).eval()
    engine = engine_for(module)
    x = torch.rand(n, 8)
    perturbation = Perturbation.create(0.3, (8,), lower=0.0, upper=1.0)
    center, radius = perturbation.box(x)
    interval = dict(
        zip(
            engine._activation_indices,
            engine.activation_interval_bounds(x, perturbation),
            strict=True,
        )
    )
    with torch.no_grad():
        reference = module(x).argmax(1)
    root = engine.bound_subdomains(center, radius, interval, reference)
    splits = {k: torch.zeros_like(lower, dtype=torch.int8) for k, (lower, _) in root.bounds.items()}
    return module, engine, x, center, radius, root.bounds, splits, reference


def test_padded_classes_keep_their_bounds():
    module, engine, x, center, radius, bounds, splits, reference = _subdomains()
    # Subdomain 0 has every class open; subdomain 1 only two, so its list is padded.
    closed = torch.zeros(2, 6, dtype=torch.bool)
    open_1 = [c for c in range(6) if c != int(reference[1])][:2]
    closed[1] = True
    closed[1, open_1] = False
    closed[1, reference[1]] = False
    together = engine.bound_split_subdomains(
        center, radius, bounds, splits, reference, closed=closed, steps=0
    )

    def alone(row: int):
        pick = slice(row, row + 1)
        return engine.bound_split_subdomains(
            center[pick],
            radius[pick],
            {k: (lo[pick], up[pick]) for k, (lo, up) in bounds.items()},
            {k: v[pick] for k, v in splits.items()},
            reference[pick],
            closed=closed[pick],
            steps=0,
        ).margins[0]

    for row in range(2):
        torch.testing.assert_close(together.margins[row], alone(row))
    assert torch.isfinite(together.margins[1, open_1]).all()
    # And the bounds hold at sampled points of the box.
    with torch.no_grad():
        points = center[1] + (torch.rand(2000, 8) * 2 - 1) * radius[1]
        logits = module(points)
        margins = logits[:, reference[1] : reference[1] + 1] - logits
    assert (margins[:, open_1] >= together.margins[1, open_1] - 1e-5).all()
