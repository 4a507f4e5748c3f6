"""Operator profile of the public ``certify()`` on the benchmark networks (diagnostics for
bench_certify).

Run: python benchmarks/profile_ibp.py [--threads 2] [--method ibp]
"""

import argparse

import torch

from benchmarks.bench_certify import build_networks
from certdistill import certify

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--method", default="ibp")
args = parser.parse_args()
torch.set_num_threads(args.threads)
for name, (module, shape) in build_networks().items():
    x = torch.rand(256, *shape)
    for _ in range(5):
        certify(module, x, 0.01, method=args.method, lower=0.0, upper=1.0)
    with torch.profiler.profile() as profile:
        for _ in range(20):
            certify(module, x, 0.01, method=args.method, lower=0.0, upper=1.0)
    print(name)
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
