#!/usr/bin/env python
"""Benchmark of a MAML meta-iteration with the fused engine against plain PyTorch.

One meta-iteration = the inner loop of every task, the query losses and the meta-gradient of their mean w.r.t. the
meta-parameters theta (float32). Three implementations, in one process, on the same tasks and the same theta:

  fused  mamlext.BatchedMAML(model, ...).meta_loss(xs, ys, xq, yq).backward()      (ops.mlp_maml)
  (a)    loop: a plain per-task autograd loop, the learn2learn way: for each task, torch.func.functional_call +
         torch.autograd.grad(create_graph=not first_order) inner steps, the query loss / T, .backward()
  (b)    torch.func: torch.func.grad of  mean_t query_loss_t(theta)  where the per-task losses come from
         torch.func.vmap over tasks of the inner adaptation written with torch.func.grad ("vmap(grad)" MAML);
         first order detaches the inner gradients

Before timing, the three meta-gradients are checked to agree (normwise per tensor, max|g - g_fused| <=
1e-4 * max|g_fused|); a mismatch marks the row FAILED (and the script exits 1). (a) is skipped where it would take
too long (T * N above --loop-max-task-steps inner steps per meta-iteration); the row says so.

Cases (Finn et al.'s sinusoid regression, MSE, ReLU, K = 10 support + 10 query points per task):
  sin40-T25-N1        1-40-40-1,   T = 25,   N = 1, second order
  sin40-T1000-N5      1-40-40-1,   T = 1000, N = 5, second order
  sin256-T25-N1       1-256-256-1, T = 25,   N = 1, second order
  sin40-T25-N1-fo     1-40-40-1,   T = 25,   N = 1, first order
  sin40-T250-N5-fo    1-40-40-1,   T = 250,  N = 5, first order
Timing: a warm-up, then torch.utils.benchmark.Timer(...).blocked_autorange() (it synchronizes the GPU), --repeats
rounds interleaved over the implementations; median and IQR over all measured blocks; tasks/s = T / median;
speedups = the other implementation's median / fused's median. The project's CPU goals (fused vs (b)): >= 10x on
sin40-T25-N1, >= 5x on sin40-T1000-N5, >= 2x on sin256-T25-N1; the script reports whether each is met.

Usage:
  python benchmarks/bench_maml_mlp.py                       # full run; CUDA if available, else CPU
  python benchmarks/bench_maml_mlp.py --device cpu --quick
  python benchmarks/bench_maml_mlp.py --device cuda --cases sin40-T25-N1,sin256-T25-N1 --out gpu-results/m.json
"""
import os
import sys
import time
from typing import Dict, List, NamedTuple, Optional

import torch

import mamlext
from mamlext.bench import suite
from mamlext.bench.common import (FOREIGN_LOAD_WARN, first_call, load_average, machine_info, max_rel_error,
                                  measure_case, mismatch, noisy, noisy_note, pick_device, print_machine, script_parser,
                                  summary, time_impls, use_threads, write_json)
from mamlext.bench.impls import MAML_IMPLS
from mamlext.bench.report import aligned

# the suite's sinusoid workload (mamlext.bench.suite)
DTYPE = suite.DTYPE
INNER_LR = suite.SINE_INNER_LR
SHOTS, QUERIES = suite.SINE_SHOTS, suite.SINE_QUERIES
RTOL = 1e-4
IMPLS = ("fused", "loop", "func")  # fused, (a), (b)
LABELS = {"fused": "fused", "loop": "(a) loop", "func": "(b) torch.func"}


class Case(NamedTuple):
    name: str
    widths: List[int]
    tasks: int
    steps: int
    first_order: bool
    goal_vs_func: Optional[float]  # the project's CPU goal: fused at least this many times faster than (b)


CASES = [
    Case("sin40-T25-N1", [1, 40, 40, 1], 25, 1, False, 10.0),
    Case("sin40-T1000-N5", [1, 40, 40, 1], 1000, 5, False, 5.0),
    Case("sin256-T25-N1", [1, 256, 256, 1], 25, 1, False, 2.0),
    Case("sin40-T25-N1-fo", [1, 40, 40, 1], 25, 1, True, None),
    Case("sin40-T250-N5-fo", [1, 40, 40, 1], 250, 5, True, None),
]


# --- the three implementations (mamlext.bench.impls) on the suite's sinusoid case -------------------------------------

IMPL_BUILDERS = {"fused": MAML_IMPLS["fused"], "loop": MAML_IMPLS["loop"], "func": MAML_IMPLS["vmap"]}


def case_fields(case: Case) -> Dict:
    return {"case": case.name, "widths": case.widths, "tasks": case.tasks, "steps": case.steps,
            "first_order": case.first_order, "goal_vs_func": case.goal_vs_func}


def run_case(case: Case, device: torch.device, min_run_time: float, repeats: int, loop_max_task_steps: int,
             seed: int) -> Dict:
    row = {**case_fields(case), "shots": SHOTS, "queries": QUERIES, "status": "ok"}
    model, setting, data = suite.problem(suite._mlp(case.widths[1], case.tasks, case.steps, case.first_order),
                                         device, seed)
    impls = {name: IMPL_BUILDERS[name](model, setting, data) for name in ("fused", "func")}
    if case.tasks * case.steps <= loop_max_task_steps:
        impls["loop"] = IMPL_BUILDERS["loop"](model, setting, data)
    else:
        row["loop_status"] = (f"skipped: T*N = {case.tasks * case.steps} per-task inner steps per meta-iteration "
                              f"(> {loop_max_task_steps}; several seconds per call)")

    # The check, which is also the first warm-up call of each implementation.
    grads, first_call_s = {}, {}
    for name, fn in impls.items():
        grads[name], first_call_s[name] = first_call(fn, device)
    row["first_call_s"] = first_call_s
    for name in impls:
        if name == "fused":
            continue
        row[f"{name}_rel_error"] = max_rel_error(grads[name], grads["fused"])
        bad = mismatch(grads[name], grads["fused"], RTOL)
        if bad:
            row["status"] = f"FAILED: {LABELS[name]} disagrees with fused ({bad})"
            return row

    # One more warm-up each (caches, allocator), then interleaved timing rounds.
    times = time_impls(impls, device, min_run_time, repeats, warmup=1)
    for name in impls:
        s = summary(times[name])
        for key, value in s.items():
            row[f"{name}_{key}"] = value
        row[f"{name}_tasks_per_s"] = case.tasks / (s["median_ms"] * 1e-3)
    for name in ("loop", "func"):
        if name in impls:
            row[f"speedup_vs_{name}"] = row[f"{name}_median_ms"] / row["fused_median_ms"]
    if case.goal_vs_func is not None:
        row["goal_met"] = row["speedup_vs_func"] >= case.goal_vs_func
    return row


# --- reporting --------------------------------------------------------------------------------------------------------

def case_line(row: Dict) -> str:
    head = f"{row['case']:<17} T={row['tasks']:<5} N={row['steps']} {'FO' if row['first_order'] else 'SO'}"
    if row["status"] != "ok":
        return f"{head}  {row['status']}"
    parts = [f"fused {row['fused_median_ms']:9.3f} ms"]
    parts.append(f"(a) {row['loop_median_ms']:9.1f} ms" if "loop_median_ms" in row else "(a) skipped")
    parts.append(f"(b) {row['func_median_ms']:9.1f} ms")
    if "speedup_vs_loop" in row:
        parts.append(f"x{row['speedup_vs_loop']:.1f} vs (a)")
    parts.append(f"x{row['speedup_vs_func']:.1f} vs (b)")
    return f"{head}  " + "  ".join(parts)


def ms_cell(row: Dict, name: str) -> str:
    if f"{name}_median_ms" not in row:
        return "skipped" if row.get(f"{name}_status") else ""
    return f"{row[name + '_median_ms']:.4g} ({row[name + '_iqr_ms']:.2g})"


def print_table(rows: List[Dict], device: torch.device) -> None:
    cols = ["case", "widths", "T", "N", "order", "fused ms (IQR)", "(a) loop ms (IQR)", "(b) func ms (IQR)",
            "fused tasks/s", "vs (a)", "vs (b)", "goal vs (b)", "status"]
    table = []
    for r in rows:
        cells = [r["case"], "-".join(map(str, r["widths"])), str(r["tasks"]), str(r["steps"]),
                 "first" if r["first_order"] else "second"]
        if r["status"] == "ok":
            cells += [ms_cell(r, "fused"), ms_cell(r, "loop"), ms_cell(r, "func"), f"{r['fused_tasks_per_s']:,.0f}",
                      f"{r['speedup_vs_loop']:.1f}x" if "speedup_vs_loop" in r else "-",
                      f"{r['speedup_vs_func']:.1f}x"]
            goal = r["goal_vs_func"]
            cells.append("" if goal is None else f">= {goal:g}x: {'met' if r['goal_met'] else 'NOT met'}")
            loop = f"; (a) {r['loop_status']}" if "loop_status" in r else ""
            cells.append("ok" + loop + noisy_note(r.get("foreign_cpu_load")))
        else:
            cells += [""] * (len(cols) - len(cells) - 1) + [r["status"]]
        table.append(cells)
    title = (f"MAML meta-iteration (inner loop + query loss + meta-gradient) on {device}, float32, MSE, ReLU, "
             f"K={SHOTS}+{QUERIES}, inner lr {INNER_LR}; ms = median per meta-iteration (IQR); vs = other's median / "
             "fused median")
    print("\n" + "\n".join(aligned(cols, table, [title])))


def main(argv=None) -> int:
    parser = script_parser(__doc__, "maml_mlp")
    parser.add_argument("--quick", action="store_true", help="short timings (one round, 0.3 s per implementation)")
    parser.add_argument("--cases", help="comma-separated case names (default all): "
                        + ", ".join(c.name for c in CASES))
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of blocked_autorange per implementation, interleaved (default 2, quick 1)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="measured seconds per implementation and case, over all rounds (default 1.5, quick 0.3)")
    parser.add_argument("--loop-max-task-steps", type=int, default=2000,
                        help="skip (a) where T*N exceeds this (default 2000)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    use_threads(parser, args.threads)
    device = pick_device(parser, args.device)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.3 if args.quick else 1.5)
    if repeats < 1 or min_run_time <= 0:
        parser.error("--repeats must be at least 1 and --min-run-time positive")
    cases = CASES
    if args.cases:
        by_name = {c.name: c for c in CASES}
        names = [n.strip() for n in args.cases.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            parser.error(f"unknown case(s) {unknown}; known: {list(by_name)}")
        cases = [by_name[n] for n in names]
    out_path = args.out or os.path.join("bench-results", f"maml_mlp_{device.type}.json")

    meta = machine_info(device, mlp_maml_compiled=mamlext.ops._compiled("mlp_maml", device))
    meta.update({"device": str(device), "dtype": str(DTYPE), "inner_lr": INNER_LR, "shots": SHOTS,
                 "queries": QUERIES, "rtol": RTOL, "quick": args.quick, "repeats": repeats,
                 "min_run_time_s": min_run_time, "loop_max_task_steps": args.loop_max_task_steps, "seed": args.seed})
    print_machine(meta, device, "mlp_maml kernel", meta["mlp_maml_compiled"])

    rows = []
    start = time.perf_counter()
    for k, case in enumerate(cases, 1):
        row = measure_case(lambda: run_case(case, device, min_run_time, repeats, args.loop_max_task_steps,
                                            args.seed), case_fields(case), device)
        row["wall_s"] = time.perf_counter() - start
        rows.append(row)
        print(f"[{k}/{len(cases)} {row['wall_s']:6.1f}s] {case_line(row)}{noisy_note(row['foreign_cpu_load'])}",
              flush=True)
        meta["wall_s"] = row["wall_s"]
        # after every case, so that a run cut short (a stage timeout) keeps what it measured
        write_json({"meta": meta, "rows": rows}, out_path)

    meta["loadavg_end"] = load_average()
    meta["wall_s"] = time.perf_counter() - start
    meta["noisy_rows"] = sum(noisy(r["foreign_cpu_load"]) for r in rows)
    print_table(rows, device)

    goals = [r for r in rows if r.get("goal_vs_func") is not None and r["status"] == "ok"]
    if goals:
        where = "" if device.type == "cpu" else f"; this run is on {device.type}"
        print(f"\ngoals (fused vs (b) torch.func, stated for CPU{where}):")
        for r in goals:
            print(f"  {r['case']}: >= {r['goal_vs_func']:g}x  measured {r['speedup_vs_func']:.1f}x  "
                  f"{'met' if r['goal_met'] else 'NOT met'}")
    failed = [r for r in rows if r["status"].startswith("FAILED")]
    if meta["noisy_rows"]:
        print(f"\nWARNING: {meta['noisy_rows']} case(s) ran while other processes used more than "
              f"{FOREIGN_LOAD_WARN} CPUs; their timings are not trustworthy: rerun on a quiet machine")
    if failed:
        print(f"\n{len(failed)} case(s) FAILED the meta-gradient check")

    write_json({"meta": meta, "rows": rows}, out_path)
    print(f"\nwrote {out_path} ({len(rows)} rows, {meta['wall_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
