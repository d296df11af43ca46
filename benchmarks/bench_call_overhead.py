"""What a fused-engine meta-iteration costs around its kernel, timed as a training loop runs it.

    python benchmarks/bench_call_overhead.py [--threads 2] [--calls 3000]

Finn's sinusoid MLP (1-40-40-1 ReLU), T = 25 tasks, K = 10 support + 10 query rows, N = 1 inner step, float32, CPU.
Each figure is the median of single timed calls (interleaved rounds, so that drift of the machine hits all rows alike):

  engine    opt.zero_grad(); engine.meta_loss(xs, ys, xq, yq).backward()
  kernel    the mlp_maml op alone with its arguments ready, in grad mode as the engine calls it (the forward computes
            the meta-gradients), no backward
  outside   engine - kernel: Python, checks, autograd bookkeeping, backward
  vmap      torch.func: grad of the mean over vmap(tasks) of the inner step and query loss (mamlext.bench's row)

Prints one JSON object.
"""
import argparse
import json
import statistics
import time

import torch
from torch import nn

import mamlext
from mamlext.bench.impls import Setting, vmap_grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per row (vmap: a tenth)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    tasks, rows = 25, 10
    xs, ys, xq, yq = (torch.randn(tasks, rows, 1) for _ in range(4))
    engine = mamlext.BatchedMAML(model, inner_lr=0.01)
    optimizer = torch.optim.Adam(model.parameters())
    params = list(model.parameters())
    lrs = [torch.full((1,), 0.01)] * len(params)
    weights = torch.ones(1)

    def engine_call():
        optimizer.zero_grad()
        engine.meta_loss(xs, ys, xq, yq).backward()

    def kernel_call():
        torch.ops.mamlext.mlp_maml(params, xs, ys, xq, yq, lrs, weights, False, 0, 0.0, 0)

    setting = Setting(steps=1, first_order=False, inner_lr=0.01, loss="mse")
    rows_to_time = {"engine": (engine_call, args.calls), "kernel": (kernel_call, args.calls),
                    "vmap": (vmap_grad(model, setting, (xs, ys, xq, yq)), max(args.calls // 10, 10))}
    times = {name: [] for name in rows_to_time}
    for call, _ in rows_to_time.values():
        for _ in range(20):
            call()
    rounds = 10
    for _ in range(rounds):
        for name, (call, count) in rows_to_time.items():
            for _ in range(count // rounds):
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
    us = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    print(json.dumps({"threads": args.threads, "engine_us": round(us["engine"], 1), "kernel_us": round(us["kernel"], 1),
                      "outside_kernel_us": round(us["engine"] - us["kernel"], 1), "vmap_us": round(us["vmap"], 1),
                      "engine_vs_vmap": round(us["vmap"] / us["engine"], 2)}))


if __name__ == "__main__":
    main()
