"""Tests of the PGD attacks in certdistill.verify.attacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from networks import make_cnn, make_mlp
from torch import nn

from certdistill.verify.attacks import min_margin_attack, pgd_attack


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    return true - logits.scatter(1, y[:, None], float("-inf")).max(1).values


@pytest.fixture(scope="module")
def trained():
    """A plainly (non-robustly) trained MLP on two Gaussian blobs in 10 dimensions."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n, d = 512, 10
    y = torch.randint(0, 2, (n,), generator=gen)
    direction = torch.randn(d, generator=gen)
    direction /= direction.norm()
    x = torch.randn(n, d, generator=gen) * 0.6 + (2.0 * y[:, None] - 1.0) * direction
    net = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.zero_grad(set_to_none=True)
    net.eval()
    with torch.no_grad():
        correct = net(x).argmax(1) == y
    return net, x[correct][:200], y[correct][:200]


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_breaks_a_plainly_trained_net(trained, loss):
    net, x, y = trained
    eps = 0.3
    x_adv = pgd_attack(
        net, x, y, eps, steps=20, loss=loss, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        clean_acc = (net(x).argmax(1) == y).float().mean().item()
        adv_acc = (net(x_adv).argmax(1) == y).float().mean().item()
        noise = x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) - 1)
        noise_acc = (net(noise).argmax(1) == y).float().mean().item()
    assert clean_acc == 1.0  # the fixture keeps only correctly classified points
    assert adv_acc < 0.8, adv_acc
    # A gradient attack must do much better than random noise of the same size.
    assert adv_acc < noise_acc - 0.1, (adv_acc, noise_acc)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6


def test_pgd_matches_the_closed_form_on_a_linear_model():
    # For a 2-class linear model the worst point is the corner x - eps * sign(w_y - w_other).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 2)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    eps = 0.1
    x_adv = pgd_attack(net, x, y, eps, steps=5, loss="margin", random_start=False)
    w = net[0].weight.detach()
    diff = w[y] - w[1 - y]
    with torch.no_grad():
        expected = _margins(net(x), y) - eps * diff.abs().sum(1)
        got = _margins(net(x_adv), y)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_stays_in_a_per_feature_ball(loss):
    net = make_cnn((2, 5, 5), (3,), 3, seed=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 5, 5, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    eps = torch.tensor([0.05, 0.2]).view(2, 1, 1)  # one radius per channel
    x_adv = pgd_attack(net, x, y, eps, steps=7, restarts=2, loss=loss, generator=gen)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    dev = (x_adv - x).abs()
    assert (dev <= eps + 1e-6).all()
    assert (dev[:, 1] > 0.1).any()  # the larger radius is actually used


def test_pgd_respects_the_domain():
    net = make_mlp(5, [8], 3, seed=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20, 5, generator=gen)
    x[:, 0] = 0.0  # on the boundary of the domain
    y = torch.randint(0, 3, (20,), generator=gen)
    x_adv = pgd_attack(net, x, y, 0.3, steps=10, lower=0.0, upper=1.0, generator=gen)
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert (x_adv - x).abs().max().item() <= 0.3 + 1e-6
    upper = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0])
    x2 = torch.clamp(x, max=upper)
    x_adv = pgd_attack(net, x2, y, 0.3, steps=10, lower=0.0, upper=upper, generator=gen)
    assert (x_adv <= upper).all() and (x_adv >= 0).all()


def test_pgd_rejects_points_outside_the_domain_and_bad_arguments():
    net = make_mlp(3, [4], 2)
    x, y = torch.full((2, 3), 2.0), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="domain"):
        pgd_attack(net, x, y, 0.1, lower=0.0, upper=1.0)
    with pytest.raises(ValueError, match="loss"):
        pgd_attack(net, x, y, 0.1, loss="hinge")
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(net, x, y, -0.1)
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(net, x, y, float("nan"))


@pytest.mark.parametrize("mode", ["eval", "current"])
def test_pgd_keeps_modes_buffers_and_grads(mode):
    net = make_cnn((2, 5, 5), (3,), 3, seed=4, dropout=True, nested=True)
    net.train()
    net[-1].eval()  # a mixed state must come back exactly as it was
    modes = {name: m.training for name, m in net.named_modules()}
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 5, 5, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    pgd_attack(net, x, y, 0.1, steps=3, restarts=2, mode=mode, generator=gen)
    assert {name: m.training for name, m in net.named_modules()} == modes
    for name, b in net.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=0, atol=0)
    assert all(p.grad is None for p in net.parameters())


def test_pgd_eval_mode_ignores_dropout_and_batch_statistics():
    net = make_mlp(4, [6], 3, seed=2, batchnorm=True, dropout=True)
    net.train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)
    a = pgd_attack(net, x, y, 0.2, steps=5, generator=torch.Generator().manual_seed(7))
    b = pgd_attack(net, x, y, 0.2, steps=5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    d = pgd_attack(net.eval(), x, y, 0.2, steps=5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, d, rtol=0, atol=0)
    net.train()
    # Eval mode attacks each sample alone: from the clean points (no random start, which would
    # draw per batch), attacking a subset gives the same points as attacking the whole batch.
    full = pgd_attack(net, x, y, 0.2, steps=5, random_start=False)
    subset = pgd_attack(net, x[:2], y[:2], 0.2, steps=5, random_start=False)
    torch.testing.assert_close(subset, full[:2], rtol=0, atol=0)
    # What any attack must give: points of the ball, no better for the classifier than the clean
    # point (an iterate of the walk), here strictly worse (the gradient is not zero).
    assert (full - x).abs().max() <= 0.2 + 1e-6
    with torch.no_grad():
        clean_loss = nn.functional.cross_entropy(net.eval()(x), y, reduction="none")
        attacked_loss = nn.functional.cross_entropy(net(full), y, reduction="none")
    assert torch.all(attacked_loss > clean_loss)


def test_pgd_more_restarts_never_hurt(trained):
    net, x, y = trained
    kwargs = dict(steps=5, loss="margin")
    one = pgd_attack(
        net, x, y, 0.2, restarts=1, generator=torch.Generator().manual_seed(3), **kwargs
    )
    many = pgd_attack(
        net, x, y, 0.2, restarts=4, generator=torch.Generator().manual_seed(3), **kwargs
    )
    with torch.no_grad():
        assert (_margins(net(many), y) <= _margins(net(one), y) + 1e-6).all()


def test_pgd_zero_eps_numpy_input_and_no_grad_context(trained):
    net, x, y = trained
    with torch.no_grad():
        x_adv = pgd_attack(net, x.numpy(), y.numpy(), 0.0, steps=3)
    torch.testing.assert_close(x_adv, x, rtol=0, atol=0)
    with torch.no_grad():
        x_adv = pgd_attack(net, x[:4].requires_grad_(True), y[:4], 0.1, steps=3)
    assert not x_adv.requires_grad and (x_adv - x[:4]).abs().max() > 0


def test_pgd_restores_modes_on_error():
    net = make_mlp(3, [4], 2, batchnorm=True).train()

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    net.append(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        pgd_attack(net, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0.1)
    assert all(m.training for m in net.modules())


def test_min_margin_attack_linear_closed_form():
    # For a linear model min_{ball} z_ref - z_j = m_j(x) - eps * ||w_ref - w_j||_1 exactly.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    ref = torch.randint(0, 4, (6,))
    eps = torch.tensor([0.1, 0.0, 0.3, 0.05, 0.2], dtype=torch.float64)
    got = min_margin_attack(net, x, ref, eps, steps=3, restarts=1)
    w = net[0].weight.detach()
    with torch.no_grad():
        z = net(x)
    expected = z.gather(1, ref[:, None]) - z - ((w[ref][:, None, :] - w[None]).abs() * eps).sum(2)
    expected[torch.arange(6), ref] = float("inf")
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_min_margin_attack_is_an_upper_bound_on_clean_margins():
    net = make_cnn((1, 4, 4), (2,), 4, seed=5, dropout=True).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 1, 4, 4, generator=gen).clamp(min=-1.0)
    ref = torch.randint(0, 4, (7,), generator=gen)
    got = min_margin_attack(net, x, ref, 0.1, steps=10, restarts=3, lower=-1.0, generator=gen)
    assert got.shape == (7, 4)
    assert torch.isinf(got[torch.arange(7), ref]).all()
    assert all(m.training for m in net.modules())  # mode restored
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        z = net.eval()(x)
    clean = z.gather(1, ref[:, None]) - z
    clean[torch.arange(7), ref] = float("inf")
    # The first restart starts at x and every iterate counts, so never worse than clean.
    assert (got <= clean).all()


def test_min_margin_attack_finds_lower_margins_than_sampling():
    net = make_mlp(4, [16, 16], 3, seed=6, weight_scale=2.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=gen)
    with torch.no_grad():
        ref = net(x).argmax(1)
    eps = 0.3
    got = min_margin_attack(net, x, ref, eps, generator=gen)
    samples = x[None] + eps * (2 * torch.rand((500, *x.shape), generator=gen) - 1)
    with torch.no_grad():
        z = net(samples.reshape(-1, 4)).reshape(500, 10, 3)
    sampled = (z.gather(2, ref[None, :, None].expand(500, 10, 1)) - z).min(0).values
    sampled[torch.arange(10), ref] = float("inf")
    finite = torch.isfinite(got)
    assert (got[finite] <= sampled[finite] + 1e-5).all()
    assert np.isfinite(got.numpy()).sum() == 20
