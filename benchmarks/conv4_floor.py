"""How far a task-batched engine can get below the per-task loop on Conv4 on this machine.

Second-order MAML on Conv4 (Omniglot 5-way 1-shot, 15 query images per class) is dominated by the query set's
forward and backward at the adapted weights. This script times, side by side in one process on the same data (the
Conv4 case of `python -m mamlext bench`, on the CPU), the median ms per call over torch.utils.benchmark blocks:

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
from torch.func import functional_call

from mamlext.bench import suite
from mamlext.bench.common import peak_memory, summary, time_impls
from mamlext.bench.impls import MAML_IMPLS

WAYS, QUERIES = 5, 15
CPU = torch.device("cpu")


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
    model, setting, data = suite.problem(suite._conv(WAYS, QUERIES, args.hidden, args.tasks, args.steps), CPU,
                                         seed=0)
    named = dict(model.named_parameters())
    params = list(named.values())
    T = args.tasks
    xq, yq = data[2], data[3]

    def zero():
        for p in params:
            p.grad = None

    def query_only():
        zero()
        for t in range(T):
            (F.cross_entropy(functional_call(model, named, (xq[t],)), yq[t]) / T).backward()

    def query_batched():
        zero()
        F.cross_entropy(model(xq.reshape(-1, 1, 28, 28)), yq.reshape(-1)).backward()

    loop = MAML_IMPLS["loop"](model, setting, data)
    out = {"tasks": T, "steps": args.steps, "hidden": args.hidden, "threads": torch.get_num_threads(), "ms": {},
           "peak_rss_mib": {}}
    times = time_impls({"loop": loop, "query_only": query_only, "query_batched": query_batched}, CPU,
                       args.min_run_time, repeats=1)
    for name, seconds in times.items():
        out["ms"][name] = summary(seconds)["median_ms"]
        print(f"{name}: {out['ms'][name]:.1f} ms", flush=True)
    generic_low_chunk1 = MAML_IMPLS["generic-low-chunk1"](model, setting, data)
    for name, fn in (("loop", loop), ("query_only", query_only), ("generic_low_chunk1", generic_low_chunk1)):
        fn()
        bytes_, _ = peak_memory(fn, CPU)
        out["peak_rss_mib"][name] = None if bytes_ is None else bytes_ / 2**20
        print(f"peak RSS increase {name}: {out['peak_rss_mib'][name]} MiB", flush=True)
    out["query_only_vs_loop"] = out["ms"]["query_only"] / out["ms"]["loop"]
    out["query_batched_vs_query_only"] = out["ms"]["query_batched"] / out["ms"]["query_only"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
