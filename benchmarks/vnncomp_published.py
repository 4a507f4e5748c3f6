"""Per-instance published VNN-COMP 2021 answers, for ``bench_vnncomp.py --published``.

Reads a git directory of the public stanleybak/vnncomp2021_results repository
(``results_csv/*.csv``:
benchmark,onnx,vnnlib,prepare_time,result,run_time per tool), normalised as its
``process_results.py`` does (unsat -> holds, sat -> violated, run_instance_timeout -> timeout,
error_exit_code_* -> error, empty/no_result/prepare_error -> unknown; RPM's mnistfc results are
discarded, as the organisers did), and writes ``published_2021_<benchmark>.csv``: the strict
consensus (``answer``), the organisers' resolution of conflicts (``answer_resolved``), the tools
on each side and alpha-beta-CROWN's 2021 result and time.

Usage:
  python benchmarks/vnncomp_published.py RESULTS_GIT_DIR BENCHMARKS_DIR mnistfc verivital
"""

import csv
import io
import os
import subprocess
import sys

REPO = sys.argv[1] if len(sys.argv) > 2 else ""
BENCH = sys.argv[2] if len(sys.argv) > 2 else ""
# a-b-CROWN's overhead in the organisers' output_multioverhead.txt (least time of a decided one)
ABC_OVERHEAD = 6.1
SKIP = {"RPM": {"mnistfc"}}


def git_show(path):
    return subprocess.run(
        ["git", "-C", REPO, "show", f"HEAD:{path}"], capture_output=True, text=True, check=True
    ).stdout


def norm(r):
    r = r.strip().lower()
    if r == "":
        return "unknown"
    for pre, to in [
        ("unsat", "holds"),
        ("sat", "violated"),
        ("no_result_in_file", "unknown"),
        ("prepare_instance_error_", "unknown"),
        ("run_instance_timeout", "timeout"),
        ("error_exit_code_", "error"),
    ]:
        if r.startswith(pre):
            return to
    return r


def main():
    files = subprocess.run(
        ["git", "-C", REPO, "ls-tree", "--name-only", "HEAD", "results_csv/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    per_tool = {}
    for f in files:
        tool = os.path.basename(f)[:-4]
        d = {}
        for row in csv.reader(io.StringIO(git_show(f))):
            if len(row) < 6:
                continue
            bench, onnx, vnn, _prep, res, rt = row[:6]
            pre = f"./benchmarks/{bench}/"
            if not onnx.startswith(pre):
                continue  # test_nano rows
            key = (bench, onnx[len(pre) :], vnn[len(pre) :])
            res_n = norm(res)
            if bench in SKIP.get(tool, ()):
                res_n = "unknown"
            d[key] = (res_n, float(rt), res)
        per_tool[tool] = d
    tools = sorted(per_tool)
    for bench in sys.argv[3:] or ["mnistfc", "verivital"]:
        inst = [
            r for r in csv.reader(open(f"{BENCH}/{bench}/{bench}_instances.csv")) if len(r) >= 3
        ]
        out = f"published_2021_{bench}.csv"
        with open(out, "w", newline="") as fo:
            w = csv.writer(fo)
            w.writerow(
                [
                    "onnx",
                    "vnnlib",
                    "answer",
                    "answer_resolved",
                    "n_unsat",
                    "n_sat",
                    "tools_unsat",
                    "tools_sat",
                    "note",
                    "abcrown2021_result",
                    "abcrown2021_seconds",
                    "abcrown2021_seconds_minus_overhead",
                    "timeout",
                ]
                + [f"{t}" for t in tools]
            )
            for onnx, vnn, to in (r[:3] for r in inst):
                key = (bench, onnx, vnn)
                holds = [t for t in tools if per_tool[t].get(key, ("",))[0] == "holds"]
                viol = [t for t in tools if per_tool[t].get(key, ("",))[0] == "violated"]
                present = any(key in per_tool[t] for t in tools)
                note = ""
                if not present:
                    ans, note = "not_run", "instance absent from every tool's 2021 results"
                elif holds and viol:
                    maj = (
                        "unsat"
                        if len(holds) > len(viol)
                        else "sat"
                        if len(viol) > len(holds)
                        else "tie"
                    )
                    ans, note = "disputed", f"tools disagree (majority: {maj})"
                elif holds:
                    ans = "unsat"
                elif viol:
                    ans = "sat"
                else:
                    ans, note = "none", "no tool decided"
                # The organisers' rule (process_results.py, resolve_conflicts="odd_one_out"): a
                # conflict is settled by majority unless both sides have several tools, or a tie.
                resolved = ans
                if ans == "disputed":
                    resolved = (
                        "unresolved"
                        if (len(holds) > 1 and len(viol) > 1) or len(holds) == len(viol)
                        else "unsat"
                        if len(holds) > len(viol)
                        else "sat"
                    )
                abc = per_tool["a-b-CROWN"].get(key)
                m = {"holds": "unsat", "violated": "sat"}
                abc_res = m.get(abc[0], abc[0]) if abc else ""
                abc_t = f"{abc[1]:.3f}" if abc else ""
                abc_to = f"{max(1.0, abc[1] - ABC_OVERHEAD):.3f}" if abc else ""
                cells = []
                for t in tools:
                    v = per_tool[t].get(key)
                    cells.append(f"{m.get(v[0], v[0])} {v[1]:.1f}" if v else "")
                w.writerow(
                    [
                        onnx,
                        vnn,
                        ans,
                        resolved,
                        len(holds),
                        len(viol),
                        " ".join(holds),
                        " ".join(viol),
                        note,
                        abc_res,
                        abc_t,
                        abc_to,
                        to,
                    ]
                    + cells
                )
        print("wrote", out)


if __name__ == "__main__":
    main()
