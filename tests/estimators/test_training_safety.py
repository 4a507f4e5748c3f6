"""Training that goes wrong: an interrupted fit (Ctrl-C), resuming it, and parameters that would be
silently ignored (``criterion``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digits import small_digits
from sklearn.frozen import FrozenEstimator
from skorch.callbacks import Callback
from torch import nn

from certdistill import CertifiedTeacher, DistilledStudent

COMMON = dict(eps=0.05, lower=0.0, upper=1.0, max_epochs=6, lr=1e-2, batch_size=50, random_state=0)


@pytest.fixture(scope="module")
def data():
    return small_digits(4, 200)


@pytest.fixture(scope="module")
def teacher(data):
    return CertifiedTeacher(method="ibp", module__hidden_sizes=(16,), **COMMON).fit(*data)


class Interrupt(Callback):
    """Raise KeyboardInterrupt (as Ctrl-C does) in epoch ``epoch``, at its start or after its
    ``batch``-th training batch (the middle of a bound computation's epoch)."""

    def __init__(self, epoch: int = 3, batch: int | None = None):
        self.epoch = epoch
        self.batch = batch

    def on_epoch_begin(self, net, **kwargs):
        if self.batch is None and len(net.history) == self.epoch:
            raise KeyboardInterrupt

    def on_batch_end(self, net, training=False, **kwargs):
        if (
            training
            and self.batch is not None
            and len(net.history) == self.epoch
            and len(net.history[-1]["batches"]) == self.batch
        ):
            raise KeyboardInterrupt


ESTIMATORS = {
    "crown-ibp": lambda t: CertifiedTeacher(module__hidden_sizes=(16,), **COMMON),
    "mtl-ibp": lambda t: CertifiedTeacher(method="mtl-ibp", module__hidden_sizes=(16,), **COMMON),
    "sabr": lambda t: CertifiedTeacher(method="sabr", module__hidden_sizes=(16,), **COMMON),
    "student": lambda t: DistilledStudent(FrozenEstimator(t), module__hidden_sizes=(8,), **COMMON),
}


@pytest.mark.parametrize("batch", [None, 2], ids=["epoch-start", "mid-epoch"])
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_keyboard_interrupt_leaves_a_usable_model(data, teacher, name, batch):
    X, y = data
    model = ESTIMATORS[name](teacher).set_params(callbacks=[("stop", Interrupt(3, batch))])
    state = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match="interrupted.*epoch 3"):
        returned = model.fit(X, y)
    assert returned is model
    assert torch.equal(torch.random.get_rng_state(), state)  # the forked random state is undone
    # The history has the two completed epochs and the interrupted one, marked as such.
    assert len(model.history) == 3
    assert model.history[-1, "interrupted"] is True
    assert "interrupted" not in model.history[-2]
    assert np.isfinite(model.history[:2, "train_loss"]).all()
    assert len(model.history[-1, "batches"]) == (batch or 0)
    for tensor in model.module_.state_dict().values():
        assert torch.isfinite(tensor.float()).all()
    # The weights reached are used as they are: predictions, certificates, score.
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    assert set(model.predict(X)) <= set(y)
    cert = model.certify(X[:20], method="crown", y=y[:20])
    assert cert.margins.shape == (20, 4)
    assert 0.0 <= model.score(X, y) <= 1.0
    assert model.score(X, y) > 0.5  # two epochs of training did happen
    if name == "student":
        assert model.teacher_outputs_ is None  # the fit ended as usual (on_train_end ran)
        assert model.teacher_ is teacher


def test_resume_an_interrupted_fit_with_partial_fit(data):
    X, y = data
    model = CertifiedTeacher(
        callbacks=[("stop", Interrupt(3))], module__hidden_sizes=(16,), **COMMON
    )
    with pytest.warns(UserWarning, match="interrupted"):
        model.fit(X, y)
    done = len(model.history) - 1  # the interrupted epoch trained no batch
    model.set_params(callbacks__stop__epoch=-1)
    model.partial_fit(X, y, epochs=COMMON["max_epochs"] - done)
    assert len(model.history) == COMMON["max_epochs"] + 1
    # the schedules carry on from the steps in the history and end where a full run ends
    full = CertifiedTeacher(module__hidden_sizes=(16,), **COMMON).fit(X, y)
    assert model.history[-1, "eps"] == full.history[-1, "eps"] == pytest.approx(full.eps_train)
    assert model.history[-1, "lr"] == pytest.approx(full.history[-1, "lr"])
    assert model.history[-1, "kappa"] == full.history[-1, "kappa"]
    with pytest.raises(ValueError, match="epochs"):
        model.partial_fit(X, y, epochs=-1)
    with pytest.raises(TypeError, match="sample_weight"):
        model.partial_fit(X, y, sample_weight=np.ones(len(y)))


@pytest.mark.parametrize(
    "params",
    [
        dict(criterion=nn.NLLLoss),
        dict(criterion=nn.CrossEntropyLoss()),
        dict(criterion__label_smoothing=0.1),
        dict(criterion__weight=torch.ones(4)),
    ],
    ids=["other-loss", "instance", "label-smoothing", "class-weights"],
)
@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_criterion_is_rejected_rather_than_ignored(data, teacher, kind, params):
    X, y = data
    make = {
        "teacher": lambda: CertifiedTeacher(**COMMON, **params),
        "student": lambda: DistilledStudent(teacher, **COMMON, **params),
    }[kind]
    with pytest.raises(ValueError, match="does not use `criterion`"):
        make().fit(X, y)
    with pytest.raises(ValueError, match="does not use `criterion`"):
        make().partial_fit(X, y)


def test_default_criterion_given_explicitly_is_accepted(data):
    X, y = data
    model = CertifiedTeacher(
        criterion=nn.CrossEntropyLoss, module__hidden_sizes=(8,), **dict(COMMON, max_epochs=1)
    ).fit(X, y)
    assert model.score(X, y) > 0
