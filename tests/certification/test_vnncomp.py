"""VNN-COMP verification: ONNX + VNN-LIB in, sat / unsat out, never a wrong answer.

Small networks are written as ONNX files; their properties as VNN-LIB text. Every ``unsat`` is
checked against the exact MILP optimum of the test oracle, every ``sat`` by running the file in
onnxruntime at the reported counterexample.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from milp import exact_min_margins
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from certdistill import export_onnx, load_onnx  # noqa: E402
from certdistill.certification.vnncomp import (  # noqa: E402
    read_instances,
    verify,
    verify_instances,
)
from certdistill.cli import main  # noqa: E402
from certdistill.io.vnnlib import parse_vnnlib  # noqa: E402


def _net(seed: int, d_in: int = 4, width: int = 10, n_out: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, n_out),
    ).eval()


def _write_net(net: nn.Module, path, d_in: int = 4):
    export_onnx(net, path, input_shape=(d_in,))
    return path


def _box_text(lower, upper) -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(len(lower))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(3)]
    for i, (lo, hi) in enumerate(zip(lower, upper, strict=True)):
        lines += [f"(assert (>= X_{i} {float(lo)!r}))", f"(assert (<= X_{i} {float(hi)!r}))"]
    return "\n".join(lines) + "\n"


def _robustness(lower, upper, label: int, others=None) -> str:
    others = [j for j in range(3) if j != label] if others is None else others
    body = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in others)
    return _box_text(lower, upper) + f"(assert (or {body}))\n"


def _run_file(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_inputs()[0]
    return session.run(["logits"], {meta.name: x.astype(np.float32).reshape(1, -1)})[0][0]


def _exact_worst_margin(net, x, eps, label) -> float:
    result = exact_min_margins(net.double(), x[None], np.array([label]), eps)[0]
    net.float()
    return float(np.min(np.delete(result.optimum, label)))


@pytest.mark.parametrize("seed", range(6))
def test_answers_agree_with_the_exact_optimum(seed, tmp_path):
    net = _net(seed)
    path = _write_net(net, tmp_path / "net.onnx")
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=4)
    with torch.no_grad():
        label = int(net(torch.tensor(x, dtype=torch.float32)[None]).argmax())
    for eps in (0.02, 0.1, 0.3):
        prop = parse_vnnlib(_robustness(x - eps, x + eps, label))
        outcome = verify(path, prop, timeout=20)
        exact = _exact_worst_margin(net, x, eps, label)
        assert outcome.result in ("sat", "unsat"), (eps, outcome)
        if outcome.result == "unsat":
            assert exact > -1e-6, (eps, exact)
        else:
            assert exact < 1e-6, (eps, exact)
            y = _run_file(path, outcome.counterexample)
            np.testing.assert_allclose(y, outcome.output, rtol=1e-6, atol=1e-6)
            assert np.all(outcome.counterexample >= x - eps)
            assert np.all(outcome.counterexample <= x + eps)
            assert max(y[j] for j in range(3) if j != label) >= y[label]


def test_a_wrong_label_is_sat_at_the_centre(tmp_path):
    net = _net(0)
    path = _write_net(net, tmp_path / "net.onnx")
    x = np.zeros(4)
    with torch.no_grad():
        label = int(net(torch.zeros(1, 4)).argmin())
    outcome = verify(path, parse_vnnlib(_robustness(x - 0.01, x + 0.01, label)), timeout=10)
    assert outcome.result == "sat"
    text = outcome.results_text().splitlines()
    assert text[0] == "sat" and text[1].startswith("((X_0 ") and text[-1].endswith("))")
    assert sum(line.strip().startswith("(Y_") or "(Y_" in line for line in text) == 3


def test_subset_of_classes_and_general_rows(tmp_path):
    """A target class only, and a general linear row with an offset: only those count."""
    net = _net(1)
    path = _write_net(net, tmp_path / "net.onnx")
    x = np.full(4, 0.2)
    with torch.no_grad():
        logits = net(torch.tensor(x, dtype=torch.float32)[None])[0].double().numpy()
    order = np.argsort(logits)
    top, second, last = int(order[-1]), int(order[-2]), int(order[0])
    # "the last class reaches the top one" is far from true at eps 1e-3: unsat ...
    prop = parse_vnnlib(_robustness(x - 1e-3, x + 1e-3, top, others=[last]))
    assert verify(path, prop, timeout=10).result == "unsat"
    # ... and "Y_second - Y_top >= offset" with an offset below the actual gap is sat.
    gap = logits[second] - logits[top]
    text = _box_text(x - 1e-3, x + 1e-3) + (
        f"(assert (>= (- Y_{second} Y_{top}) {float(gap - 0.5)!r}))\n"
    )
    outcome = verify(path, parse_vnnlib(text), timeout=10)
    assert outcome.result == "sat"
    y = _run_file(path, outcome.counterexample)
    assert y[second] - y[top] >= gap - 0.5


def test_conjunctions_and_disjunctive_boxes(tmp_path):
    net = _net(2)
    path = _write_net(net, tmp_path / "net.onnx")
    x = np.full(4, -0.3)
    with torch.no_grad():
        logits = net(torch.tensor(x, dtype=torch.float32)[None])[0].numpy()
    top = int(logits.argmax())
    others = [j for j in range(3) if j != top]
    # Unsafe: the top class is the smallest of all (a conjunction of two rows): unsat.
    conj = " ".join(f"(<= Y_{top} Y_{j})" for j in others)
    text = _box_text(x - 1e-3, x + 1e-3) + f"(assert (and {conj}))\n"
    assert verify(path, parse_vnnlib(text), timeout=10).result == "unsat"
    # Two boxes, the second far away where another class wins: sat in the second box.
    far = np.full(4, 3.0)
    with torch.no_grad():
        far_top = int(net(torch.tensor(far, dtype=torch.float32)[None]).argmax())
    if far_top != top:
        lines = [f"(declare-const X_{i} Real)" for i in range(4)]
        lines += [f"(declare-const Y_{j} Real)" for j in range(3)]
        boxes = []
        for centre in (x, far):
            box = " ".join(
                f"(>= X_{i} {float(c) - 1e-3!r}) (<= X_{i} {float(c) + 1e-3!r})"
                for i, c in enumerate(centre)
            )
            boxes.append(f"(and {box})")
        lines.append(f"(assert (or {' '.join(boxes)}))")
        lines.append(f"(assert (or {' '.join(f'(and (>= Y_{j} Y_{top}))' for j in others)}))")
        outcome = verify(path, parse_vnnlib("\n".join(lines)), timeout=10)
        assert outcome.result == "sat"
        assert np.all(np.abs(outcome.counterexample - far) <= 1e-3 + 1e-7)


def test_module_and_property_mismatches(tmp_path):
    path = _write_net(_net(0), tmp_path / "net.onnx")
    bad_inputs = parse_vnnlib(_robustness(np.zeros(5), np.ones(5), 0))
    with pytest.raises(ValueError, match="5 inputs"):
        verify(path, bad_inputs)
    with pytest.raises(ValueError, match="timeout must be a positive"):
        verify(path, parse_vnnlib(_robustness(np.zeros(4), np.ones(4), 0)), timeout=0)
    outcome = verify(_net(0), parse_vnnlib(_robustness(np.zeros(4), np.zeros(4), 0)), timeout=10)
    assert outcome.result in ("sat", "unsat")  # a module works too (flat rows)


def test_timeout_and_unknown(tmp_path):
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    ).eval()
    path = tmp_path / "deep.onnx"
    export_onnx(net, path, input_shape=(4,))
    with torch.no_grad():
        label = int(net(torch.zeros(1, 4)).argmax())
    eps = 0.5
    text = _robustness(np.full(4, -eps), np.full(4, eps), label)
    prop = parse_vnnlib(text)
    # Bounds alone cannot decide this box (they are loose at this radius): unknown.
    assert verify(path, prop, method="ibp", timeout=30).result == "unknown"
    # A search with no time left gives up after its first stage.
    outcome = verify(path, prop, timeout=1e-3)
    assert outcome.result in ("timeout", "sat")
    assert outcome.seconds < 5


def _instances(tmp_path, n: int = 4):
    nets = {"a.onnx": _net(3), "b.onnx": _net(4)}
    for name, net in nets.items():
        _write_net(net, tmp_path / name)
    rows, rng = [], np.random.default_rng(3)
    for k in range(n):
        name = "a.onnx" if k % 3 else "b.onnx"
        x = rng.uniform(-1, 1, size=4)
        with torch.no_grad():
            label = int(nets[name](torch.tensor(x, dtype=torch.float32)[None]).argmax())
        eps = [0.01, 0.5][k % 2]
        (tmp_path / "props").mkdir(exist_ok=True)
        (tmp_path / "props" / f"p{k}.vnnlib").write_text(_robustness(x - eps, x + eps, label))
        rows.append(f"{name},props/p{k}.vnnlib,20")
    (tmp_path / "instances.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "instances.csv"


def test_instances_batched_and_one_by_one_agree(tmp_path):
    csv_path = _instances(tmp_path, 6)
    batched = verify_instances(
        csv_path, output=tmp_path / "out.csv", results_dir=tmp_path / "results"
    )
    single = verify_instances(csv_path, batch=False)
    assert [r.outcome.result for r in batched] == [r.outcome.result for r in single]
    assert {r.outcome.result for r in batched} <= {"sat", "unsat"}
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].split(",")[:2] == ["b.onnx", "props/p0.vnnlib"]
    assert sorted(p.name for p in (tmp_path / "results").iterdir())[0] == "0000_p0.txt"
    for r in batched:
        if r.outcome.result == "sat":
            y = _run_file(tmp_path / r.onnx, r.outcome.counterexample)
            np.testing.assert_allclose(y, r.outcome.output, rtol=1e-6, atol=1e-6)


def test_instances_file_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a.onnx,p.vnnlib\n")
    with pytest.raises(ValueError, match="line 1: expected onnx,vnnlib,timeout"):
        read_instances(bad)
    bad.write_text("a.onnx,p.vnnlib,120\na.onnx,p.vnnlib,soon\n")
    with pytest.raises(ValueError, match="line 2: timeout 'soon'"):
        read_instances(bad)


# ----------------------------------------------------------------------------------- CLI
def test_cli_verify_prints_the_answer_last(tmp_path, capsys):
    path = _write_net(_net(0), tmp_path / "net.onnx")
    x = np.zeros(4)
    with torch.no_grad():
        label = int(_net(0)(torch.zeros(1, 4)).argmin())
    prop = tmp_path / "p.vnnlib"
    prop.write_text(_robustness(x - 0.01, x + 0.01, label))
    results = tmp_path / "r.txt"
    assert (
        main(
            [
                "verify",
                str(path),
                str(prop),
                "--timeout",
                "10",
                "--results-file",
                str(results),
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-1] == "sat"
    assert results.read_text().startswith("sat\n((X_0 ")


def test_cli_verify_instances(tmp_path, capsys):
    csv_path = _instances(tmp_path, 3)
    out = tmp_path / "out.csv"
    assert main(["verify", "--instances", str(csv_path), "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("3 instances: ") and "results:" in printed
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["verify"], 2, "give MODEL.onnx and PROPERTY.vnnlib"),
        (["verify", "m.onnx", "p.vnnlib", "--instances", "i.csv"], 2, "not both"),
        (["verify", "--instances", "i.csv", "--results-file", "r.txt"], 2, "--results-dir"),
        (["verify", "m.onnx", "p.vnnlib", "--output", "o.csv"], 2, "go with --instances"),
        (["verify", "--instances", "i.csv", "--output", "o.txt"], 2, "unsupported extension"),
        (["verify", "missing.onnx", "p.vnnlib"], 1, "No ONNX file"),
        (["verify", "m.onnx", "p.vnnlib", "--timeout", "0"], 2, "must be positive"),
        (["export", "missing.joblib", "out.onnx"], 1, "missing.joblib"),
        (["export", "m.joblib", "out.txt"], 2, "unsupported extension"),
    ],
)
def test_cli_exit_paths(argv, status, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == status
    assert message in capsys.readouterr().err


def test_cli_export_then_verify_the_artifact(tmp_path, capsys):
    """The deployed file certifies as the estimator does."""
    import joblib
    from sklearn.datasets import load_digits

    from certdistill import CertifiedTeacher

    X, y = load_digits(return_X_y=True)
    X = (X[:300] / 16).astype(np.float32)
    teacher = CertifiedTeacher(eps=0.05, max_epochs=2, random_state=0).fit(X, y[:300])
    joblib.dump(teacher, tmp_path / "t.joblib")
    assert main(["export", str(tmp_path / "t.joblib"), str(tmp_path / "t.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out
    exported = load_onnx(tmp_path / "t.onnx")
    by_file = teacher.certify(X[:20], eps=0.05, method="crown")
    from certdistill import certify

    by_artifact = certify(
        exported, X[:20], 0.05, method="crown", lower=teacher.lower, upper=teacher.upper
    )
    np.testing.assert_allclose(by_artifact.margins, by_file.margins, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(by_artifact.certified, by_file.certified)


def test_cli_certify_reads_an_onnx_network(tmp_path, capsys):
    """``certdistill certify`` on the exported file prints what it prints for the model."""
    import joblib
    from sklearn.datasets import load_digits

    from certdistill import CertifiedTeacher

    X, y = load_digits(return_X_y=True)
    X = (X[:200] / 16).astype(np.float32)
    teacher = CertifiedTeacher(eps=0.05, max_epochs=2, random_state=0).fit(X, y[:200])
    joblib.dump(teacher, tmp_path / "t.joblib")
    export_onnx(teacher, tmp_path / "t.onnx")
    np.savez(tmp_path / "test.npz", X=X[:40], y=y[:40])
    printed = {}
    for name in ("t.joblib", "t.onnx"):
        assert (
            main(
                [
                    "certify",
                    str(tmp_path / name),
                    str(tmp_path / "test.npz"),
                    "--method",
                    "crown",
                    "--quiet",
                ]
            )
            == 0
        )
        printed[name] = [
            line
            for line in capsys.readouterr().out.splitlines()
            if line.startswith(("clean", "certified", "falsified"))
        ]
    strip = [line.split(";")[0] for line in printed["t.onnx"]]
    assert strip == [line.split(";")[0] for line in printed["t.joblib"]]
    # A bare network without certdistill metadata needs --eps, and takes index labels.
    export_onnx(teacher.module_, tmp_path / "bare.onnx", input_shape=(64,))
    assert main(["certify", str(tmp_path / "bare.onnx"), str(tmp_path / "test.npz")]) == 1
    assert "holds no eps: give --eps" in capsys.readouterr().err
    assert (
        main(
            [
                "certify",
                str(tmp_path / "bare.onnx"),
                str(tmp_path / "test.npz"),
                "--eps",
                "0.05",
                "--method",
                "ibp",
                "--quiet",
            ]
        )
        == 0
    )
    assert "certified accuracy at eps 0.05" in capsys.readouterr().out


def test_cli_verify_reports_a_malformed_property_with_its_line(tmp_path, capsys):
    path = _write_net(_net(0), tmp_path / "net.onnx")
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(assert (<= X_0 0.5)\n")
    assert main(["verify", str(path), str(bad), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "bad.vnnlib" in err and ":2" in err
