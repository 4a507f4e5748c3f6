"""VNN-COMP verification: an ONNX network and a VNN-LIB property in, ``sat`` or ``unsat`` out.

:func:`verify` decides one property (:mod:`certdistill.io.vnnlib`) of one network with the
certification cascade: each case of the property (an input box and the disjuncts of its unsafe
output set ``C @ y <= d``) becomes one sample whose box is certified against a specification
folded into the network as one more linear layer, with outputs ``[0, d_1 - c_1 @ y, ...]`` for
the rows ``c_r @ y <= d_r`` of the disjuncts and reference class 0:

* the margins ``z_0 - z_r = c_r @ y - d_r`` are what bound propagation bounds below, so a case
  whose margins are all positive has no input satisfying any single-row disjunct (``unsat``),
  and the exact composition of the two last linear layers keeps the bounds as tight as for the
  network's own margins;
* an input at which class ``r`` wins has ``c_r @ y < d_r``: a counterexample of a single-row
  disjunct. Complete verification (``method="complete"``: attacks, branch and bound, MILP) works
  unchanged.

A disjunct of several rows (a conjunction, as in ACAS Xu) is ruled out when one of its rows is:
it is decided with the incomplete bounds only, and left ``unknown`` otherwise. Every
counterexample is checked on the network itself before ``sat`` is reported: clipped into the
box in float64, rounded inwards to float32, run through onnxruntime when the network is an ONNX
file (through the module in float64 otherwise), and every row of one disjunct must hold.

:func:`verify_instances` runs a VNN-COMP instances file, batching the instances of one network
whose properties are plain robustness properties (every other class against one label) into one
certification, so their bounds run together.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from certdistill.io.vnnlib import VnnlibCase, VnnlibProperty, parse_vnnlib

__all__ = [
    "RESULTS",
    "InstanceResult",
    "VerificationResult",
    "read_instances",
    "verify",
    "verify_instances",
]

#: The answers of a verification, as VNN-COMP spells them.
RESULTS = ("sat", "unsat", "timeout", "unknown")

#: Bound stages used for disjuncts of several rows (conjunctions), which the search stages'
#: single-class counterexamples cannot falsify.
_CONJUNCTION_STAGES = ("ibp", "crown", "alpha-crown")


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of :func:`verify`.

    Attributes
    ----------
    result : {"sat", "unsat", "timeout", "unknown"}
        ``unsat``: the property holds (no input of any box reaches the unsafe set); ``sat``: a
        counterexample was found and checked; ``timeout``: the time ran out first; ``unknown``:
        the methods gave up before it (e.g. a conjunction the bounds could not rule out).
    seconds : float
        Wall-clock seconds, loading the network and the property included.
    counterexample : ndarray or None
        For ``sat``: the flat input (float32 values, inside the box).
    output : ndarray or None
        For ``sat``: the network's flat output at ``counterexample``.
    """

    result: str
    seconds: float
    counterexample: np.ndarray | None = None
    output: np.ndarray | None = None

    def results_text(self) -> str:
        """The VNN-COMP results file: the answer, and for ``sat`` the assignment
        ``((X_0 v) ... (Y_0 v))``."""
        lines = [self.result]
        if self.result == "sat" and self.counterexample is not None:
            pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(self.counterexample)]
            pairs += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(self.output)]
            lines.append("(" + "\n ".join(pairs) + ")")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class InstanceResult:
    """One row of :func:`verify_instances`: the instance as the CSV names it and its outcome."""

    onnx: str
    vnnlib: str
    timeout: float
    outcome: VerificationResult


# ------------------------------------------------------------------------------ one property
def verify(
    model,
    prop,
    *,
    timeout: float = 300.0,
    method: str | Sequence[str] = "complete",
    batch_size: int = 256,
    verbose: int = 0,
) -> VerificationResult:
    """Decide a VNN-LIB property of a network.

    Parameters
    ----------
    model : str, path-like or torch.nn.Module
        An ``.onnx`` file (read by :func:`~certdistill.load_onnx`), or a module taking samples of
        ``model.input_shape`` if it has that attribute, else flat rows of ``n_inputs`` values.
    prop : str, path-like or VnnlibProperty
        A ``.vnnlib`` file (``.vnnlib.gz`` too) or a parsed property.
    timeout : float, default=300.0
        Seconds for the whole call; the search stages stop when it runs out.
    method : str or sequence of str, default="complete"
        Stages of :func:`~certdistill.certify` for single-row disjuncts.
    batch_size : int, default=256
        Boxes bounded at once.
    verbose : int, default=0
        Progress of the search stages on stderr when > 0.

    Returns
    -------
    VerificationResult

    Raises
    ------
    ValueError
        For a non-positive timeout, a property whose numbers of inputs or outputs differ from
        the network's, or a malformed property file (:class:`~certdistill.io.vnnlib.
        VnnlibError`, with its line number).
    """
    start = time.perf_counter()
    timeout = _check_timeout(timeout)
    from certdistill.certification.certify import as_module

    module = as_module(model)
    onnx_path = os.fspath(model) if isinstance(model, str | os.PathLike) else None
    if not isinstance(prop, VnnlibProperty):
        prop = parse_vnnlib(prop)
    checker = _Checker(module, onnx_path, prop)
    deadline = start + timeout
    outcomes = []
    for spec_rows, cases in _groups(prop.cases):
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            outcomes.append("timeout")
            break
        found = checker.decide(
            cases,
            spec_rows,
            method=method,
            budget=remaining,
            batch_size=batch_size,
            verbose=verbose,
        )
        if isinstance(found, VerificationResult):
            return VerificationResult(
                "sat", time.perf_counter() - start, found.counterexample, found.output
            )
        outcomes.append(found)
    seconds = time.perf_counter() - start
    if all(outcome == "unsat" for outcome in outcomes) and len(outcomes) == len(
        _groups(prop.cases)
    ):
        return VerificationResult("unsat", seconds)
    if seconds >= timeout or "timeout" in outcomes:
        return VerificationResult("timeout", seconds)
    return VerificationResult("unknown", seconds)


def _check_timeout(timeout) -> float:
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(
            f"timeout must be a positive number of seconds, got {timeout!r}."
        ) from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    return value


def _groups(cases: Sequence[VnnlibCase]) -> list[tuple[tuple, list[VnnlibCase]]]:
    """Cases with the same output disjuncts, which one specification layer serves together."""
    groups: dict[bytes, tuple[tuple, list[VnnlibCase]]] = {}
    for case in cases:
        key = b"|".join(c.C.tobytes() + b"/" + c.d.tobytes() for c in case.disjuncts)
        groups.setdefault(key, (tuple(case.disjuncts), []))[1].append(case)
    return list(groups.values())


def _specification_layer(disjuncts, n_outputs: int) -> nn.Linear:
    """The linear map ``y -> [0, d_1 - c_1 @ y, ..., d_R - c_R @ y]`` over every row."""
    C = np.concatenate([c.C for c in disjuncts]) if disjuncts else np.zeros((0, n_outputs))
    d = np.concatenate([c.d for c in disjuncts]) if disjuncts else np.zeros(0)
    layer = nn.Linear(n_outputs, 1 + C.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(np.concatenate([np.zeros((1, n_outputs)), -C])))
        layer.bias.copy_(torch.as_tensor(np.concatenate([[0.0], d])))
    return layer


class _Checker:
    """Certifies groups of cases of one property and checks counterexamples on the network."""

    def __init__(self, module: nn.Module, onnx_path: str | None, prop: VnnlibProperty):
        self.module = module
        self.onnx_path = onnx_path
        self.prop = prop
        self.input_shape = tuple(getattr(module, "input_shape", (prop.n_inputs,)))
        if int(np.prod(self.input_shape)) != prop.n_inputs:
            raise ValueError(
                f"the property has {prop.n_inputs} inputs, the network takes samples of shape "
                f"{self.input_shape} ({int(np.prod(self.input_shape))} values)."
            )
        self.dtype = next((p.dtype for p in module.parameters()), torch.float32)
        with torch.no_grad():
            was_training = module.training
            module.eval()
            probe = module(torch.zeros(1, *self.input_shape, dtype=self.dtype))
            module.train(was_training)
        if probe.dim() != 2 or probe.shape[1] != prop.n_outputs:
            raise ValueError(
                f"the property has {prop.n_outputs} outputs, the network computes "
                f"{tuple(probe.shape[1:])}."
            )
        self._session = None

    def decide(
        self,
        cases: list[VnnlibCase],
        disjuncts: tuple,
        *,
        method,
        budget: float,
        batch_size: int,
        verbose: int,
    ):
        """``"unsat"``, ``"unknown"`` / ``"timeout"``, or a checked counterexample."""
        from certdistill.certification.certify import certify

        if not disjuncts:
            return "unsat"  # an empty disjunction never holds
        single_rows = all(c.C.shape[0] == 1 for c in disjuncts)
        network = nn.Sequential(self.module, _specification_layer(disjuncts, self.prop.n_outputs))
        network = network.to(self.dtype).eval()
        lower = np.stack([case.lower for case in cases]).reshape(len(cases), *self.input_shape)
        upper = np.stack([case.upper for case in cases]).reshape(len(cases), *self.input_shape)
        center = (lower + upper) / 2
        started = time.perf_counter()
        cert = certify(
            network,
            center,
            None,
            lower=lower,
            upper=upper,
            y=np.zeros(len(cases), dtype=np.int64),
            method=method if single_rows else _CONJUNCTION_STAGES,
            timeout=budget,
            budget=budget,
            batch_size=batch_size,
            verbose=verbose,
        )
        for index in np.flatnonzero(cert.status == "falsified"):
            checked = self.check(cert.counterexample[index].reshape(-1), cases[index], disjuncts)
            if checked is not None:
                return checked
        if single_rows:
            proven = cert.status == "certified"
        else:
            proven = self._conjunctions_ruled_out(cert.margins, disjuncts)
        if proven.all():
            return "unsat"
        return "timeout" if time.perf_counter() - started >= budget else "unknown"

    @staticmethod
    def _conjunctions_ruled_out(margins: np.ndarray, disjuncts) -> np.ndarray:
        """Per case: every disjunct has a row whose bound proves it violated."""
        row = 1  # column 0 is the reference
        ruled_out = np.ones(margins.shape[0], dtype=bool)
        for disjunct in disjuncts:
            rows = margins[:, row : row + disjunct.C.shape[0]]
            ruled_out &= (rows > 0).any(axis=1)
            row += disjunct.C.shape[0]
        return ruled_out

    # ------------------------------------------------------------- counterexamples
    def check(self, point: np.ndarray, case: VnnlibCase, disjuncts) -> VerificationResult | None:
        """``point`` as a counterexample inside the box that the network itself confirms."""
        x64 = np.clip(np.asarray(point, dtype=np.float64), case.lower, case.upper)
        x32 = x64.astype(np.float32)
        # Round inwards so the float32 values the network runs on lie in the box.
        x32 = np.where(
            x32.astype(np.float64) < case.lower, np.nextafter(x32, np.float32(np.inf)), x32
        )
        x32 = np.where(
            x32.astype(np.float64) > case.upper, np.nextafter(x32, np.float32(-np.inf)), x32
        )
        if (x32 < case.lower).any() or (x32 > case.upper).any():
            return None
        y = self.outputs(x32)
        for disjunct in disjuncts:
            if np.all(disjunct.C @ y <= disjunct.d):
                return VerificationResult("sat", 0.0, x32, y)
        return None

    def outputs(self, x32: np.ndarray) -> np.ndarray:
        """The network's flat output at the flat input ``x32``, as it is deployed."""
        if self.onnx_path is not None:
            session = self._onnxruntime()
            if session is not None:
                meta = session.get_inputs()[0]
                shape = [d if isinstance(d, int) and d > 0 else 1 for d in meta.shape]
                out = session.run([self.module.onnx_output], {meta.name: x32.reshape(shape)})[0]
                return np.asarray(out, dtype=np.float64).reshape(-1)
        import copy

        reference = copy.deepcopy(self.module).double().eval()
        with torch.no_grad():
            x = torch.as_tensor(x32.astype(np.float64)).reshape(1, *self.input_shape)
            return reference(x).reshape(-1).numpy()

    def _onnxruntime(self):
        if self._session is None:
            try:
                import onnxruntime
            except ImportError:
                return None
            self._session = onnxruntime.InferenceSession(
                self.onnx_path, providers=["CPUExecutionProvider"]
            )
        return self._session


# ------------------------------------------------------------------------------ instances
def read_instances(path: str | os.PathLike) -> list[tuple[str, str, float]]:
    """Rows ``(onnx, vnnlib, timeout)`` of a VNN-COMP instances CSV (paths as written).

    Raises
    ------
    ValueError
        For a row without three fields or with a timeout that is not a positive number (the
        message gives the line number).
    """
    rows = []
    with open(path, newline="") as handle:
        for number, fields in enumerate(csv.reader(handle), start=1):
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != 3:
                raise ValueError(
                    f"{path}, line {number}: expected onnx,vnnlib,timeout, got "
                    f"{len(fields)} fields."
                )
            onnx_file, vnnlib_file, timeout = (f.strip() for f in fields)
            try:
                seconds = _check_timeout(timeout)
            except ValueError:
                raise ValueError(
                    f"{path}, line {number}: timeout {timeout!r} is not a positive number."
                ) from None
            rows.append((onnx_file, vnnlib_file, seconds))
    return rows


def verify_instances(
    path: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    results_dir: str | os.PathLike | None = None,
    method: str | Sequence[str] = "complete",
    batch: bool = True,
    verbose: int = 0,
    on_result=None,
) -> list[InstanceResult]:
    """Verify every instance of a VNN-COMP instances CSV.

    Parameters
    ----------
    path : str or path-like
        The CSV (``onnx,vnnlib,timeout`` per row; paths relative to its folder).
    output : str or path-like, optional
        Write ``onnx,vnnlib,result,seconds`` per instance there.
    results_dir : str or path-like, optional
        Write one VNN-COMP results file per instance there (``<row>_<vnnlib stem>.txt``).
    method : str or sequence of str, default="complete"
        Stages of :func:`~certdistill.certify`.
    batch : bool, default=True
        Certify the plain robustness properties of one network together (one call, the sum of
        their timeouts as budget, each sample's search limited to its own timeout). Their
        ``seconds`` are then the batch's time shared equally: the total is exact, the split is
        not.
    verbose : int, default=0
        Progress on stderr when > 0.
    on_result : callable, optional
        Called with each :class:`InstanceResult` as it is decided.

    Returns
    -------
    list of InstanceResult
        In the order of the CSV.
    """
    base = Path(path).parent
    rows = read_instances(path)
    results: list[InstanceResult | None] = [None] * len(rows)

    def record(index: int, outcome: VerificationResult) -> None:
        onnx_file, vnnlib_file, timeout = rows[index]
        results[index] = InstanceResult(onnx_file, vnnlib_file, timeout, outcome)
        if on_result is not None:
            on_result(results[index])

    by_network: dict[str, list[int]] = {}
    for index, (onnx_file, _, _) in enumerate(rows):
        by_network.setdefault(onnx_file, []).append(index)
    for onnx_file, indices in by_network.items():
        model_path = str(base / onnx_file)
        props = {i: parse_vnnlib(base / rows[i][1]) for i in indices}
        batched = [i for i in indices if batch and _plain_robustness(props[i])]
        if len(batched) > 1:
            for index, outcome in _verify_batch(
                model_path,
                [props[i] for i in batched],
                [rows[i][2] for i in batched],
                batched,
                method=method,
                verbose=verbose,
            ):
                record(index, outcome)
        else:
            batched = []
        for index in indices:
            if index not in batched:
                record(
                    index,
                    verify(
                        model_path,
                        props[index],
                        timeout=rows[index][2],
                        method=method,
                        verbose=verbose,
                    ),
                )
    finished = [r for r in results if r is not None]
    _write_results(finished, output, results_dir)
    return finished


def _write_results(
    finished: list[InstanceResult],
    output: str | os.PathLike | None,
    results_dir: str | os.PathLike | None,
) -> None:
    """The summary CSV at ``output`` and one VNN-COMP results file per instance in
    ``results_dir``, for those given."""
    if output is not None:
        with open(output, "w", newline="") as handle:
            writer = csv.writer(handle)
            for r in finished:
                writer.writerow([r.onnx, r.vnnlib, r.outcome.result, f"{r.outcome.seconds:.3f}"])
    if results_dir is not None:
        folder = Path(results_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for number, r in enumerate(finished):
            stem = Path(r.vnnlib).name.removesuffix(".gz").removesuffix(".vnnlib")
            (folder / f"{number:04d}_{stem}.txt").write_text(r.outcome.results_text())


def _plain_robustness(prop: VnnlibProperty) -> bool:
    """One box, and the disjuncts "class j >= label" for every other class j."""
    form = prop.margin_form()
    if form is None or len(prop.cases) != 1:
        return False
    label, classes = form
    return sorted(classes) == [j for j in range(prop.n_outputs) if j != label]


def _verify_batch(
    model_path: str,
    props: list[VnnlibProperty],
    timeouts: list[float],
    indices: list[int],
    *,
    method,
    verbose: int,
):
    """Certify plain robustness properties of one network in one call (their labels as y)."""
    from certdistill.certification.certify import as_module, certify

    start = time.perf_counter()
    module = as_module(model_path)
    checkers = [_Checker(module, model_path, prop) for prop in props]
    shape = checkers[0].input_shape
    lower = np.stack([p.cases[0].lower for p in props]).reshape(len(props), *shape)
    upper = np.stack([p.cases[0].upper for p in props]).reshape(len(props), *shape)
    labels = np.array([p.margin_form()[0] for p in props])
    cert = certify(
        module,
        (lower + upper) / 2,
        None,
        lower=lower,
        upper=upper,
        y=labels,
        method=method,
        timeout=max(timeouts),
        budget=sum(timeouts),
        verbose=verbose,
    )
    answers = []
    for k, prop in enumerate(props):
        case = prop.cases[0]
        if cert.status[k] == "certified":
            answers.append(("unsat", None))
            continue
        if cert.status[k] == "falsified":
            found = checkers[k].check(cert.counterexample[k].reshape(-1), case, case.disjuncts)
            if found is not None:
                answers.append(("sat", found))
                continue
        answers.append(("timeout" if cert.status[k] == "unknown" else "unknown", None))
    share = (time.perf_counter() - start) / len(props)
    for index, (answer, found) in zip(indices, answers, strict=True):
        if found is not None:
            yield index, VerificationResult("sat", share, found.counterexample, found.output)
        else:
            yield index, VerificationResult(answer, share)
