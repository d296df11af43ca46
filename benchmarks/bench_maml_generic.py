#!/usr/bin/env python
"""Benchmark of mamlext's generic engine on the Omniglot Conv4 against plain PyTorch.

One meta-iteration of second-order MAML on Conv4-64 (mamlext.models.conv4: 4 x [conv3x3(64), BatchNorm2d, ReLU,
MaxPool2d(2)], Linear to 5 ways), Omniglot-shaped 5-way 1-shot tasks (random 28x28 images, 15 query images per
class, cross-entropy, inner lr 0.4), float32. Implementations, in one process on the same tasks and parameters
(mamlext.bench.impls):

  loop           a plain per-task autograd loop (the learn2learn way); the reference
  vmap           torch.func vmap(grad) MAML with the model as it is: nn.BatchNorm2d in training mode gives wrong
                 meta-gradients under vmap (functorch issue 534), so this row fails the check rather than report
                 a speed
  generic-graph  mamlext.BatchedMAML(model, backend="generic", memory="graph")
  generic-low    mamlext.BatchedMAML(model, backend="generic", memory="low")
  generic-low-chunk1  the same with task_chunk=1 (one task at a time through the low-memory recursion)

Cases: T in {8, 32} tasks x N in {1, 5} inner steps. Per case (mamlext.bench.suite.run_case): each meta-gradient is
checked against the loop's in float32 (normwise relative error <= 2e-3, the suite's float32 tolerance) and a
mismatch marks the row failed; then one call measures peak memory (CUDA max allocated, or the CPU's peak RSS
delta); then interleaved timing rounds of torch.utils.benchmark (median and IQR of ms per meta-iteration). The
generic rows are skipped while this mamlext has no generic engine. The script exits 1 when a generic row fails the
check.

Usage:
  python benchmarks/bench_maml_generic.py                  # CUDA if available, else CPU
  python benchmarks/bench_maml_generic.py --device cpu --quick
  python benchmarks/bench_maml_generic.py --device cuda --out gpu-results/maml_generic_cuda.json
"""
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from mamlext.bench import suite
from mamlext.bench.common import (MEMORY_KINDS, machine_info, peak_memory, pick_device, script_parser, use_threads,
                                  write_json)
from mamlext.bench.report import format_table

IMPLS = ("loop", "vmap", "generic-graph", "generic-low", "generic-low-chunk1")
WAYS, QUERIES, HIDDEN = 5, 15, 64


def main(argv=None) -> int:
    parser = script_parser(__doc__, "maml_generic")
    parser.add_argument("--quick", action="store_true", help="T = 8 and N = 1 only, one short timing round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--min-run-time", type=float, default=0.6,
                        help="measured seconds per implementation and case, over all rounds (default 0.6)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = pick_device(parser, args.device)
    if args.repeats < 1 or not args.min_run_time > 0:
        parser.error("--repeats must be at least 1 and --min-run-time positive")
    use_threads(parser, args.threads)
    settings = suite.SuiteSettings(1 if args.quick else args.repeats, 0.2 if args.quick else args.min_run_time,
                                   loop_max_call_s=float("inf"))
    grid = [(8, 1)] if args.quick else [(t, n) for n in (1, 5) for t in (8, 32)]
    cases = [suite._conv(WAYS, QUERIES, HIDDEN, tasks, steps) for tasks, steps in grid]

    _, memory_kind = peak_memory(lambda: None, device)
    results = {"title": f"bench_maml_generic: Conv4-{HIDDEN} {WAYS}-way 1-shot, second order, on {device}",
               "device": str(device), "machine": machine_info(device), "settings": settings._asdict(),
               "memory_kind": memory_kind, "memory_kind_description": MEMORY_KINDS[memory_kind],
               "notes": suite.notes(("conv4",), IMPLS), "rows": []}
    start = time.perf_counter()
    for case in tqdm(cases, desc="bench_maml_generic", unit="case", file=sys.stderr):
        built = suite.build_case(case, device, args.seed)
        results["rows"] += suite.run_case(case, device, settings, args.seed,
                                          builders={name: built.builders[name] for name in IMPLS})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["wall_s"] = time.perf_counter() - start
    print(format_table(results))

    out_path = args.out or os.path.join("bench-results", f"maml_generic_{device.type}.json")
    write_json(results, out_path)
    print(f"\nwrote {out_path} ({len(results['rows'])} rows, {results['wall_s']:.0f} s)")
    failed = [r for r in results["rows"] if r["impl"].startswith("generic") and r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
