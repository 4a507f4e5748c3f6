"""Run alpha-beta-CROWN (CPU) once per row of a VNN-COMP instances CSV, one after another.

The reference verifier for ``bench_vnncomp.py --abcrown``, built outside the repository by
``shared/tools/abcrown_setup.sh`` (``ABC_DIR``, default ``~/.cache/abcrown-reference``).

Usage:
  python benchmarks/abcrown_reference.py BENCH_DIR [--filter STR] [--config YAML] [--out CSV]

Writes ``abcrown_<benchmark>_<filter>.csv`` (in the current folder) with columns
  onnx,vnnlib,result,seconds,abcrown_seconds,note
result: sat/unsat/timeout/unknown (from alpha-beta-CROWN's results file; its words are mapped:
safe/holds/unsat -> unsat, unsafe/violated/sat -> sat, timeout -> timeout, else unknown).
seconds: wall time of the whole alpha-beta-CROWN process (python start, model loading included).
abcrown_seconds: the "Time:" alpha-beta-CROWN itself prints for the instance (empty if none).
Each instance gets the CSV's timeout (--timeout); the process is killed after timeout +
KILL_MARGIN s.
Threads: OMP_NUM_THREADS=MKL_NUM_THREADS=1 for torch, Gurobi MIP with 2 processes x 1 thread.
"""

import argparse
import csv
import os
import re
import signal
import subprocess
import time

_HOME = os.environ.get("ABC_DIR", os.path.expanduser("~/.cache/abcrown-reference"))
ABC = os.path.join(_HOME, "abc", "complete_verifier")
PY = os.path.join(_HOME, "venv", "bin", "python")
KILL_MARGIN = 120  # seconds beyond the instance timeout before the driver kills the process

DEFAULT_CONFIGS = {  # the configs alpha-beta-CROWN used in VNN-COMP 2021
    ("mnistfc", "256x2"): "exp_configs/vnncomp21/mnistfc_small.yaml",
    ("mnistfc", ""): "exp_configs/vnncomp21/mnistfc.yaml",
    ("verivital", ""): "exp_configs/vnncomp21/verivital.yaml",
}
EXTRA = ["--device", "cpu", "--mip_multi_proc", "2", "--mip_threads", "1"]


def map_result(word):
    w = word.strip().lower()
    if w in ("unsat", "safe", "holds", "verified") or w.startswith("safe"):
        return "unsat"
    if w in ("sat", "unsafe", "violated", "falsified") or w.startswith("unsafe"):
        return "sat"
    if w.startswith("timeout") or w == "timed out":
        return "timeout"
    return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_dir")
    ap.add_argument("--filter", default="")
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--vnnlib-filter",
        default="",
        help="comma-separated substrings; keep only rows whose vnnlib path contains one of them",
    )
    ap.add_argument(
        "--tag", default=None, help="name tag for the output CSV and logs (default: the filter)"
    )
    ap.add_argument(
        "--stop-at",
        type=float,
        default=None,
        help="unix time: start no instance after it, and kill a running one at it",
    )
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    a = ap.parse_args()

    bench_dir = os.path.abspath(a.bench_dir)
    bench = os.path.basename(bench_dir.rstrip("/"))
    csv_path = [
        os.path.join(bench_dir, f) for f in os.listdir(bench_dir) if f.endswith("_instances.csv")
    ][0]
    config = a.config or DEFAULT_CONFIGS.get((bench, a.filter)) or DEFAULT_CONFIGS[(bench, "")]
    tag = a.tag or a.filter or "all"
    out = a.out or f"abcrown_{bench}_{tag}.csv"
    logdir = os.path.abspath(f"abcrown_logs/{bench}_{tag}")
    os.makedirs(logdir, exist_ok=True)

    rows = [r for r in csv.reader(open(csv_path)) if len(r) >= 3 and a.filter in r[0]]
    if a.vnnlib_filter:
        rows = [r for r in rows if any(v in r[1] for v in a.vnnlib_filter.split(","))]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    print(
        f"{bench} filter={a.filter!r}: {len(rows)} instances, config {config}, out {out}",
        flush=True,
    )

    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["onnx", "vnnlib", "result", "seconds", "abcrown_seconds", "note"])
        f.flush()
        for i, (onnx, vnnlib, timeout) in enumerate(r[:3] for r in rows):
            timeout = float(timeout)
            if a.stop_at and time.time() >= a.stop_at:
                print(f"stop-at reached; {len(rows) - i} instances not run", flush=True)
                break
            onnx_p = os.path.normpath(os.path.join(bench_dir, onnx))
            vnn_p = os.path.normpath(os.path.join(bench_dir, vnnlib))
            res_file = os.path.join(logdir, f"{i:03d}.res")
            log_file = os.path.join(logdir, f"{i:03d}.log")
            if os.path.exists(res_file):
                os.remove(res_file)
            cmd = [
                PY,
                "abcrown.py",
                "--config",
                config,
                *EXTRA,
                "--onnx_path",
                onnx_p,
                "--vnnlib_path",
                vnn_p,
                "--timeout",
                str(timeout),
                "--results_file",
                res_file,
                *a.extra,
            ]
            limit = timeout + KILL_MARGIN
            if a.stop_at:
                limit = min(limit, a.stop_at - time.time())
            note = ""
            t0 = time.time()
            with open(log_file, "w") as lf:
                lf.write(" ".join(cmd) + "\n")
                lf.flush()
                p = subprocess.Popen(
                    cmd,
                    cwd=ABC,
                    env=env,
                    stdout=lf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                try:
                    rc = p.wait(timeout=limit)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    rc = p.wait()
                    note = "killed by driver"
            secs = time.time() - t0
            if note and a.stop_at and time.time() >= a.stop_at - 1:
                print(
                    f"[{i}] {onnx} {vnnlib}: killed at stop-at after {secs:.1f}s; not recorded",
                    flush=True,
                )
                break
            word = open(res_file).read().split("\n")[0] if os.path.exists(res_file) else ""
            result = map_result(word) if word else ("timeout" if note else "unknown")
            if not word and not note:
                note = f"no results file, rc={rc}"
            elif rc != 0:
                note = (note + f" rc={rc}").strip()
            log = open(log_file, errors="replace").read()
            m = re.findall(r"^Time: ([0-9.eE+-]+)", log, re.M)
            abc_secs = f"{float(m[-1]):.3f}" if m else ""
            if "Traceback" in log:
                note = (note + " traceback in log").strip()
            w.writerow([onnx, vnnlib, result, f"{secs:.3f}", abc_secs, note])
            f.flush()
            print(
                f"[{i}] {onnx} {vnnlib}: {result} ({word!r}) {secs:.1f}s abc={abc_secs} {note}",
                flush=True,
            )


if __name__ == "__main__":
    main()
