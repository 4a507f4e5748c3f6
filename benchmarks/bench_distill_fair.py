"""A fair comparison of distilled students with students trained alone, judged by complete
verification.

For each data set (digits at eps 0.1, breast cancer at eps 0.05) and share of labelled training
rows (``--labelled``, e.g. 1.0 and 0.3; the other rows are given unlabelled), every contender gets
the same tuning budget:

1. **Tuning.** A validation split (20 %, stratified) is carved from the labelled training rows
   (never the test data). Each configuration of the contender's own knobs (``GRID``: 8 per
   contender) is fitted on the rest with seed 0 and scored on the validation split by certified
   accuracy (the default cascade of ``certify()``), clean accuracy breaking ties. All the
   configurations' (clean, certified) pairs on the validation split make the Pareto fronts.
2. **Measure.** The chosen configuration is refitted on all the training rows with seeds 0, 1, 2
   and measured on the test data: clean accuracy, certified accuracy by IBP, by CROWN and by
   complete verification (``method="complete"``), the share decided, and fit time.

Contenders (the same student network for all, the default of ``DistilledStudent``'s size rule is
not used: ``--hidden``):

* ``alone ibp``, ``alone crown-ibp`` and ``alone mtl-ibp``: ``CertifiedTeacher`` on the student
  network, trained on the labelled rows only;
* ``alone ibp, augmented``: the same, on the labelled rows plus as many noise and ball inputs per
  kind as the distilled student gets (its default ``transfer_size``;
  :func:`certdistill.estimators.transfer.transfer_inputs`), each with the label of the row it was
  made
  from: is a gain the teacher's, or the augmentation's?
* ``distilled``: ``DistilledStudent`` with its default loss (selective loss, teacher-labelled
  transfer inputs, unlabelled rows labelled by the teacher), its teacher a default
  ``CertifiedTeacher`` fitted on the labelled rows of the run, tuned like the others;
  ``distilled, defaults``: the same untuned, every knob at its default (the user's student);
* ``distilled, baseline``, ``distilled, soft-certified``, ``distilled, margin``: the other
  distillation losses (KL to the teacher's clean and worst-case logits, soft labels, margin
  matching), with the same transfer set, tuned over their weight, temperature and training
  radius;
* ``ad-cert, certified teacher`` and ``ad-cert, adversarial teacher``: the seed recipe, AD-CERT's
  expressive loss (``loss="adversarial"``: the student's IBP loss mixed with KL to the teacher's
  logits at the student's 5-step PGD point, weight tuned; no transfer set), from the default
  certified teacher or from one trained by PGD alone (``CertifiedTeacher(method="mtl-ibp",
  alpha=0.0, pgd_steps=5)``, worst-case targets by PGD, ``teacher_bounds="pgd"``).

The ones not in ``DEFAULT_CONTENDERS`` run when named in ``--contenders``.

Run: python benchmarks/bench_distill_fair.py [--data digits breast_cancer] [--labelled 1.0 0.3]
[--seeds 0 1 2] [--hidden 32] [--contenders ...] [--plot DIR [--suffix _NAME]]. Prints markdown
tables and the command that reproduces them; with ``--plot``, writes the Pareto fronts as PNG
files.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, from anywhere
from benchmarks.bench_distill import load as load_split  # noqa: E402
from certdistill import CertifiedTeacher, DistilledStudent  # noqa: E402
from certdistill.estimators.transfer import transfer_inputs  # noqa: E402

RATIOS = [1.0, 1.25, 1.5, 2.0]
#: Contender -> the knobs it is tuned over (each product of values is one configuration; 8 per
#: contender, 1 for the untuned default).
GRID = {
    "alone ibp": {"eps_train_ratio": RATIOS, "kappa_end": [0.0, 0.5]},
    "alone ibp, augmented": {"eps_train_ratio": RATIOS, "kappa_end": [0.0, 0.5]},
    "alone crown-ibp": {"eps_train_ratio": RATIOS, "beta_end": [0.0, 0.5]},
    "alone mtl-ibp": {"alpha": [0.5, 0.8], "eps_train_ratio": RATIOS},
    "distilled": {
        "distill_weight": [0.5, 1.0],
        "temperature": [0.25, 1.0],
        "eps_train_ratio": [1.0, 1.5],
    },
    "distilled, defaults": {},
    "distilled, baseline": {
        "distill_weight": [0.25, 0.5],
        "temperature": [1.0, 4.0],
        "eps_train_ratio": [1.0, 1.5],
    },
    "distilled, soft-certified": {
        "distill_weight": [0.3, 0.6],
        "temperature": [1.0, 4.0],
        "eps_train_ratio": [1.0, 1.5],
    },
    "distilled, margin": {
        "distill_weight": [0.2, 0.5],
        "temperature": [1.0, 4.0],
        "eps_train_ratio": [1.0, 1.5],
    },
    "ad-cert, certified teacher": {
        "distill_weight": [0.2, 0.4, 0.6, 0.8],
        "eps_train_ratio": [1.0, 1.5],
    },
    "ad-cert, adversarial teacher": {
        "distill_weight": [0.2, 0.4, 0.6, 0.8],
        "eps_train_ratio": [1.0, 1.5],
    },
}
DEFAULT_CONTENDERS = (
    "alone ibp",
    "alone ibp, augmented",
    "alone mtl-ibp",
    "distilled",
    "distilled, defaults",
)
AD_CERT = dict(loss="adversarial", pgd_steps=5, transfer=())
#: Contender -> (its teacher: None for a student trained alone, else the teacher's kind of
#: ``teachers_for``; the fixed parameters of its estimator).
SETUP = {
    "alone ibp": (None, dict(method="ibp")),
    "alone ibp, augmented": (None, dict(method="ibp")),
    "alone crown-ibp": (None, dict(method="crown-ibp")),
    "alone mtl-ibp": (None, dict(method="mtl-ibp", pgd_steps=5)),
    "distilled": ("certified", {}),
    "distilled, defaults": ("certified", {}),
    "distilled, baseline": ("certified", dict(loss="baseline")),
    "distilled, soft-certified": ("certified", dict(loss="soft-certified")),
    "distilled, margin": ("certified", dict(loss="margin")),
    "ad-cert, certified teacher": ("certified", AD_CERT),
    "ad-cert, adversarial teacher": ("adversarial", dict(AD_CERT, teacher_bounds="pgd")),
}
#: The distilled student's transfer set size (its default), given to the augmented contender too.
TRANSFER_SIZE = DistilledStudent(teacher=None).transfer_size


def load(name: str, seed: int = 0):
    """Train/test split of a bundled data set scaled to [0, 1], its eps and input shape."""
    return (*load_split(name, seed), (1, 8, 8) if name == "digits" else None)


def labelled_mask(y: np.ndarray, share: float, seed: int = 0) -> np.ndarray:
    """A stratified choice of ``share`` of the rows (all when ``share`` is 1)."""
    mask = np.zeros(len(y), dtype=bool)
    if share >= 1.0:
        mask[:] = True
        return mask
    chosen, _ = train_test_split(np.arange(len(y)), train_size=share, stratify=y, random_state=seed)
    mask[chosen] = True
    return mask


def make(
    contender: str, config: dict, *, eps: float, seed: int, hidden: tuple, teachers=None
) -> object:
    """The contender's estimator; ``teachers``: kind ("certified", "adversarial") -> teacher."""
    common = dict(eps=eps, lower=0.0, upper=1.0, random_state=seed, module__hidden_sizes=hidden)
    kind, fixed = SETUP[contender]
    if kind is None:
        return CertifiedTeacher(**fixed, **common, **config)
    return DistilledStudent(
        FrozenEstimator(teachers[kind]), unlabeled_label=-1, **fixed, **common, **config
    )


def augmented(X: np.ndarray, y: np.ndarray, eps: float, seed: int, size: float = 1.0):
    """The rows plus noise and ball inputs made from them (``size`` times the rows per kind, as
    the distilled student's ``transfer_size``), each labelled as its source row."""
    made, sources = transfer_inputs(
        X,
        ("noise", "ball"),
        size,
        np.float32(eps),
        lower=np.float32(0.0),
        upper=np.float32(1.0),
        input_shape=None,
        random_state=np.random.RandomState(seed),
        return_sources=True,
    )
    return np.concatenate([X, made]), np.concatenate([y, y[sources]])


def fit(contender: str, estimator, X, y, mask, eps: float = 0.0, seed: int = 0):
    """Fit on the labelled rows (alone) or on every row, the unlabelled ones marked -1."""
    start = time.perf_counter()
    if contender == "alone ibp, augmented":
        estimator.fit(*augmented(X[mask], y[mask], eps, seed, TRANSFER_SIZE))
    elif SETUP[contender][0] is None:
        estimator.fit(X[mask], y[mask])
    else:
        estimator.fit(X, np.where(mask, y, -1))
    return time.perf_counter() - start


def teacher_for(X, y, mask, *, eps, input_shape, seed, adversarial=False, method=None):
    """The default certified teacher (trained by ``method`` when given), or (``adversarial``)
    the same network trained by PGD."""
    shape = {"input_shape": input_shape} if input_shape else {"module__hidden_sizes": (256, 256)}
    training = dict(method="mtl-ibp", alpha=0.0, pgd_steps=5) if adversarial else {}
    if method is not None and not adversarial:
        training["method"] = method
    return CertifiedTeacher(
        eps=eps, lower=0.0, upper=1.0, random_state=seed, **shape, **training
    ).fit(X[mask], y[mask])


def teachers_for(contenders, X, y, mask, **kwargs) -> dict:
    """The teachers the contenders need, by kind."""
    teachers = {}
    kinds = {SETUP[c][0] for c in contenders}
    if "certified" in kinds:
        teachers["certified"] = teacher_for(X, y, mask, **kwargs)
    if "adversarial" in kinds:
        teachers["adversarial"] = teacher_for(X, y, mask, adversarial=True, **kwargs)
    return teachers


def tune(data: str, share: float, hidden: tuple, contenders=DEFAULT_CONTENDERS):
    """Each contender's configurations on the validation split; the chosen one per contender."""
    X, _, y, _, eps, input_shape = load(data)
    mask = labelled_mask(y, share)
    labelled = np.flatnonzero(mask)
    fit_rows, valid_rows = train_test_split(
        labelled, test_size=0.2, stratify=y[labelled], random_state=0
    )
    tuning_mask = np.zeros(len(y), dtype=bool)
    tuning_mask[fit_rows] = True
    keep = np.setdiff1d(np.arange(len(y)), valid_rows)  # the validation rows are held out
    X_fit, y_fit, m_fit = X[keep], y[keep], tuning_mask[keep]
    teachers = teachers_for(
        contenders, X_fit, y_fit, m_fit, eps=eps, input_shape=input_shape, seed=0
    )
    scores, chosen = {}, {}
    for contender in contenders:
        grid = GRID[contender]
        results = []
        for values in itertools.product(*grid.values()):
            config = dict(zip(grid, values, strict=True))
            estimator = make(contender, config, eps=eps, seed=0, hidden=hidden, teachers=teachers)
            fit(contender, estimator, X_fit, y_fit, m_fit, eps, 0)
            clean = estimator.score(X[valid_rows], y[valid_rows])
            certified = estimator.certified_accuracy(X[valid_rows], y[valid_rows])
            results.append((config, clean, certified))
            print(
                f"  tune {data} {share:.0%} {contender} {config}: clean {clean:.3f} "
                f"certified {certified:.3f}",
                file=sys.stderr,
                flush=True,
            )
        scores[contender] = results
        chosen[contender] = max(results, key=lambda r: (r[2], r[1]))[0]
    return scores, chosen


def measure(data: str, share: float, hidden: tuple, chosen: dict, seeds) -> dict:
    """The chosen configurations refitted per seed, measured on the test data."""
    X, X_test, y, y_test, eps, input_shape = load(data)
    mask = labelled_mask(y, share)
    rows = {contender: [] for contender in chosen}
    for seed in seeds:
        teachers = teachers_for(chosen, X, y, mask, eps=eps, input_shape=input_shape, seed=seed)
        for contender, config in chosen.items():
            estimator = make(
                contender, config, eps=eps, seed=seed, hidden=hidden, teachers=teachers
            )
            seconds = fit(contender, estimator, X, y, mask, eps, seed)
            complete = estimator.certify(X_test, y=y_test, method="complete")
            rows[contender].append(
                dict(
                    clean=estimator.score(X_test, y_test),
                    ibp=estimator.certified_accuracy(X_test, y_test, method="ibp"),
                    crown=estimator.certified_accuracy(X_test, y_test, method="crown"),
                    complete=complete.certified_fraction,
                    decided=complete.decided_fraction,
                    seconds=seconds,
                )
            )
            print(
                f"  measure {data} {share:.0%} seed {seed} {contender}: {rows[contender][-1]}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def _mean_std(values) -> str:
    values = 100 * np.asarray(values)
    return f"{values.mean():.1f} ± {values.std():.1f}"


def table(rows: dict, chosen: dict) -> str:
    best_alone = max(
        (c for c in rows if SETUP[c][0] is None),
        key=lambda c: np.mean([r["complete"] for r in rows[c]]),
    )
    lines = [
        "| contender | chosen configuration | clean % | IBP % | CROWN % | complete % | "
        "gain vs best alone (per-seed range) | decided % | fit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for contender, results in rows.items():
        gains = [
            r["complete"] - a["complete"] for r, a in zip(results, rows[best_alone], strict=True)
        ]
        gain = (
            ""
            if contender == best_alone
            else f"{100 * np.mean(gains):+.1f} ({100 * min(gains):+.1f} to {100 * max(gains):+.1f})"
        )
        lines.append(
            f"| {contender} | {chosen[contender]} | "
            f"{_mean_std([r['clean'] for r in results])} | "
            f"{_mean_std([r['ibp'] for r in results])} | "
            f"{_mean_std([r['crown'] for r in results])} | "
            f"**{_mean_std([r['complete'] for r in results])}** | {gain} | "
            f"{100 * np.mean([r['decided'] for r in results]):.1f} | "
            f"{np.mean([r['seconds'] for r in results]):.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        nargs="+",
        default=["digits", "breast_cancer"],
        choices=["digits", "breast_cancer"],
    )
    parser.add_argument("--labelled", nargs="+", type=float, default=[1.0, 0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--hidden", nargs="+", type=int, default=[32])
    parser.add_argument(
        "--contenders", nargs="+", default=list(DEFAULT_CONTENDERS), choices=list(GRID)
    )
    parser.add_argument("--plot", help="folder for the Pareto-front PNG files")
    parser.add_argument("--suffix", default="", help="end of the PNG files' names")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden = tuple(args.hidden)
    for data, share in itertools.product(args.data, args.labelled):
        scores, chosen = tune(data, share, hidden, args.contenders)
        rows = measure(data, share, hidden, chosen, args.seeds)
        print(
            f"\n### {data}, {share:.0%} of the training labels, student "
            f"{'-'.join(map(str, hidden))} hidden, seeds {args.seeds}\n"
        )
        print(table(rows, chosen))
        fronts = {c: [(clean, cert) for _, clean, cert in results] for c, results in scores.items()}
        print(
            "\nValidation (clean, certified) of every tuned configuration: "
            + "; ".join(
                f"{c}: " + ", ".join(f"({a:.3f}, {b:.3f})" for a, b in points)
                for c, points in fronts.items()
            )
        )
        if args.plot:
            from certdistill.plotting import plot_pareto_fronts

            folder = Path(args.plot)
            folder.mkdir(parents=True, exist_ok=True)
            groups = {"alone": [p for c in fronts if SETUP[c][0] is None for p in fronts[c]]}
            groups.update({c: fronts[c] for c in fronts if SETUP[c][0] is not None})
            ax = plot_pareto_fronts(
                groups, title=f"{data}, {share:.0%} labels: tuned configurations (validation)"
            )
            path = folder / f"pareto_{data}_{int(round(100 * share))}{args.suffix}.png"
            ax.figure.savefig(path, dpi=110, bbox_inches="tight")
            print(f"\nfront: {path}")
    print(
        "\nReproduce: python benchmarks/bench_distill_fair.py "
        + shlex.join(sys.argv[1:] if argv is None else argv)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
