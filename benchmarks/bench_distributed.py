#!/usr/bin/env python
"""Meta-training throughput with the meta-batch split across 1 and several CPU processes (torch.distributed, gloo).

The workload and the method are mamlext.bench.distributed's (also `python -m mamlext bench --distributed P`); this
script runs any list of process counts and prints the result as JSON (stdout) and one line per count (stderr).

Usage:
  python benchmarks/bench_distributed.py                          # 1 and 2 processes
  python benchmarks/bench_distributed.py --world-sizes 1,2,4 --out bench-results/distributed.json
"""
import argparse
import json
import sys

from mamlext.bench.common import write_json
from mamlext.bench.distributed import describe, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="1,2", help="comma-separated process counts (1,2)")
    parser.add_argument("--tasks", type=int, default=1000, help="T, tasks per meta-batch (1000)")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1)")
    parser.add_argument("--blocks", type=int, default=8, help="timed blocks per case (8)")
    parser.add_argument("--iters-per-block", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        world_sizes = tuple(int(w) for w in args.world_sizes.split(","))
    except ValueError:
        parser.error(f"--world-sizes must be comma-separated integers, got {args.world_sizes!r}")
    for name in ("tasks", "inner_steps", "threads", "blocks", "iters_per_block"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        result = run(world_sizes, args.tasks, args.inner_steps, args.threads, blocks=args.blocks,
                     iters_per_block=args.iters_per_block)
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(result, args.out)
    print(describe(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
