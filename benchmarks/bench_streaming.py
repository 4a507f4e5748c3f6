"""Streaming certification: throughput and peak memory on memory-mapped rows; memory plans.

Run::

    python benchmarks/bench_streaming.py                      # 20,000 and 200,000 rows
    python benchmarks/bench_streaming.py --rows 20000 200000 2000000 --method crown

Streaming: a ``.npy`` file of N digits-sized rows (64 float32 features uniform in [0, 1], seed
0) is written once to a temporary directory; then, each in a fresh Python process (peak memory
is a property of the process), a tiny MLP (64-32-10, random, seed 0) certifies it by IBP at eps
0.02 in the domain [0, 1] with the default ``batch_size`` (256), once opened with
``mmap_mode="r"`` (streamed) and once loaded into memory (``np.load``, the direct path). Each
row of the table reports

* rows/s of the ``certify`` call;
* the peak RSS of the process (``ru_maxrss``), the torch runtime (about 300 MiB) included;
* the peak *anonymous* memory during the call above what the process held before it: RSS
  minus file-backed pages, sampled every 2 ms. The pages of a memory-mapped file that have been
  read count in the RSS until the OS needs the memory (they are page cache, dropped without
  writing anything); the anonymous memory is what the certification itself allocated.

Dask (``--dask``): the same rows as a dask array whose 8 blocks each load their rows from the
file (as workers would from shared storage), certified by ``certify_dask`` on a
``LocalCluster`` of 2 worker processes with 1 thread each (without dask's
``MALLOC_TRIM_THRESHOLD_`` unless ``--malloc-trim``), the records gathered to the client;
against the streamed ``certify`` in one process with 1 thread.

Memory plans (``--plans``): CROWN on 512 images through the CNN of ``bench_certify.py`` with
several ``memory_limit`` values, each in a fresh process: seconds and the peak anonymous memory
above the process's before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from certdistill import certify

FEATURES = 64
EPS = 0.02


def make_rows(path: Path, n: int) -> None:
    """Write ``n`` rows of 64 float32 features in [0, 1] to a ``.npy`` file, chunk by chunk."""
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, FEATURES))
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = rng.random((stop - start, FEATURES), dtype=np.float32)
    out.flush()


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


class AnonymousPeak:
    """Sample RSS minus file-backed pages (Linux ``/proc/self/statm``) in a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as statm:
            _, resident, shared, *_ = (int(v) for v in statm.read().split())
        return (resident - shared) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_stream(path: str, mode: str, method: str) -> dict:
    """One measurement (runs in its own process)."""
    torch.set_num_threads(1)
    module = tiny_mlp()
    X = np.load(path, mmap_mode="r" if mode == "memmap" else None)
    # Warm-up on a few rows (lazy imports and kernels), not timed.
    certify(module, np.array(X[:512]), EPS, method=method, lower=0.0, upper=1.0)
    with AnonymousPeak() as anonymous:
        before = anonymous.peak
        start = time.perf_counter()
        certificate = certify(module, X, EPS, method=method, lower=0.0, upper=1.0)
        seconds = time.perf_counter() - start
    return {
        "rows": len(X),
        "mode": mode,
        "seconds": seconds,
        "peak_rss": peak_rss(),
        "anonymous": anonymous.peak - before,
        "certified": certificate.certified_fraction,
    }


def child_plan(limit: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_certify import build_networks

    torch.set_num_threads(1)
    module, shape = build_networks()["CNN conv16-conv32-fc100"]
    x = torch.rand(512, *shape, generator=torch.Generator().manual_seed(0))
    certify(module, x[:4], 0.01, method="crown", lower=0.0, upper=1.0, memory_limit=limit)
    with AnonymousPeak() as anonymous:
        before = anonymous.peak
        start = time.perf_counter()
        certify(module, x, 0.01, method="crown", lower=0.0, upper=1.0, memory_limit=limit)
        seconds = time.perf_counter() - start
    return {"limit": limit, "seconds": seconds, "anonymous": anonymous.peak - before}


def load_rows(path: str, start: int, stop: int) -> np.ndarray:
    return np.array(np.load(path, mmap_mode="r")[start:stop])


def dask_rows(path: Path, n: int, blocks: int = 8):
    """A dask array of the rows of ``path``, each block read from the file by its task."""
    import dask
    import dask.array as da

    block = -(-n // blocks)
    parts = [
        da.from_delayed(
            dask.delayed(load_rows)(str(path), a, min(n, a + block)),
            shape=(min(n, a + block) - a, FEATURES),
            dtype=np.float32,
        )
        for a in range(0, n, block)
    ]
    return da.concatenate(parts)


def bench_dask(path: Path, n: int, method: str, trim: bool) -> None:
    import logging

    import dask
    from distributed import Client, LocalCluster

    from certdistill.scale.distributed import certify_dask

    torch.set_num_threads(1)
    module = tiny_mlp()
    start = time.perf_counter()
    certify(module, np.load(path, mmap_mode="r"), EPS, method=method, lower=0.0, upper=1.0)
    local = time.perf_counter() - start
    start = time.perf_counter()
    # dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which slows torch's CPU
    # allocations down (see docs/scaling-out.md); unset it unless --malloc-trim asks for it.
    config = {} if trim else {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    with (
        dask.config.set(config),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(lambda: __import__("certdistill.certification.certify"))
        started = time.perf_counter() - start
        times = []
        for _ in range(2):  # the first run also unpickles the module on each worker
            start = time.perf_counter()
            result = certify_dask(
                module, dask_rows(path, n), EPS, method=method, lower=0.0, upper=1.0
            ).compute()
            times.append(time.perf_counter() - start)
    print(f"| {n:,} | streamed `certify`, 1 process x 1 thread | {local:.2f} | {n / local:,.0f} |")
    for run, seconds in enumerate(times, 1):
        print(
            f"| {n:,} | `certify_dask`, 2 workers x 1 thread, run {run} | {seconds:.2f} | "
            f"{n / seconds:,.0f} |"
        )
    print(
        f"\n(cluster start {started:.1f} s; certified fraction {np.mean(result['certified']):.3f})"
    )


def run_child(*args: str) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def mib(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--method", default="ibp")
    parser.add_argument(
        "--plans",
        type=int,
        nargs="*",
        default=[],
        help="memory_limit values (MiB) for the CROWN plan measurements",
    )
    parser.add_argument("--dask", action="store_true", help="also time certify_dask")
    parser.add_argument(
        "--malloc-trim",
        action="store_true",
        help="keep dask's MALLOC_TRIM_THRESHOLD_=65536 for the workers",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = (
            child_stream(rest[0], rest[1], rest[2])
            if kind == "stream"
            else child_plan(int(rest[0]))
        )
        print(json.dumps(result))
        return 0

    print(
        f"# bench_streaming: torch {torch.__version__}, numpy {np.__version__}, python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, 1 torch thread"
    )
    print(f"# command: python {' '.join(sys.argv)}\n")
    print(f"method={args.method}, eps={EPS}, MLP 64-32-10, batch_size 256 (the default)\n")
    print("| rows | X | seconds | rows/s | peak RSS (MiB) | peak anonymous growth (MiB) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        for n in args.rows:
            path = Path(directory) / f"rows{n}.npy"
            make_rows(path, n)
            for mode in ("memmap", "in memory"):
                r = run_child("stream", str(path), mode, args.method)
                print(
                    f"| {n:,} | {mode} | {r['seconds']:.2f} | {n / r['seconds']:,.0f} | "
                    f"{mib(r['peak_rss'])} | {mib(r['anonymous'])} |",
                    flush=True,
                )
            if args.dask and n == max(args.rows):
                print("\n| rows | where | seconds | rows/s |\n|---|---|---|---|")
                bench_dask(path, n, args.method, args.malloc_trim)
                print()
            path.unlink()
    if args.plans:
        print("\nCROWN, 512 images 1x28x28, CNN conv16-conv32-fc100 (bench_certify.py), eps 0.01\n")
        print("| memory_limit (MiB) | seconds | peak anonymous growth (MiB) |")
        print("|---|---|---|")
        for limit in args.plans:
            r = run_child("plan", str(limit * 2**20))
            print(f"| {limit:,} | {r['seconds']:.2f} | {mib(r['anonymous'])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
