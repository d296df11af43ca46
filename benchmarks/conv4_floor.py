"""How far a task-batched engine can get below the per-task loop on Conv4 on this machine.

Second-order MAML on Conv4 (Omniglot 5-way 1-shot, 15 query images per class) is dominated by the query set's
forward and backward at the adapted weights. This script times, side by side in one process on the same data:

  loop           the plain per-task autograd MAML loop (create_graph inner steps, backward per task);
  query_only     only each task's query forward + backward, at the meta-parameters (no inner loop): a floor for
                 any engine that runs each task's query pass as the loop does;
  query_batched  the query sets of all tasks as ONE batch through the model with shared weights: the best case of
                 batching the query pass over tasks (a task-batched engine, with per-task weights, does more work);

and the peak memory (process peak-RSS increase) of one call of the loop, of query_only and of the generic engine's
low-memory mode one task at a time. Prints JSON.

    python benchmarks/conv4_floor.py [--tasks 32] [--steps 1] [--hidden 64]
"""
import argparse
import json

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch.func import functional_call

import mamlext
from mamlext.bench.common import peak_memory
from mamlext.models import conv4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--min-run-time", type=float, default=3.0)
    args = parser.parse_args()
    for name in ("tasks", "steps", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.min_run_time > 0:
        parser.error(f"--min-run-time must be > 0 seconds, got {args.min_run_time}")
    torch.manual_seed(0)
    ways, queries, lr = 5, 15, 0.4
    model = conv4(ways, hidden=args.hidden)
    named = dict(model.named_parameters())
    params = list(named.values())
    T = args.tasks
    xs, ys = torch.randn(T, ways, 1, 28, 28), torch.arange(ways).repeat(T, 1)
    xq = torch.randn(T, ways * queries, 1, 28, 28)
    yq = torch.arange(ways).repeat_interleave(queries).repeat(T, 1)

    def zero():
        for p in params:
            p.grad = None

    def loop():
        zero()
        for t in range(T):
            fast = named
            for _ in range(args.steps):
                loss = F.cross_entropy(functional_call(model, fast, (xs[t],)), ys[t])
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {name: p - lr * g for (name, p), g in zip(fast.items(), grads)}
            (F.cross_entropy(functional_call(model, fast, (xq[t],)), yq[t]) / T).backward()

    def query_only():
        zero()
        for t in range(T):
            (F.cross_entropy(functional_call(model, named, (xq[t],)), yq[t]) / T).backward()

    def query_batched():
        zero()
        F.cross_entropy(model(xq.reshape(-1, 1, 28, 28)), yq.reshape(-1)).backward()

    low = mamlext.BatchedMAML(model, inner_lr=lr, inner_steps=args.steps, loss="ce", backend="generic",
                              memory="low", task_chunk=1)

    def generic_low_chunk1():
        zero()
        low.meta_loss(xs, ys, xq, yq).backward()

    out = {"tasks": T, "steps": args.steps, "hidden": args.hidden, "threads": torch.get_num_threads(), "ms": {},
           "peak_rss_mib": {}}
    for name, fn in (("loop", loop), ("query_only", query_only), ("query_batched", query_batched)):
        fn()
        timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        out["ms"][name] = timer.blocked_autorange(min_run_time=args.min_run_time).median * 1e3
        print(f"{name}: {out['ms'][name]:.1f} ms", flush=True)
    for name, fn in (("loop", loop), ("query_only", query_only), ("generic_low_chunk1", generic_low_chunk1)):
        fn()
        bytes_, _ = peak_memory(fn, torch.device("cpu"))
        out["peak_rss_mib"][name] = None if bytes_ is None else bytes_ / 2**20
        print(f"peak RSS increase {name}: {out['peak_rss_mib'][name]} MiB", flush=True)
    out["query_only_vs_loop"] = out["ms"]["query_only"] / out["ms"]["loop"]
    out["query_batched_vs_query_only"] = out["ms"]["query_batched"] / out["ms"]["query_only"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
