"""VNN-COMP instances: certdistill verify beside alpha-beta-CROWN and the published answers.

The benchmarks are not part of this repository: fetch the public VNN-COMP 2021 repository
(stanleybak/vnncomp2021) and point ``--root`` at one benchmark folder, e.g.
``.../benchmarks/mnistfc``. The run is the public CLI path (``verify_instances``, what
``certdistill verify --instances`` calls), one process, torch on ``--threads`` threads.

alpha-beta-CROWN is run separately on the same machine, one instance after another with the
same timeouts (``benchmarks/abcrown_reference.py``, on the build of
``shared/tools/abcrown_setup.sh``), and its per-instance results CSV
(``onnx,vnnlib,result,seconds``) is passed as ``--abcrown``. ``--published`` takes the CSV of
``benchmarks/vnncomp_published.py`` (the answers of VNN-COMP 2021's tools, conflicts resolved as
the organisers did); an answer that contradicts it is counted as wrong.

Usage::

    python benchmarks/bench_vnncomp.py --root ../vnncomp2021/benchmarks/mnistfc \\
        --filter 256x2 [--property-filter _0.03] [--abcrown abcrown.csv] \\
        [--published published.csv] [--output ours.csv]
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from certdistill.certification.vnncomp import read_instances, verify_instances


def _read_results(path: str | None) -> dict[tuple[str, str], tuple[str, float | None]]:
    """``(onnx, vnnlib) -> (answer, seconds)`` of a results CSV with a header: ``result`` (or
    ``answer_resolved``, ``answer``) and ``seconds`` columns."""
    if path is None:
        return {}
    table = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            answer = row.get("answer_resolved") or row.get("result") or row.get("answer") or ""
            seconds = row.get("seconds")
            table[(_key(row["onnx"]), _key(row["vnnlib"]))] = (
                answer.strip(),
                float(seconds) if seconds else None,
            )
    return table


def _key(path: str) -> str:
    return Path(path.strip()).name.removesuffix(".gz")


def _summary(name: str, results: list[tuple[str, float | None]], truth: list[str | None]):
    decided = sum(r in ("sat", "unsat") for r, _ in results)
    wrong = sum(
        r in ("sat", "unsat") and t in ("sat", "unsat") and r != t
        for (r, _), t in zip(results, truth, strict=True)
    )
    seconds = sum(s for _, s in results if s is not None)
    counts = {k: sum(r == k for r, _ in results) for k in ("sat", "unsat", "timeout", "unknown")}
    return (
        f"| {name} | {decided} / {len(results)} | {counts['sat']} | {counts['unsat']} | "
        f"{counts['timeout'] + counts['unknown']} | {wrong} | {seconds:.1f} |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="a VNN-COMP benchmark folder")
    parser.add_argument(
        "--instances",
        default=None,
        help="instances CSV inside --root (default: the only *_instances.csv)",
    )
    parser.add_argument("--filter", default="", help="only instances whose onnx name has this")
    parser.add_argument(
        "--property-filter",
        default="",
        help="only instances whose vnnlib name has this (e.g. _0.03)",
    )
    parser.add_argument("--abcrown", help="alpha-beta-CROWN's results CSV on the same instances")
    parser.add_argument("--published", help="published answers CSV (onnx,vnnlib,answer)")
    parser.add_argument("--output", help="write certdistill's results CSV there")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-batch", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    instances = Path(args.instances) if args.instances else next(root.glob("*_instances.csv"))
    rows = [
        r for r in read_instances(instances) if args.filter in r[0] and args.property_filter in r[1]
    ]
    with tempfile.TemporaryDirectory() as scratch:
        subset = Path(scratch) / "instances.csv"
        with open(subset, "w", newline="") as handle:
            writer = csv.writer(handle)
            for onnx_file, vnnlib_file, timeout in rows:
                writer.writerow(
                    [
                        str((root / onnx_file).resolve()),
                        str((root / vnnlib_file).resolve()),
                        timeout,
                    ]
                )
        start = time.perf_counter()
        ours = verify_instances(subset, output=args.output, batch=not args.no_batch)
        wall = time.perf_counter() - start
    abcrown = _read_results(args.abcrown)
    published = _read_results(args.published)
    print(
        f"# {instances.name}, filter {args.filter!r} {args.property_filter!r}: {len(rows)} "
        f"instances, torch "
        f"{torch.__version__}, {args.threads} threads"
    )
    print("\n| instance | timeout | certdistill | s | alpha-beta-CROWN | s | published |")
    print("|---|---|---|---|---|---|---|")
    truth, theirs = [], []
    for r in ours:
        key = (_key(r.onnx), _key(r.vnnlib))
        other = abcrown.get(key, ("-", None))
        answer = published.get(key, (None, None))[0]
        truth.append(answer)
        theirs.append(other)
        flag = (
            " WRONG"
            if (
                answer in ("sat", "unsat")
                and r.outcome.result in ("sat", "unsat")
                and r.outcome.result != answer
            )
            else ""
        )
        print(
            f"| {key[0]} {key[1]} | {r.timeout:g} | {r.outcome.result}{flag} | "
            f"{r.outcome.seconds:.1f} | {other[0]} | "
            f"{'' if other[1] is None else f'{other[1]:.1f}'} | {answer or '-'} |"
        )
    print("\n| verifier | decided | sat | unsat | open | wrong | seconds |")
    print("|---|---|---|---|---|---|---|")
    print(_summary("certdistill", [(r.outcome.result, r.outcome.seconds) for r in ours], truth))
    if abcrown:
        print(_summary("alpha-beta-CROWN", theirs, truth))
    print(
        f"\ncertdistill wall time {wall:.1f} s (batched per network: per-instance seconds "
        "are the batch's time shared equally)"
        if not args.no_batch
        else f"\ncertdistill wall time {wall:.1f} s"
    )
    print(
        "reproduce: python "
        + " ".join(
            shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
