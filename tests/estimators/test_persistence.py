"""Persistence: the safe single-file format (certdistill.save/load) and joblib, in fresh processes.

A model loaded in a new interpreter (which shares nothing with the test but the file) must
predict, give probabilities, certificates and scores bit for bit as the saved one. The safe format
must also refuse what it cannot store, and turn a damaged file into a clear ``ValueError``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from digits import SMALL_FIT, small_digits
from model_outputs import model_outputs
from sklearn.base import clone
from sklearn.frozen import FrozenEstimator
from torch import nn

import certdistill
from certdistill import CertifiedTeacher, DistilledStudent
from certdistill.estimators._architecture import build_module, describe_module
from certdistill.estimators.persistence import MAGIC, SafeFormatError

TEACHER = {**SMALL_FIT, "method": "crown-ibp", "module__hidden_sizes": (24,)}
STUDENT = {**SMALL_FIT, "module__hidden_sizes": (12,)}


@pytest.fixture(scope="module")
def data():
    """240 digit images of 4 classes, scaled to [0, 1], with string labels."""
    X, y = small_digits(4, 240)
    return X, y, np.array(["zero", "one", "two", "three"])[y]


@pytest.fixture(scope="module")
def teacher(data):
    X, _, names = data
    return CertifiedTeacher(**TEACHER).fit(X, names)


@pytest.fixture(scope="module")
def student(data, teacher):
    X, _, names = data
    return DistilledStudent(FrozenEstimator(teacher), **STUDENT).fit(X, names)


def _save(model, path, fmt):
    if fmt == "safe":
        certdistill.save(model, path)
    else:
        joblib.dump(model, path)


@pytest.mark.parametrize("fmt", ["safe", "joblib"])
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_round_trip_in_a_fresh_process(data, teacher, student, tmp_path, which, fmt):
    X, _, names = data
    model = {"teacher": teacher, "student": student}[which]
    path = tmp_path / f"model.{fmt}"
    _save(model, path, fmt)
    np.savez(tmp_path / "test.npz", X=X[:60], y=names[:60])
    # a fresh interpreter: the file is all it gets from this test
    script = Path(__file__).parent.parent / "model_outputs.py"
    subprocess.run(
        [
            sys.executable,
            str(script),
            str(path),
            str(tmp_path / "test.npz"),
            str(tmp_path / "out.npz"),
            fmt,
        ],
        check=True,
        timeout=120,
    )
    got = np.load(tmp_path / "out.npz", allow_pickle=False)
    expected = model_outputs(model, X[:60], names[:60])
    assert sorted(got.files) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
        assert got[key].dtype == value.dtype, key  # string labels come back as strings
    assert got["certified_crown"].any()  # the comparison covers certified samples too


def test_safe_round_trip_keeps_parameters_attributes_and_history(teacher, data, tmp_path):
    path = certdistill.save(teacher, tmp_path / "teacher.cdsafe")
    loaded = certdistill.load(path)
    assert type(loaded) is CertifiedTeacher
    assert loaded.get_params(deep=False) == teacher.get_params(deep=False)
    assert loaded.get_params()["module__hidden_sizes"] == (24,)  # a tuple stays a tuple
    np.testing.assert_array_equal(loaded.classes_, teacher.classes_)
    assert loaded.classes_.dtype == teacher.classes_.dtype
    assert loaded.n_features_in_ == teacher.n_features_in_ == 64
    assert list(loaded.history) == json.loads(json.dumps(list(teacher.history)))
    assert loaded.history[-1, "eps"] == pytest.approx(teacher.eps_train)
    original = teacher.module_.state_dict()
    for key, tensor in loaded.module_.state_dict().items():
        assert torch.equal(tensor, original[key]) and tensor.dtype == original[key].dtype, key
    assert repr(loaded.module_) == repr(teacher.module_)
    # the network is a plain nn.Sequential of the supported layers, rebuilt from the description
    assert type(loaded.module_) is nn.Sequential


@pytest.mark.parametrize("labels", ["int", "str", "object", "float"])
def test_label_types_round_trip(data, tmp_path, labels):
    X, y, names = data
    target = {
        "int": y,
        "str": names,
        "object": names.astype(object),
        "float": y.astype(np.float64) + 0.0,
    }[labels]
    model = CertifiedTeacher(**dict(TEACHER, max_epochs=1, method="ibp")).fit(X, target)
    loaded = certdistill.load(certdistill.save(model, tmp_path / "m.cdsafe"))
    assert loaded.classes_.dtype == model.classes_.dtype
    np.testing.assert_array_equal(loaded.classes_, model.classes_)
    prediction = loaded.predict(X[:20])
    assert prediction.dtype == model.predict(X[:20]).dtype
    np.testing.assert_array_equal(prediction, model.predict(X[:20]))
    assert loaded.score(X, target) == model.score(X, target)


def test_student_keeps_its_teacher_and_can_be_refitted(data, student, tmp_path):
    X, _, names = data
    loaded = certdistill.load(certdistill.save(student, tmp_path / "student.cdsafe"))
    # FrozenEstimator(teacher) as parameter, the same teacher as teacher_: one object again
    assert isinstance(loaded.teacher, FrozenEstimator)
    assert loaded.teacher.estimator is loaded.teacher_
    assert type(loaded.teacher_) is CertifiedTeacher
    # refitting the loaded student gives the weights that refitting the original gives
    refit_loaded = loaded.fit(X, names)
    refit_original = clone(student).fit(X, names)
    for a, b in zip(
        refit_loaded.module_.state_dict().values(),
        refit_original.module_.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert refit_loaded.teacher_ is loaded.teacher.estimator


def test_teacher_identity_and_unfitted_template(data, teacher, tmp_path):
    X, _, names = data
    direct = DistilledStudent(teacher, **dict(STUDENT, max_epochs=1)).fit(X, names)
    loaded = certdistill.load(certdistill.save(direct, tmp_path / "direct.cdsafe"))
    assert loaded.teacher is loaded.teacher_  # stored once, loaded as one object
    template = CertifiedTeacher(**dict(TEACHER, max_epochs=1))
    inner = DistilledStudent(template, **dict(STUDENT, max_epochs=1)).fit(X, names)
    loaded = certdistill.load(certdistill.save(inner, tmp_path / "inner.cdsafe"))
    assert not hasattr(loaded.teacher, "n_features_in_")  # the template stays unfitted
    np.testing.assert_array_equal(loaded.teacher_.predict_proba(X), inner.teacher_.predict_proba(X))


def test_custom_module_instance_of_supported_layers(data, tmp_path):
    X, _, names = data
    torch.manual_seed(0)
    module = nn.Sequential(
        OrderedDict(
            [
                ("reshape", nn.Unflatten(1, (1, 8, 8))),
                (
                    "features",
                    nn.Sequential(
                        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2)
                    ),
                ),
                ("flat", nn.Flatten()),
                ("drop", nn.Dropout(0.1)),
                ("skip", nn.Identity()),
                (
                    "head",
                    nn.Sequential(
                        nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)
                    ),
                ),
            ]
        )
    )
    params = {k: v for k, v in TEACHER.items() if not k.startswith("module__")}
    model = CertifiedTeacher(module, **dict(params, max_epochs=2)).fit(X, names)
    loaded = certdistill.load(certdistill.save(model, tmp_path / "cnn.cdsafe"))
    assert loaded.module is loaded.module_  # the parameter is the fitted network, as before
    assert [name for name, _ in loaded.module_.named_children()] == [
        "reshape",
        "features",
        "flat",
        "drop",
        "skip",
        "head",
    ]
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    np.testing.assert_array_equal(loaded.certify(X[:30]).margins, model.certify(X[:30]).margins)


def test_architecture_description_round_trip():
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), bias=False),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.BatchNorm2d(4, eps=1e-3, momentum=None, affine=False),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        nn.Flatten(),
        nn.Unflatten(1, (4, 9)),
        nn.Flatten(start_dim=1, end_dim=-1),
        nn.Sequential(nn.Linear(36, 5), nn.ReLU(inplace=True), nn.Dropout(0.25)),
        nn.BatchNorm1d(5, track_running_stats=False),
        nn.Identity(),
        nn.Linear(5, 3, bias=False),
    )
    module[7].eval()  # a mixed train/eval state comes back as it was
    description = describe_module(module)
    rebuilt = build_module(json.loads(json.dumps(description)))
    rebuilt.load_state_dict(module.state_dict())
    assert repr(rebuilt) == repr(module)
    assert [m.training for m in rebuilt.modules()] == [m.training for m in module.modules()]
    x = torch.rand(5, 2, 7, 6)
    torch.testing.assert_close(rebuilt.eval()(x), module.eval()(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------- refusals
class _Tanhish(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


class _DoubledReLU(nn.ReLU):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (nn.Tanh(), "Tanh"),
        (_Tanhish(), "_Tanhish"),
        (_DoubledReLU(), "_DoubledReLU"),
        (nn.MaxPool1d(1), "MaxPool1d"),
    ],
)
def test_unsupported_layers_are_refused_with_a_pointer_to_joblib(data, tmp_path, layer, name):
    X, _, names = data
    module = nn.Sequential(nn.Linear(64, 8), layer, nn.Linear(8, 4))
    params = {k: v for k, v in TEACHER.items() if not k.startswith("module__")}
    # trained without perturbation: the bound engine would refuse these layers too
    model = CertifiedTeacher(module, **dict(params, eps_train_ratio=0.0, max_epochs=1))
    model.fit(X, names)
    path = tmp_path / "model.cdsafe"
    with pytest.raises(SafeFormatError, match=rf"(?s){name}.*joblib"):
        certdistill.save(model, path)
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-written
    joblib.dump(model, tmp_path / "model.joblib")  # joblib takes it


class _MyLoss(nn.CrossEntropyLoss):
    pass


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (dict(callbacks=[("noop", __import__("skorch").callbacks.EpochTimer())]), "callbacks"),
        (dict(criterion=_MyLoss), "criterion"),
        (dict(random_state=np.random.RandomState(0)), "random_state"),
        (dict(module=lambda: nn.Sequential(nn.Linear(64, 4))), "module"),
        (dict(lower=torch.zeros(64)), "lower"),
    ],
    ids=["callbacks", "custom-criterion", "RandomState", "module-function", "tensor"],
)
def test_parameters_that_are_not_data_are_refused(tmp_path, params, match):
    with pytest.raises(SafeFormatError, match=rf"(?s)parameter '{match}'.*joblib"):
        certdistill.save(CertifiedTeacher(**params), tmp_path / "m.cdsafe")


def test_subclasses_are_refused(tmp_path):
    class MyTeacher(CertifiedTeacher):
        pass

    with pytest.raises(SafeFormatError, match="MyTeacher"):
        certdistill.save(MyTeacher(), tmp_path / "m.cdsafe")


def test_unfitted_estimator_round_trip(tmp_path):
    model = CertifiedTeacher(
        eps=np.float32(0.1),
        lower=np.zeros(3, np.float32),
        upper=1.0,
        input_shape=(1, 1, 3),
        lr_milestones=[0.5],
        callbacks="disable",
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
    )
    loaded = certdistill.load(certdistill.save(model, tmp_path / "m.cdsafe"))
    got, expected = loaded.get_params(deep=False), model.get_params(deep=False)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
        assert type(got[key]) is type(value), key
    assert got["lower"].dtype == np.float32 and got["eps"].dtype == np.float32


# -------------------------------------------------------------------------- damaged files
@pytest.fixture
def saved(teacher, tmp_path):
    return certdistill.save(teacher, tmp_path / "teacher.cdsafe")


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.02, 0.0])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated|not a certdistill safe file"):
        certdistill.load(saved)


@pytest.mark.parametrize("where", [0.3, 0.6, 0.95, -1])
def test_tampered_byte(saved, where):
    data = bytearray(saved.read_bytes())
    position = int(len(data) * where) if where >= 0 else len(data) - 1
    data[position] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="altered"):
        certdistill.load(saved)


def test_tampered_header_and_trailing_bytes(saved):
    data = saved.read_bytes()
    saved.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="unexpected bytes"):
        certdistill.load(saved)
    saved.write_bytes(data.replace(b'"sha256"', b'"sha257"', 1))
    with pytest.raises(ValueError, match="header"):
        certdistill.load(saved)
    saved.write_bytes(data.replace(b"certdistill-safe", b"certdistill-safF", 1))
    with pytest.raises(ValueError, match="not a certdistill safe file"):
        certdistill.load(saved)


def test_joblib_file_is_not_unpickled(teacher, tmp_path):
    path = tmp_path / "teacher.joblib"
    joblib.dump(teacher, path)
    with pytest.raises(ValueError, match="joblib.load"):
        certdistill.load(path)


def _rewrite(path, edit, *, header_edit=None):
    """Edit the JSON document of a safe file and re-sign it (what a forger could do)."""
    data = path.read_bytes()
    end = data.index(b"\n", len(MAGIC))
    header = json.loads(data[len(MAGIC) : end])
    body = data[end + 1 :]
    document = json.loads(body[: header["config_bytes"]])
    weights = body[header["config_bytes"] :]
    edit(document)
    config = json.dumps(document).encode()
    header.update(config_bytes=len(config), sha256=hashlib.sha256(config + weights).hexdigest())
    if header_edit:
        header_edit(header)
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + config + weights)


def test_other_version_warns(saved, data):
    X, _, names = data

    def edit(document):
        document["certdistill_version"] = "0.0.1"

    _rewrite(saved, edit)
    with pytest.warns(UserWarning, match=r"saved with certdistill 0\.0\.1"):
        loaded = certdistill.load(saved)
    assert loaded.score(X, names) > 0


def test_newer_format_is_refused(saved):
    _rewrite(
        saved, lambda document: None, header_edit=lambda header: header.update(format_version=99)
    )
    with pytest.raises(ValueError, match="format version 99"):
        certdistill.load(saved)


def _set_optimizer(document, name):
    document["estimators"][0]["params"]["optimizer"] = {"__class__": name}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: _set_optimizer(d, "builtins.eval"), "allowed"),
        (lambda d: _set_optimizer(d, "os.system"), "allowed"),
        (lambda d: _set_optimizer(d, "torch.optim.Optimizer.__subclasses__"), "allowed"),
        (lambda d: _set_optimizer(d, "torch.nn.functional"), "allowed"),
        (lambda d: d["estimators"][0].update({"class": "Pipeline"}), "unknown estimator"),
        (
            lambda d: d["modules"][0]["children"][0][1].update({"type": "Tanh"}),
            "unknown layer type",
        ),
        (
            lambda d: d["modules"][0]["children"][0][1]["args"].update({"device": "meta"}),
            "unknown arguments",
        ),
        (
            lambda d: d["modules"][0]["children"][0][1]["args"].update({"out_features": 5}),
            "do not fit",
        ),
        (
            lambda d: d["estimators"][0]["fitted"]["classes_inferred_"].update({"dtype": "V8"}),
            "allowed",
        ),
        (lambda d: d.pop("estimators"), "malformed"),
    ],
    ids=[
        "eval",
        "os.system",
        "dunder",
        "not-a-class",
        "estimator",
        "layer",
        "layer-argument",
        "shape",
        "dtype",
        "malformed",
    ],
)
def test_forged_content_is_refused(saved, edit, match):
    _rewrite(saved, edit)
    with pytest.raises(ValueError, match=match):
        certdistill.load(saved)


def test_device_fallback_and_override(tmp_path):
    path = certdistill.save(CertifiedTeacher(device="cuda:0"), tmp_path / "m.cdsafe")
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="CUDA is not available"):
            assert certdistill.load(path).device == "cpu"
    assert certdistill.load(path, device="cpu").device == "cpu"


def test_save_is_atomic(teacher, tmp_path, monkeypatch):
    path = certdistill.save(teacher, tmp_path / "m.cdsafe")
    before = path.read_bytes()

    def failing_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        certdistill.save(teacher, path)
    assert path.read_bytes() == before  # the old file is untouched, no temporary file is left
    assert [p.name for p in tmp_path.iterdir()] == ["m.cdsafe"]
