"""Does distillation from a certified teacher pay? DistilledStudent variants against students
trained alone, over several seeds, on digits and breast cancer.

For every data set and seed it fits one certified teacher (``CertifiedTeacher(method="ibp")``:
the default CNN on digits, an MLP 30-256-256-2 on breast cancer), then the same small student
(MLP with one hidden layer of 32 units: 64-32-10 on digits, 30-32-2 on breast cancer) in every
configuration, all with the same epochs, learning rate and eps schedule:

* trained alone by each single-model method of ``CertifiedTeacher`` (ibp, crown-ibp, mtl-ibp);
* distilled from the teacher by each loss of ``DistilledStudent``.

Data: digits pixels / 16 with a stratified 70/30 split, eps = 0.1; breast cancer MinMax-scaled
(scaler fitted on the training part, test clipped to [0, 1]), stratified 70/30 split, eps = 0.05.
The split seed is the run's seed. Certified accuracy is "certified by any of IBP, CROWN-IBP and
CROWN" (each sound, so a sample certified by one is certified) at the evaluation eps.

It prints, per data set, one row per configuration with clean and certified accuracy (mean and
standard deviation over the seeds, in %), the certified gain over the best student trained alone
and the fit time; then the size and certify throughput of the student relative to its teacher.

Run ``python benchmarks/bench_distill.py`` (``--help`` for options). Fits run in ``--jobs``
processes with one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import MinMaxScaler

from certdistill import CertifiedTeacher, DistilledStudent

CERTIFY_METHODS = ("ibp", "crown-ibp", "crown")
SPEED_SAMPLES = 128

#: name -> (estimator kind, parameters). "alone" fits CertifiedTeacher on the student network.
CONFIGS = {
    "alone ibp": ("alone", {"method": "ibp"}),
    "alone crown-ibp": ("alone", {"method": "crown-ibp"}),
    "alone mtl-ibp": ("alone", {"method": "mtl-ibp", "alpha": 0.8}),
    "distil baseline": ("distil", {"loss": "baseline", "distill_weight": 0.5}),
    "distil soft-certified": ("distil", {"loss": "soft-certified", "distill_weight": 0.3}),
    "distil margin": ("distil", {"loss": "margin", "distill_weight": 0.2}),
    "distil adversarial": ("distil", {"loss": "adversarial", "distill_weight": 0.5}),
    "distil selective": ("distil", {"loss": "selective", "distill_weight": 1.0}),
}


def load(name: str, seed: int):
    """Train/test split of a bundled data set, scaled to [0, 1], and its eps."""
    if name == "digits":
        X, y = load_digits(return_X_y=True)
        X = (X / 16.0).astype(np.float32)
        X_train, X_test, y_train, y_test = train_test_split(
            X, y, test_size=0.3, stratify=y, random_state=seed
        )
        return X_train, X_test, y_train, y_test, 0.1
    X, y = load_breast_cancer(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.3, stratify=y, random_state=seed
    )
    scaler = MinMaxScaler().fit(X_train)
    X_train = scaler.transform(X_train).astype(np.float32)
    X_test = np.clip(scaler.transform(X_test), 0.0, 1.0).astype(np.float32)
    return X_train, X_test, y_train, y_test, 0.05


def _threads() -> None:
    torch.set_num_threads(1)


#: An adversarially trained teacher: MTL-IBP with alpha = 0 is PGD training (no certified term).
ADVERSARIAL_TEACHER = {"method": "mtl-ibp", "alpha": 0.0, "pgd_steps": 5}


def fit_teacher(name: str, seed: int, epochs: int, adversarial: bool = False):
    _threads()
    X_train, _, y_train, _, eps = load(name, seed)
    shape = {"input_shape": (1, 8, 8)} if name == "digits" else {"module__hidden_sizes": (256, 256)}
    training = ADVERSARIAL_TEACHER if adversarial else {"method": "ibp"}
    teacher = CertifiedTeacher(
        eps=eps, lower=0.0, upper=1.0, max_epochs=epochs, random_state=seed, **training, **shape
    )
    start = time.perf_counter()
    teacher.fit(X_train, y_train)
    return (name, seed), teacher, time.perf_counter() - start


def evaluate(model, X, y, eps, methods=CERTIFY_METHODS) -> tuple[float, float]:
    clean = float(np.mean(model.predict(X) == y))
    certified = model.certify(X, eps=eps, method=list(methods), y=y).certified_fraction
    return clean, certified


def student_network(name: str, hidden: tuple, channels: tuple | None) -> dict:
    """Parameters of the student's network: an MLP, or a CNN on digits when ``channels``."""
    network = {"module__hidden_sizes": hidden}
    if channels and name == "digits":
        network.update(input_shape=(1, 8, 8), module__channels=channels)
    return network


def fit_student(
    name: str,
    seed: int,
    config: str,
    teacher,
    epochs: int,
    hidden: tuple,
    channels: tuple | None = None,
    teacher_bounds: str = "ibp",
):
    _threads()
    X_train, X_test, y_train, y_test, eps = load(name, seed)
    kind, params = CONFIGS[config]
    common = {
        "eps": eps,
        "lower": 0.0,
        "upper": 1.0,
        "random_state": seed,
        "max_epochs": epochs,
        **student_network(name, hidden, channels),
    }
    if kind == "alone":
        model = CertifiedTeacher(**common, **params)
    else:
        model = DistilledStudent(teacher, teacher_bounds=teacher_bounds, **common, **params)
    start = time.perf_counter()
    model.fit(X_train, y_train)
    seconds = time.perf_counter() - start
    clean, certified = evaluate(model, X_test, y_test, eps)
    return {
        "data": name,
        "seed": seed,
        "config": config,
        "clean": clean,
        "certified": certified,
        "fit_s": seconds,
    }


def throughput(model, X, method: str, repeats: int) -> float:
    """Median certified samples per second over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.certify(X, method=method)
        times.append(time.perf_counter() - start)
    return len(X) / float(np.median(times))


def _mean_std(values) -> str:
    values = 100 * np.asarray(values)
    return f"{values.mean():.1f} ± {values.std():.1f}"


def report(rows: list[dict], name: str, seeds) -> None:
    print(f"\n### {name} (mean ± std over seeds {', '.join(map(str, seeds))})\n")
    print(
        "| student | clean % | certified % | certified gain vs best alone (per-seed range) "
        "| fit s |"
    )
    print("|---|---|---|---|---|")
    by_config = {
        c: {r["seed"]: r for r in rows if r["data"] == name and r["config"] == c} for c in CONFIGS
    }
    by_config = {c: rs for c, rs in by_config.items() if rs}
    alone = {
        c: np.mean([r["certified"] for r in rs.values()])
        for c, rs in by_config.items()
        if CONFIGS[c][0] == "alone"
    }
    best_alone = max(alone, key=alone.get) if alone else None
    for config, rs in by_config.items():
        gain = ""
        if best_alone is not None:
            # paired by seed: both students saw the same split and initialisation seed
            diffs = 100 * np.array(
                [
                    rs[seed]["certified"] - by_config[best_alone][seed]["certified"]
                    for seed in rs
                    if seed in by_config[best_alone]
                ]
            )
            gain = f"{diffs.mean():+.1f} ({diffs.min():+.1f} to {diffs.max():+.1f})"
        label = f"{config} (best alone)" if config == best_alone else config
        values = list(rs.values())
        print(
            f"| {label} | {_mean_std([r['clean'] for r in values])} | "
            f"{_mean_std([r['certified'] for r in values])} | {gain} | "
            f"{np.median([r['fit_s'] for r in values]):.0f} |"
        )


def size_and_speed(teachers: dict, hidden: tuple, channels: tuple | None, repeats: int) -> None:
    print(
        "\n### Student size and certify throughput relative to its teacher (first seed, first "
        f"{SPEED_SAMPLES} test samples, {torch.get_num_threads()} torch thread(s), median of "
        f"{repeats})\n"
    )
    print(
        "| data | teacher params | student params | ratio | method | teacher samples/s | "
        "student samples/s | student / teacher |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (name, seed), teacher in sorted(teachers.items()):
        if seed != min(s for n, s in teachers if n == name):
            continue
        X_train, X_test, y_train, _, eps = load(name, seed)
        student = DistilledStudent(
            teacher,
            eps=eps,
            lower=0.0,
            upper=1.0,
            random_state=seed,
            max_epochs=2,
            **student_network(name, hidden, channels),
        )
        student.fit(X_train, y_train)
        n_teacher = sum(p.numel() for p in teacher.module_.parameters())
        n_student = sum(p.numel() for p in student.module_.parameters())
        X_speed = X_test[:SPEED_SAMPLES]
        for method in CERTIFY_METHODS:
            t_rate = throughput(teacher, X_speed, method, repeats)
            s_rate = throughput(student, X_speed, method, repeats)
            print(
                f"| {name} | {n_teacher:,} | {n_student:,} | {n_teacher / n_student:.0f}x | "
                f"{method} | {t_rate:,.0f} | {s_rate:,.0f} | {s_rate / t_rate:.1f}x |"
            )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        nargs="+",
        default=["digits", "breast-cancer"],
        choices=["digits", "breast-cancer"],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--epochs", type=int, default=100, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=60)
    parser.add_argument(
        "--hidden", type=int, nargs="+", default=[32], help="student hidden layer sizes"
    )
    parser.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=None,
        help="make the digits student a CNN with these convolution channels "
        "(e.g. 4 8 with --hidden 16: about as many parameters as the MLP)",
    )
    parser.add_argument(
        "--adversarial-teacher",
        action="store_true",
        help="PGD-trained teachers (MTL-IBP with alpha 0, 5 steps); students see "
        "their worst case through a PGD attack (teacher_bounds='pgd')",
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel fits (1 thread each)")
    parser.add_argument("--repeats", type=int, default=5, help="certify timing repeats")
    parser.add_argument("--json", default=None, help="also write every run's row to this file")
    args = parser.parse_args(argv)
    hidden = tuple(args.hidden)
    channels = tuple(args.channels) if args.channels else None

    start = time.perf_counter()
    pool = Parallel(n_jobs=args.jobs)
    fitted = pool(
        delayed(fit_teacher)(name, seed, args.teacher_epochs, args.adversarial_teacher)
        for name in args.data
        for seed in args.seeds
    )
    teachers = {key: teacher for key, teacher, _ in fitted}
    print("teachers (clean / certified by IBP or CROWN-IBP %, fit s):")
    for (name, seed), teacher, seconds in fitted:
        _, X_test, _, y_test, eps = load(name, seed)
        clean, certified = evaluate(teacher, X_test, y_test, eps, ("ibp", "crown-ibp"))
        print(
            f"  {name} seed {seed}: {100 * clean:.1f} / {100 * certified:.1f}, {seconds:.0f} s",
            flush=True,
        )
    rows = pool(
        delayed(fit_student)(
            name,
            seed,
            config,
            teachers[name, seed],
            args.epochs,
            hidden,
            channels,
            "pgd" if args.adversarial_teacher else "ibp",
        )
        for name in args.data
        for seed in args.seeds
        for config in args.configs
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    for name in args.data:
        report(rows, name, args.seeds)
    torch.set_num_threads(1)
    size_and_speed(teachers, hidden, channels, args.repeats)
    command = shlex.join(
        ["python", "benchmarks/bench_distill.py", *(sys.argv[1:] if argv is None else argv)]
    )
    print(f"\nTotal {time.perf_counter() - start:.0f} s. Reproduce: {command}")


if __name__ == "__main__":
    main()
