"""Operator profile of one IBP call on the benchmark MLP (diagnostics for bench_certify).

Run: python benchmarks/profile_ibp.py [--threads 2]
"""

import argparse

import torch

from benchmarks.bench_certify import build_networks
from certdistill.bounds import BoundEngine

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--method", default="ibp")
args = parser.parse_args()
torch.set_num_threads(args.threads)
for name, (module, shape) in build_networks().items():
    x = torch.rand(256, *shape)
    reference = module(x).argmax(1)
    engine = BoundEngine(module)
    with torch.no_grad():
        for _ in range(5):
            engine.margin_lower_bounds(x, 0.01, reference, method=args.method, lower=0.0, upper=1.0)
        with torch.profiler.profile() as profile:
            for _ in range(20):
                engine.margin_lower_bounds(x, 0.01, reference, method=args.method,
                                           lower=0.0, upper=1.0)
    print(name)
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
