"""Streaming certification: memory-mapped arrays and iterables of batches certify chunk by chunk
into one Certificate equal to the in-memory one."""

from __future__ import annotations

import doctest
import time

import numpy as np
import pytest
import torch
from digits import small_digits
from networks import make_mlp
from torch.utils.data import DataLoader, TensorDataset

import certdistill.certification.sparse_rows
from certdistill import CertifiedTeacher, certify
from certdistill.certification.sparse_rows import SparseRows
from certdistill.certification.streaming import is_streamed

EPS = 0.03
FIELDS = ("prediction", "margins", "certified", "status", "decided_by")


def _digits_net():
    """A tiny MLP on digits-sized rows (64 features, 10 classes)."""
    return make_mlp(64, [16], 10, seed=0)


def _memmap(path, n: int, seed: int = 0) -> np.memmap:
    """``n`` digits-sized rows in [0, 1], written chunk by chunk and opened read-only."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 64))
    for start in range(0, n, 50_000):
        stop = min(n, start + 50_000)
        out[start:stop] = rng.random((stop - start, 64), dtype=np.float32)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def _assert_same(streamed, in_memory, exact: bool = True):
    """Equal results; ``exact=False`` where the batches differ (a one-row batch is bounded by
    other BLAS kernels than a large one, which round differently)."""
    for name in FIELDS:
        if name == "margins" and not exact:
            np.testing.assert_allclose(streamed.margins, in_memory.margins, rtol=1e-5, atol=1e-6)
            continue
        np.testing.assert_array_equal(
            getattr(streamed, name), getattr(in_memory, name), err_msg=name
        )
    np.testing.assert_array_equal(np.asarray(streamed.counterexample), in_memory.counterexample)
    assert streamed.method == in_memory.method and streamed.eps == in_memory.eps


def test_what_streams(tmp_path):
    X = np.zeros((3, 2), dtype=np.float32)
    assert not is_streamed(X) and not is_streamed(torch.zeros(3, 2))
    assert not is_streamed(X.tolist()) and not is_streamed((X, X))
    assert is_streamed(np.memmap(tmp_path / "x.bin", dtype=np.float32, mode="w+", shape=(3, 2)))
    assert is_streamed(iter([X])) and is_streamed(x for x in [X])
    assert is_streamed(DataLoader(TensorDataset(torch.zeros(3, 2)), batch_size=2))


def test_200k_memory_mapped_rows_certify_like_in_memory(tmp_path):
    net = _digits_net()
    X = _memmap(tmp_path / "x.npy", 200_000)
    assert is_streamed(X)
    cert = certify(net, X, EPS, method="ibp", lower=0.0, upper=1.0, batch_size=1024)
    assert len(cert) == 200_000 and cert.counterexample.shape == (200_000, 64)
    assert 0 < cert.certified_fraction < 1  # the comparison is not between trivial results
    for rows in (slice(0, 3000), slice(123_457, 126_000), slice(198_000, 200_000)):
        in_memory = certify(net, np.array(X[rows]), EPS, method="ibp", lower=0.0, upper=1.0)
        for name in FIELDS:
            np.testing.assert_array_equal(
                getattr(cert, name)[rows], getattr(in_memory, name), err_msg=name
            )


def test_labels_and_a_cascade_match_the_array(tmp_path):
    net = _digits_net()
    X = _memmap(tmp_path / "x.npy", 1500)
    y = np.random.default_rng(1).integers(0, 10, len(X))
    streamed = certify(net, X, EPS, method="ibp", y=y, lower=0.0, upper=1.0, batch_size=256)
    _assert_same(
        streamed,
        certify(net, np.array(X), EPS, method="ibp", y=y, lower=0.0, upper=1.0, batch_size=256),
    )
    assert (streamed.decided_by == "clean-prediction").any()
    assert isinstance(streamed.counterexample, SparseRows)
    falsified = streamed.status == "falsified"
    np.testing.assert_array_equal(streamed.counterexample[falsified], np.array(X[falsified]))
    # A cascade: later stages see other batch compositions, so rounding may differ.
    cascade = ("ibp", "crown-ibp", "crown")
    streamed = certify(net, X, EPS, method=cascade, lower=0.0, upper=1.0, batch_size=200)
    in_memory = certify(net, np.array(X), EPS, method=cascade, lower=0.0, upper=1.0, batch_size=200)
    np.testing.assert_allclose(streamed.margins, in_memory.margins, rtol=1e-5, atol=1e-6)
    decided = np.abs(np.where(np.isinf(in_memory.margins), 1, in_memory.margins)).min(1) > 1e-4
    np.testing.assert_array_equal(streamed.status[decided], in_memory.status[decided])
    assert set(streamed.stage_seconds) == set(cascade)


@pytest.mark.parametrize("form", ["arrays", "tensors", "pairs", "dataloader"])
def test_iterable_of_batches_equals_the_array(form):
    net = _digits_net()
    X, y = small_digits(10, 700)
    sizes = [100, 1, 250, 0, 349]  # uneven, with an empty batch
    cuts = np.cumsum([0, *sizes])
    batches = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    labels = None if form in ("arrays", "tensors") else y
    if form == "arrays":
        stream = (X[rows] for rows in batches)
    elif form == "tensors":
        stream = iter([torch.as_tensor(X[rows]) for rows in batches])
    elif form == "pairs":
        stream = ((X[rows], y[rows]) for rows in batches)
    else:
        stream = DataLoader(TensorDataset(torch.as_tensor(X), torch.as_tensor(y)), batch_size=128)
    streamed = certify(net, stream, EPS, method="ibp", lower=0.0, upper=1.0)
    _assert_same(
        streamed, certify(net, X, EPS, method="ibp", y=labels, lower=0.0, upper=1.0), exact=False
    )


def test_each_chunk_is_validated_and_named(tmp_path):
    net = _digits_net()
    X = np.random.default_rng(0).random((600, 64)).astype(np.float32)
    X[450, 3] = np.nan
    path = tmp_path / "x.npy"
    np.save(path, X)
    with pytest.raises(ValueError, match=r"rows 400 to 599: X contains NaN"):
        certify(net, np.load(path, mmap_mode="r"), EPS, method="ibp", batch_size=200)
    X[450, 3] = 1.5
    np.save(path, X)
    with pytest.raises(ValueError, match=r"rows 400 to 599: .*above `upper`"):
        certify(
            net,
            np.load(path, mmap_mode="r"),
            EPS,
            method="ibp",
            lower=0.0,
            upper=1.0,
            batch_size=200,
        )
    with pytest.raises(ValueError, match=r"rows 0 to 1: .*sample shape"):
        certify(net, iter([np.zeros((2, 63), np.float32)]), EPS, method="ibp")
    with pytest.raises(ValueError, match=r"rows 2 to 3: .*perturbation is for samples"):
        certify(
            net,
            iter([np.zeros((2, 64), np.float32), np.zeros((2, 8, 8), np.float32)]),
            EPS,
            method="ibp",
        )
    with pytest.raises(ValueError, match="y must have 600 labels"):
        certify(net, np.load(path, mmap_mode="r"), EPS, y=np.zeros(5, int))
    with pytest.raises(ValueError, match="inside the batches"):
        certify(net, iter([X[:2]]), EPS, y=np.zeros(2, int))
    with pytest.raises(ValueError, match="label all of them or none"):
        certify(net, iter([(X[:2], np.zeros(2, int)), X[2:4]]), EPS, method="ibp")
    with pytest.raises(ValueError, match="stream was empty"):
        certify(net, iter([]), EPS)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        certify(net, iter([X[:2]]), -1.0)


def test_budget_is_shared_by_the_chunks():
    net = _digits_net()
    X, _ = small_digits(10, 600)
    start = time.perf_counter()
    cert = certify(
        net,
        (X[i : i + 50] for i in range(0, 600, 50)),
        0.2,
        method=("ibp", "attack", "bab"),
        budget=0.3,
        timeout=5.0,
    )
    assert time.perf_counter() - start < 10
    # Every chunk ran its first stage (the reference is known); the budget left samples open.
    with torch.no_grad():
        np.testing.assert_array_equal(cert.prediction, net(torch.as_tensor(X)).argmax(1).numpy())
    assert (cert.status == "unknown").any()
    # In memory too, a budget spent before the first stage still gives every reference class.
    tiny = certify(net, X, 0.2, method=("ibp", "crown"), budget=1e-9)
    np.testing.assert_array_equal(tiny.prediction, cert.prediction)


def test_counterexamples_of_a_complete_stream_are_real():
    net = _digits_net()
    X, _ = small_digits(10, 300)
    cert = certify(
        net,
        (X[i : i + 100] for i in range(0, 300, 100)),
        0.1,
        method="complete",
        lower=0.0,
        upper=1.0,
        timeout=1.0,
    )
    falsified = np.flatnonzero(cert.status == "falsified")
    assert len(falsified) and isinstance(cert.counterexample, SparseRows)
    assert list(cert.counterexample.rows) == list(falsified)
    points = cert.counterexample[falsified]
    assert np.abs(points - X[falsified]).max() <= 0.1 + 1e-6
    assert points.min() >= 0 and points.max() <= 1
    with torch.no_grad():
        flipped = net(torch.as_tensor(points, dtype=torch.float32)).argmax(1).numpy()
    assert np.all(flipped != cert.prediction[falsified])
    assert np.isnan(cert.counterexample[cert.status != "falsified"]).all()


def test_progress_bar_on_stderr(tmp_path, capsys):
    X = _memmap(tmp_path / "x.npy", 500)
    certify(_digits_net(), X, EPS, method="ibp", batch_size=100, verbose=1)
    assert "certify" in capsys.readouterr().err
    certify(_digits_net(), X, EPS, method="ibp", batch_size=100)
    assert capsys.readouterr().err == ""


def test_estimator_certifies_a_memmap_like_an_array(tmp_path):
    X, y = small_digits(3, 240)
    labels = np.array(["zero", "one", "two"])[y]  # labels of the estimator's own type
    teacher = CertifiedTeacher(
        eps=EPS,
        method="ibp",
        module__hidden_sizes=(16,),
        max_epochs=2,
        lower=0.0,
        upper=1.0,
        random_state=0,
    ).fit(X, labels)
    path = tmp_path / "x.npy"
    np.save(path, X)
    X_map = np.load(path, mmap_mode="r")
    streamed = teacher.certify(X_map, y=labels, method="ibp", batch_size=64)
    _assert_same(streamed, teacher.certify(X, y=labels, method="ibp", batch_size=64))
    assert teacher.certified_accuracy(X_map, labels, method="ibp") == pytest.approx(
        streamed.certified_fraction
    )
    pairs = ((X[i : i + 100], labels[i : i + 100]) for i in range(0, 240, 100))
    _assert_same(teacher.certify(pairs, method="ibp", batch_size=64), streamed, exact=False)
    with pytest.raises(ValueError, match="rows 0 to 63: .*features"):
        teacher.certify(np.load(path, mmap_mode="r")[:, :10], method="ibp", batch_size=64)


def test_sparse_rows_index_like_the_dense_array():
    rng = np.random.default_rng(0)
    rows = np.array([7, 2, 5])
    values = rng.random((3, 2, 3))
    sparse = SparseRows((9, 2, 3), rows, values)
    dense = np.full((9, 2, 3), np.nan)
    dense[rows] = values
    np.testing.assert_array_equal(np.asarray(sparse), dense)
    mask = np.zeros(9, bool)
    mask[[2, 3, 7]] = True
    for key in (
        2,
        3,
        -2,
        slice(1, 8, 2),
        mask,
        [7, 0, 7],
        np.array([[5, 2]]),
        (5, 1),
        (mask, 0, slice(1, None)),
        (slice(None), 1),
    ):
        np.testing.assert_array_equal(sparse[key], dense[key], err_msg=repr(key))
    assert len(sparse) == 9 and sparse.ndim == 3 and sparse.size == dense.size
    assert np.isnan(sparse).sum() == np.isnan(dense).sum()
    with pytest.raises(ValueError, match="distinct"):
        SparseRows((3, 1), [1, 1], [[0.0], [1.0]])
    with pytest.raises(ValueError, match="distinct"):
        SparseRows((3, 1), [3], [[0.0]])
    assert doctest.testmod(certdistill.certification.sparse_rows).failed == 0
