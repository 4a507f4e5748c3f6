"""Certify any trained ``nn.Sequential`` with the functional API.

Trains a small MLP on scikit-learn's digits with plain cross-entropy (a few seconds), then
certifies the test set with every bound method, computes certified radii, and decides every
sample by complete verification (certified, or falsified with a counterexample).

Run: python examples/certify_network.py [--epochs 20]
"""

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from certdistill import certified_radius, certify


def main(epochs: int = 20) -> None:
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(
        X, digits.target, test_size=0.3, stratify=digits.target, random_state=0
    )
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    inputs, targets = torch.as_tensor(X_train), torch.as_tensor(y_train)
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs)).split(64):
            loss = nn.functional.cross_entropy(net(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()

    eps = 0.01
    print(f"certified accuracy at eps = {eps} (pixels in [0, 1]):")
    for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
        cert = certify(net, X_test, eps, method=method, y=y_test, lower=0.0, upper=1.0)
        print(f"  {method:12s} {100 * cert.certified_fraction:5.1f} %")
    radius = certified_radius(
        net,
        X_test,
        method="crown",
        y=y_test,
        lower=0.0,
        upper=1.0,
        max_eps=0.1,
    )
    print(f"median CROWN-certified radius: {np.median(radius):.4f}")

    eps = 0.03
    cert = certify(net, X_test, eps, method="complete", y=y_test, lower=0.0, upper=1.0)
    print(
        f"complete verification at eps = {eps}: "
        f"{np.sum(cert.status == 'certified')} certified, "
        f"{np.sum(cert.status == 'falsified')} falsified, "
        f"{np.sum(cert.status == 'unknown')} unknown"
    )
    stages, counts = np.unique(cert.decided_by, return_counts=True)
    print("  decided by " + ", ".join(f"{s} {c}" for s, c in zip(stages, counts, strict=True)))
    falsified = np.flatnonzero(cert.status == "falsified")
    if len(falsified):
        i = falsified[0]
        point = torch.as_tensor(cert.counterexample[i], dtype=torch.float32)
        with torch.no_grad():
            predicted = int(net(point[None]).argmax())
        distance = float(np.abs(cert.counterexample[i] - X_test[i]).max())
        print(
            f"  sample {i}: label {y_test[i]}, predicted {predicted} at a point {distance:.3f} away"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    main(parser.parse_args().epochs)
