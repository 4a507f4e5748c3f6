"""The command line: demo, train -> distill -> certify -> report, one-line errors, help."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

import joblib
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from certdistill.cli import CLIError, _demo, build_parser, main

N_TRAIN, N_TEST = 200, 60
TINY_MLP = ["--hidden-sizes", "16", "--epochs", "2", "--quiet"]


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN : N_TRAIN + N_TEST], y[N_TRAIN : N_TRAIN + N_TEST]


def _write_csv(path, X, labels, label_column="label"):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"pixel{i}" for i in range(X.shape[1])] + [label_column])
        writer.writerows([*map(float, row), label] for row, label in zip(X, labels, strict=True))


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """Train/test data as .npz (images of shape (n, 1, 8, 8) and flat rows) and .csv."""
    X_train, y_train, X_test, y_test = digits
    folder = tmp_path_factory.mktemp("data")
    np.savez(folder / "train.npz", X=X_train.reshape(-1, 1, 8, 8), y=y_train)
    np.savez(folder / "test.npz", X=X_test, y=y_test)
    _write_csv(folder / "train.csv", X_train, [f"digit{v}" for v in y_train], "class")
    _write_csv(folder / "test.csv", X_test, [f"digit{v}" for v in y_test], "class")
    np.savez(folder / "nan.npz", X=np.where(np.arange(64) == 3, np.nan, X_test), y=y_test)
    np.savez(folder / "few_features.npz", X=X_test[:, :10], y=y_test)
    np.savez(folder / "unknown_label.npz", X=X_test, y=y_test + 100)
    # bad data files of the bad-input matrix (DATA_ERRORS)
    np.savez(folder / "inf.npz", X=np.where(np.arange(64) == 5, np.inf, X_test), y=y_test)
    np.savez(folder / "empty.npz", X=X_test[:0], y=y_test[:0])
    np.savez(folder / "one_sample.npz", X=X_test[:1], y=y_test[:1])
    one = y_test == y_test[0]
    np.savez(folder / "one_class.npz", X=X_test[one], y=y_test[one])
    np.savez(folder / "outside.npz", X=X_test * 2.0 - 0.5, y=y_test)
    np.savez(folder / "one_d.npz", X=X_test[0], y=y_test[:1])
    np.savez(folder / "short_y.npz", X=X_test, y=y_test[:-1])
    np.savez(folder / "text.npz", X=np.where(X_test > 0.5, "high", "low"), y=y_test)
    _write_csv(folder / "text.csv", X_test, y_test)
    lines = (folder / "text.csv").read_text().splitlines()
    lines[3] = "dark," + lines[3].split(",", 1)[1]
    (folder / "text.csv").write_text("\n".join(lines) + "\n")
    from certdistill import CertifiedTeacher

    joblib.dump(CertifiedTeacher(), folder / "unfitted.joblib")
    joblib.dump({"not": "a model"}, folder / "dict.joblib")
    (folder / "garbage.joblib").write_bytes(b"not a pickle")
    (folder / "garbage.cdsafe").write_bytes(b"certdistill-safe\n{}\n")
    (folder / "data.txt").write_text("1,2,3\n")
    return folder


@pytest.fixture(scope="module")
def fitted(files):
    """A teacher trained and a student distilled by the command line (tiny, MLPs)."""
    teacher, student = files / "teacher.joblib", files / "student.joblib"
    assert (
        main(
            [
                "train",
                str(files / "train.npz"),
                "--method",
                "ibp",
                "--lower",
                "0",
                "--upper",
                "1",
                "--input-shape",
                "1,8,8",
                "--channels",
                "4",
                "--output",
                str(teacher),
                *TINY_MLP,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "distill",
                str(files / "train.npz"),
                "--teacher",
                str(teacher),
                "--output",
                str(student),
                *TINY_MLP,
            ]
        )
        == 0
    )
    return teacher, student


# ------------------------------------------------------------------------------------ demo
def test_demo_writes_table_plot_and_models(tmp_path, monkeypatch, capsys, digits):
    X_train, y_train, X_test, y_test = digits
    monkeypatch.setattr(_demo, "load_demo_data", lambda seed: (X_train, X_test, y_train, y_test))
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--epochs",
                "1",
                "--student-epochs",
                "2",
                "--eps",
                "0.05",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(rows) == 4  # header and one row per model
    assert "crown-ibp" in printed.lower() and str(out / "certified_accuracy.png") in printed
    assert (out / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["model"] for row in table] == list(_demo.MODEL_LABELS.values())
    assert all(
        0 <= float(row["certified_accuracy"]) <= float(row["clean_accuracy"]) for row in table
    )
    assert len(json.loads((out / "results.json").read_text())) == 3
    for key in _demo.MODEL_LABELS:
        model = joblib.load(out / f"{key}.joblib")
        assert model.callbacks is None  # the progress bar is not saved with the model
        assert model.predict(X_test[:3]).shape == (3,)


def test_demo_models_are_built_in_one_place():
    models = _demo.build_demo_models(0.1, 3, 4, 0, "cpu")
    assert list(models) == list(_demo.MODEL_LABELS)
    assert models["student"].teacher is models["teacher"]
    assert models["student"].max_epochs == models["student_alone"].max_epochs == 4


# ------------------------------------------------------------------------- round trips
def test_train_distill_certify_report_npz(fitted, files, tmp_path, capsys):
    teacher, student = fitted
    assert joblib.load(teacher).input_shape == (1, 8, 8)
    assert joblib.load(student).teacher_.input_shape == (1, 8, 8)
    assert joblib.load(student).lower == 0.0  # the student inherits the teacher's domain

    results = tmp_path / "certificates.csv"
    assert (
        main(
            [
                "certify",
                str(student),
                str(files / "test.npz"),
                "--method",
                "ibp",
                "--radius",
                "--output",
                str(results),
            ]
        )
        == 0
    )
    assert "certified accuracy at eps 0.1 by ibp" in capsys.readouterr().out
    with open(results) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == N_TEST
    assert list(rows[0]) == [
        "index",
        "label",
        "prediction",
        "certified",
        "status",
        "decided_by",
        "margin",
        "certified_radius",
    ]
    for row in rows:
        assert (row["certified"] == "True") == (float(row["margin"]) > 0)

    as_json = tmp_path / "certificates.json"
    assert (
        main(
            [
                "certify",
                str(teacher),
                str(files / "test.npz"),
                "--eps",
                "0.02",
                "--output",
                str(as_json),
            ]
        )
        == 0
    )
    summary = json.loads(as_json.read_text())
    assert summary["eps"] == 0.02 and summary["method"] == "ibp+crown-ibp+crown"
    assert len(summary["samples"]) == N_TEST

    complete = tmp_path / "complete.csv"
    capsys.readouterr()
    assert (
        main(
            [
                "certify",
                str(student),
                str(files / "test.npz"),
                "--method",
                "complete",
                "--quiet",
                "--output",
                str(complete),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "by complete verification" in printed and "undecided: 0" in printed
    with open(complete) as handle:
        rows = list(csv.DictReader(handle))
    assert {row["status"] for row in rows} <= {"certified", "falsified"}
    for row in rows:
        assert (row["certified"] == "True") == (row["status"] == "certified")
    assert (
        main(["certify", str(student), str(files / "test.npz"), "--method", "ibp", "complete"]) == 2
    )
    assert "complete is a whole cascade" in capsys.readouterr().err

    capsys.readouterr()
    for suffix in (".md", ".csv", ".json"):
        table = tmp_path / f"report{suffix}"
        assert (
            main(
                [
                    "report",
                    str(teacher),
                    str(student),
                    "--data",
                    str(files / "test.npz"),
                    "--eps",
                    "0.05",
                    "0.1",
                    "--pgd-steps",
                    "3",
                    "--output",
                    str(table),
                ]
            )
            == 0
        )
        assert table.stat().st_size > 0
    printed = capsys.readouterr().out
    assert sum(line.startswith("| teacher |") for line in printed.splitlines()) == 2 * 3
    records = json.loads((tmp_path / "report.json").read_text())
    assert [(r["model"], r["eps"]) for r in records] == [
        ("teacher", 0.05),
        ("teacher", 0.1),
        ("student", 0.05),
        ("student", 0.1),
    ]
    assert all(r["certified_accuracy"] <= r["pgd_accuracy"] <= r["clean_accuracy"] for r in records)


def test_train_certify_csv_with_string_labels(files, tmp_path, capsys):
    model = tmp_path / "model.joblib"
    assert (
        main(
            [
                "train",
                str(files / "train.csv"),
                "--label-column",
                "class",
                "--eps",
                "0.05",
                "--lower",
                "0",
                "--upper",
                "1",
                "--output",
                str(model),
                *TINY_MLP,
            ]
        )
        == 0
    )
    results = tmp_path / "results.json"
    assert (
        main(
            [
                "certify",
                str(model),
                str(files / "test.csv"),
                "--label-column",
                "class",
                "--output",
                str(results),
            ]
        )
        == 0
    )
    samples = json.loads(results.read_text())["samples"]
    assert {s["label"] for s in samples} <= {f"digit{d}" for d in range(10)}
    assert all(s["prediction"].startswith("digit") for s in samples)
    assert "clean accuracy" in capsys.readouterr().out


# -------------------------------------------------------------------------------- errors
#: How each command reads a data file: every bad data file of DATA_ERRORS goes through each.
DATA_COMMANDS = {
    "train": ["train", "{f}", "--output", "{d}/unused.joblib"],
    "distill": [
        "distill",
        "{f}",
        "--teacher",
        "{d}/teacher.joblib",
        "--output",
        "{d}/unused.joblib",
    ],
    "certify": ["certify", "{d}/teacher.joblib", "{f}"],
    "report": ["report", "{d}/teacher.joblib", "--data", "{f}"],
}
_ALL = tuple(DATA_COMMANDS)
_MODELS = ("distill", "certify", "report")  # the commands that read a model (the teacher)
#: Bad data files -> {command: the error it reports}; a command left out takes the file (see
#: CLI_CELLS in test_bad_input.py for why).
DATA_ERRORS = {
    "nan": ("nan.npz", dict.fromkeys(_ALL, "NaN or infinite values in 60 sample(s)")),
    "inf": ("inf.npz", dict.fromkeys(_ALL, "NaN or infinite values in 60 sample(s)")),
    "empty": ("empty.npz", dict.fromkeys(_ALL, "at least 2-D, not empty")),
    "1-d X": ("one_d.npz", dict.fromkeys(_ALL, "at least 2-D, not empty")),
    "short y": ("short_y.npz", dict.fromkeys(_ALL, "must be one per sample (60)")),
    "text csv": (
        "text.csv",
        dict.fromkeys(_ALL, "line 4, column 'pixel0': 'dark' is not a number"),
    ),
    "text npz": ("text.npz", dict.fromkeys(_ALL, "must be numeric, got dtype <U4")),
    "one sample": ("one_sample.npz", dict.fromkeys(("train", "distill"), "at least 2 classes")),
    "one class": ("one_class.npz", dict.fromkeys(("train", "distill"), "at least 2 classes")),
    "few features": (
        "few_features.npz",
        dict.fromkeys(_MODELS, "has 10 features per sample, but the model"),
    ),
    "unknown label": (
        "unknown_label.npz",
        {
            "distill": "The teacher's classes",
            "certify": "not trained on",
            "report": "not trained on",
        },
    ),
    "outside the domain": (
        "outside.npz",
        {
            "train": "X has values below `lower`",
            "distill": "X has values below `lower`",
            "certify": "X has values below `lower`",
            "report": "X has values below `lower`",
        },
    ),
}
DATA_CASES = {
    f"{case} ({command})": ([arg.replace("{f}", "{d}/" + name) for arg in argv], expected)
    for case, (name, errors) in DATA_ERRORS.items()
    for command, argv in DATA_COMMANDS.items()
    if command in errors
    for expected in [errors[command]]
}
# "outside the domain (train)" needs the domain: the command line has no default one
DATA_CASES["outside the domain (train)"][0].extend(["--lower", "0", "--upper", "1"])
DATA_CASES.update(
    {
        f"missing y key ({command})": (
            [arg.replace("{f}", "{d}/test.npz") for arg in argv] + ["--y-key", "labels"],
            "no array 'labels'",
        )
        for command, argv in DATA_COMMANDS.items()
    }
)

ERRORS = {
    **DATA_CASES,
    "missing file": (["train", "{d}/missing.npz"], "does not exist"),
    "wrong extension": (["train", "{d}/data.txt"], "unsupported extension '.txt'"),
    "missing key": (["train", "{d}/train.npz", "--x-key", "images"], "no array 'images'"),
    "missing column": (["train", "{d}/train.csv"], "no column 'label'"),
    "negative eps": (["train", "{d}/train.npz", "--eps", "-0.1"], "non-negative"),
    "negative report eps": (
        ["report", "{d}/teacher.joblib", "--data", "{d}/test.npz", "--eps", "0.1", "-1"],
        "non-negative",
    ),
    "bad output": (
        ["train", "{d}/train.npz", "--output", "{d}/model.csv"],
        "unsupported extension '.csv'",
    ),
    "not a model": (["certify", "{d}/dict.joblib", "{d}/test.npz"], "not a certdistill model"),
    "garbage joblib": (
        ["report", "{d}/garbage.joblib", "--data", "{d}/test.npz"],
        "cannot read model",
    ),
    "garbage safe file": (["certify", "{d}/garbage.cdsafe", "{d}/test.npz"], "cannot read model"),
    "missing teacher": (
        ["distill", "{d}/train.npz", "--teacher", "{d}/none.joblib"],
        "does not exist",
    ),
    "complete in a cascade": (
        ["certify", "{d}/teacher.joblib", "{d}/test.npz", "--method", "ibp", "complete"],
        "complete is a whole cascade",
    ),
    "unknown method": (
        ["certify", "{d}/teacher.joblib", "{d}/test.npz", "--method", "lp"],
        "invalid choice",
    ),
    "bad input shape": (
        ["train", "{d}/test.npz", "--input-shape", "1,7,7", "--epochs", "1"],
        "49 features",
    ),
    "no command": ([], "required"),
    "text eps": (
        ["report", "{d}/teacher.joblib", "--data", "{d}/test.npz", "--eps", "small"],
        "expected a non-negative number, got 'small'",
    ),
    "nan eps": (
        ["certify", "{d}/teacher.joblib", "{d}/test.npz", "--eps", "nan"],
        "expected a non-negative number, got 'nan'",
    ),
    "inf eps": (
        ["train", "{d}/train.npz", "--eps", "inf"],
        "expected a non-negative number, got 'inf'",
    ),
    "negative distill eps": (
        ["distill", "{d}/train.npz", "--teacher", "{d}/teacher.joblib", "--eps", "-1"],
        "non-negative",
    ),
    "negative certify eps": (
        ["certify", "{d}/teacher.joblib", "{d}/test.npz", "--eps", "-1"],
        "non-negative",
    ),
    "lower above upper": (
        ["train", "{d}/train.npz", "--lower", "1", "--upper", "0", "--output", "{d}/unused.joblib"],
        "lower must not exceed upper",
    ),
    "distill lower above upper": (
        [
            "distill",
            "{d}/train.npz",
            "--teacher",
            "{d}/teacher.joblib",
            "--lower",
            "1",
            "--upper",
            "0",
            "--output",
            "{d}/unused.joblib",
        ],
        "lower must not exceed upper",
    ),
    "unknown training method": (
        ["train", "{d}/train.npz", "--method", "lp"],
        "invalid choice: 'lp'",
    ),
    "unknown report method": (
        ["report", "{d}/teacher.joblib", "--data", "{d}/test.npz", "--method", "lp"],
        "invalid choice: 'lp'",
    ),
    "unknown loss": (
        ["distill", "{d}/train.npz", "--teacher", "{d}/teacher.joblib", "--loss", "l2"],
        "invalid choice: 'l2'",
    ),
    "unfitted model": (["certify", "{d}/unfitted.joblib", "{d}/test.npz"], "is not fitted"),
    "unfitted report model": (
        ["report", "{d}/unfitted.joblib", "--data", "{d}/test.npz"],
        "is not fitted",
    ),
    "unfitted teacher": (
        ["distill", "{d}/train.npz", "--teacher", "{d}/unfitted.joblib"],
        "is not fitted",
    ),
    "teacher not a model": (
        ["distill", "{d}/train.npz", "--teacher", "{d}/dict.joblib"],
        "not a certdistill model",
    ),
    "distill bad input shape": (
        [
            "distill",
            "{d}/test.npz",
            "--teacher",
            "{d}/teacher.joblib",
            "--input-shape",
            "1,7,7",
            "--output",
            "{d}/unused.joblib",
        ],
        "49 features",
    ),
    **(
        {}
        if torch.cuda.is_available()
        else {
            "cuda": (["train", "{d}/train.npz", "--device", "cuda"], "CUDA is not available"),
            "distill cuda": (
                ["distill", "{d}/train.npz", "--teacher", "{d}/teacher.joblib", "--device", "cuda"],
                "CUDA is not available",
            ),
        }
    ),
}


def test_safe_format_from_train_to_certify(files, tmp_path):
    """``.cdsafe`` outputs are written in the safe format, and read back by every command."""
    import certdistill

    teacher, student = tmp_path / "teacher.cdsafe", tmp_path / "student.cdsafe"
    assert (
        main(
            [
                "train",
                str(files / "train.npz"),
                "--method",
                "ibp",
                "--output",
                str(teacher),
                *TINY_MLP,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "distill",
                str(files / "train.npz"),
                "--teacher",
                str(teacher),
                "--output",
                str(student),
                *TINY_MLP,
            ]
        )
        == 0
    )
    assert student.read_bytes().startswith(b"certdistill-safe\n")
    loaded = certdistill.load(student)  # no pickle involved
    assert type(loaded.teacher_).__name__ == "CertifiedTeacher"
    results = tmp_path / "certificates.csv"
    assert (
        main(
            [
                "certify",
                str(student),
                str(files / "test.npz"),
                "--output",
                str(results),
                "--method",
                "crown",
            ]
        )
        == 0
    )
    with open(results) as handle:
        rows = list(csv.DictReader(handle))
    data = np.load(files / "test.npz")
    assert len(rows) == len(data["y"])
    cert = loaded.certify(data["X"], eps=loaded.eps, method="crown", y=data["y"])
    assert [row["certified"] for row in rows] == [str(c) for c in cert.certified]


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_without_traceback(case, files, fitted, capsys):
    argv, expected = ERRORS[case]
    status = main([arg.format(d=files) for arg in argv])
    err = capsys.readouterr().err
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("certdistill: error: ") and expected in lines[0]
    assert "Traceback" not in err


def test_files_that_are_small_or_have_new_labels_are_accepted(files, fitted, tmp_path, capsys):
    """The valid cells of the bad-input matrix: one sample or one class to certify and report,
    labels never seen before to train."""
    for name in ("one_sample.npz", "one_class.npz"):
        assert main(["certify", str(files / "teacher.joblib"), str(files / name)]) == 0
        assert (
            main(
                [
                    "report",
                    str(files / "teacher.joblib"),
                    "--data",
                    str(files / name),
                    "--pgd-steps",
                    "1",
                ]
            )
            == 0
        )
    assert (
        main(
            [
                "train",
                str(files / "unknown_label.npz"),
                "--output",
                str(tmp_path / "model.joblib"),
                *TINY_MLP,
            ]
        )
        == 0
    )
    assert "10 classes" in capsys.readouterr().out


def test_interrupted_fit_saves_nothing(files, tmp_path, monkeypatch, capsys):
    from certdistill.cli import _progress

    def interrupt(self, net, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_progress.FitProgress, "on_epoch_end", interrupt)
    model = tmp_path / "model.joblib"
    assert main(["train", str(files / "train.npz"), "--output", str(model), *TINY_MLP]) == 130
    assert not model.exists()
    assert capsys.readouterr().err.strip().endswith("certdistill: interrupted")


def test_fit_interrupted_in_its_last_epoch_saves_nothing(files, tmp_path, monkeypatch, capsys):
    # All epochs have a history row, but the last one did not finish: still not a whole fit.
    from certdistill.cli import _progress

    original = _progress.FitProgress.on_epoch_end

    def interrupt_last(self, net, **kwargs):
        if len(net.history) == net.max_epochs:
            raise KeyboardInterrupt
        original(self, net, **kwargs)

    monkeypatch.setattr(_progress.FitProgress, "on_epoch_end", interrupt_last)
    model = tmp_path / "model.joblib"
    assert main(["train", str(files / "train.npz"), "--output", str(model), *TINY_MLP]) == 130
    assert not model.exists()
    err = capsys.readouterr().err.strip()
    assert err.endswith("certdistill: interrupted") and "UserWarning" not in err


def _run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "certdistill", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_subprocess_error_and_help(files):
    result = _run("certify", str(files / "dict.joblib"), str(files / "test.npz"))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("certdistill: error: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    result = _run("demo", "--help")
    assert result.returncode == 0 and "--student-epochs" in result.stdout


def test_debug_shows_the_traceback(files):
    with pytest.raises(CLIError, match="not a certdistill model"):
        main(["certify", str(files / "dict.joblib"), str(files / "test.npz"), "--debug"])


# ---------------------------------------------------------------------------------- help
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("command", ["demo", "train", "distill", "certify", "report"])
def test_help_explains_every_option(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: certdistill {command}" in capsys.readouterr().out
    for action in _subparsers()[command]._actions:
        assert action.help and action.help.strip(), action.dest


def test_top_level_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("demo", "train", "distill", "certify", "report"))
