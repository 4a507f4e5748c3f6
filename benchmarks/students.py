"""The small digits students of the complete-verification benchmark, trained reproducibly.

Shared by ``benchmarks/bench_complete.py`` and by comparisons with external verifiers, so that
every tool verifies the very same weights: :func:`train_student` fits a student with
``CertifiedTeacher`` (IBP or MTL-IBP), :func:`folded_network` returns its network in eval mode
with every BatchNorm folded into the affine layer before it (the same function, as a plain
``Linear``/``Conv2d``/``ReLU`` stack), and :func:`export` writes that network and the test data
for a verifier that reads PyTorch state dicts and ``.npz`` arrays.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from certdistill import CertifiedTeacher
from certdistill.estimators.models import make_cnn, make_mlp

EPS = 0.1

#: Student name -> (network builder, input_shape of the estimator).
STUDENTS = {
    "mlp-64-32": (lambda: make_mlp(64, 10, (32,)), None),
    "mlp-64-64-64": (lambda: make_mlp(64, 10, (64, 64, 64)), None),
    "cnn-4-8-16": (lambda: make_cnn((1, 8, 8), 10, channels=(4, 8), hidden_sizes=(16,)), (1, 8, 8)),
}

#: Training name -> CertifiedTeacher parameters.
TRAININGS = {
    "ibp": dict(method="ibp"),
    "mtl-ibp": dict(method="mtl-ibp", alpha=0.2, pgd_steps=5),
}


def digits_split(seed: int = 0):
    """Digits / 16, stratified 70/30 split: ``X_train, X_test, y_train, y_test`` (540 test)."""
    X, y = load_digits(return_X_y=True)
    return train_test_split(
        (X / 16.0).astype(np.float32), y, test_size=0.3, stratify=y, random_state=seed
    )


def train_student(student: str, training: str, seed: int = 0, epochs: int = 60):
    """Fit one student on the digits training split (eps 0.1, domain [0, 1])."""
    builder, input_shape = STUDENTS[student]
    X_train, _, y_train, _ = digits_split()
    torch.manual_seed(seed)
    return CertifiedTeacher(
        builder(),
        eps=EPS,
        input_shape=input_shape,
        lower=0.0,
        upper=1.0,
        random_state=seed,
        max_epochs=epochs,
        **TRAININGS[training],
    ).fit(X_train, y_train)


def folded_network(estimator) -> nn.Sequential:
    """The estimator's network in eval mode with each BatchNorm folded into the layer before it.

    The result computes the same function (up to rounding) with ``Linear``, ``Conv2d``,
    ``Flatten`` and ``ReLU`` layers only, the form external verifiers accept most readily.
    """
    layers = [copy.deepcopy(m) for m in estimator.module_.eval()]
    folded: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            previous = folded[-1]
            scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
            shift = layer.bias - layer.running_mean * scale
            with torch.no_grad():
                view = (-1,) + (1,) * (previous.weight.dim() - 1)
                previous.weight.mul_(scale.view(view))
                previous.bias.mul_(scale).add_(shift)
            continue
        folded.append(layer)
    return nn.Sequential(*folded).eval()


def export(network: nn.Sequential, X: np.ndarray, y: np.ndarray, directory) -> Path:
    """Write ``model.pt`` (a state dict) and ``data.npz`` (arrays ``X``, ``y``) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), directory / "model.pt")
    np.savez(
        directory / "data.npz", X=np.asarray(X, dtype=np.float32), y=np.asarray(y, dtype=np.int64)
    )
    return directory
