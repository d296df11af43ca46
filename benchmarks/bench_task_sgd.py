#!/usr/bin/env python
"""Benchmark of the fused mamlext.ops.task_sgd against plain PyTorch.

Three implementations of ``out[i][t] = params[i][t or shared] - lr * grads[i][t]`` (float lr, float32):

  fused    mamlext.ops.task_sgd(params, grads, lr)   (the public API, called in default grad mode, as MAML does)
  loop     [p - lr * g for p, g in zip(params, grads)]
  foreach  torch._foreach_* -- per-task params: torch._foreach_add(params, grads, alpha=-lr), one multi-tensor op.
           Shared params need broadcasting, which the foreach ops only do on their per-tensor (slow) path. Two
           formulations are timed and the faster one is reported per case (its name is in the row):
             "add(expand)": torch._foreach_add([p.expand_as(g)], grads, alpha=-lr), the expand views made once,
                            outside the timed region (favours foreach), one pass;
             "mul+add_":    out = torch._foreach_mul(grads, -lr); torch._foreach_add_(out, params), two passes.

Cases: N in {6, 100} tensors (weight matrices [out, in] and bias vectors [out] of uneven widths), total sizes
1e4..1e8 elements (total = T * per-task size), T in {1, 32}, per-task params; shared params for T = 32.
Before timing, all implementations are checked to give the fused outputs (normwise relative error per tensor
<= 1e-6, as in `python -m mamlext bench`); a mismatch marks the row failed (and the script exits 1). Timing (the
suite's): warm-up, then torch.utils.benchmark.Timer(...).blocked_autorange(), --repeats rounds interleaved over the
implementations; median and IQR over all measured blocks. GB/s counts the minimal traffic: params (shared ones
once) + grads read, outputs written.

Usage:
  python benchmarks/bench_task_sgd.py                 # full run; CUDA if available, else CPU
  python benchmarks/bench_task_sgd.py --device cpu --quick
  python benchmarks/bench_task_sgd.py --device cuda --out gpu-results/task_sgd_cuda.json
"""
import os
import sys
import time

import torch

from mamlext.bench import suite
from mamlext.bench.common import (FOREIGN_LOAD_WARN, MIN_SAMPLES_FOR_NOISE, load_average, machine_info,
                                  measure_case, mismatch, noisy, noisy_note, pick_device, print_machine, script_parser,
                                  summary, time_impls, wait_quiet, write_json)
from mamlext.bench.report import aligned
from mamlext.bench.task_sgd import fmt_size, layer_shapes, numel, random_inputs, task_sgd_impls
from mamlext.train import available_memory

LR = suite.TASK_SGD_LR
DTYPE = suite.DTYPE
RTOL = suite.RTOL[DTYPE]["task_sgd"]
ELEMENT_BYTES = torch.finfo(DTYPE).bits // 8
FULL_SIZES = [10**4, 10**5, 10**6, 10**7, 10**8]
QUICK_SIZES = [10**4, 10**6]
TENSOR_COUNTS = [6, 100]
TASK_COUNTS = [1, 32]
SHARED_TASK_COUNTS = [32]  # shared params with T = 1 are the per-task case with a squeezed dimension
# Total measured time per implementation and case (split over the repeats), by total size.
FULL_MIN_RUN_TIME = {10**4: 0.3, 10**5: 0.3, 10**6: 0.45, 10**7: 0.6, 10**8: 1.5}
QUICK_MIN_RUN_TIME = 0.15


def run_case(device, size, n_tensors, tasks, shared, min_run_time, repeats, copy_gbps):
    per_task = max(1, size // tasks)
    shapes = layer_shapes(n_tensors, per_task)
    per_task_actual = sum(numel(s) for s in shapes)
    elements = tasks * per_task_actual
    param_elements = per_task_actual if shared else elements
    traffic = (param_elements + 2 * elements) * ELEMENT_BYTES
    row = {
        **case_fields(size, n_tensors, tasks, shared), "elements": elements, "per_task_elements": per_task_actual,
        "largest_tensor_elements": max(tasks * numel(s) for s in shapes), "bytes_moved": traffic,
        "status": "ok",
    }
    # inputs + 3 checked outputs + the loop's temporary + slack
    need = (param_elements + 2 * elements + 3 * elements) * ELEMENT_BYTES * 1.2
    free = available_memory(device)
    if free is not None and need > 0.85 * free:
        row["status"] = f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        return row

    gen = torch.Generator(device=device).manual_seed(size + n_tensors + tasks)
    params, grads = random_inputs(shapes, tasks, shared, gen, DTYPE)
    impls, foreach_names = task_sgd_impls(params, grads, LR, shared)

    ref = impls["fused"]()
    failures = []
    for name, fn in impls.items():
        if name == "fused":
            continue
        problem = mismatch(fn(), ref, RTOL)
        if problem:
            failures.append(f"{name} != fused: {problem}")
    del ref
    if failures:
        row["status"] = "FAILED: " + "; ".join(failures)
        return row

    warmup = 3 if elements <= 10**7 else 1
    times = time_impls(impls, device, min_run_time, repeats, warmup)
    stats = {name: summary(t) for name, t in times.items()}
    best_foreach = min(foreach_names, key=lambda name: stats[name]["median_ms"])
    row["foreach_variant"] = best_foreach.split(":", 1)[1]
    row["foreach_variants_median_ms"] = {name.split(":", 1)[1]: stats[name]["median_ms"] for name in foreach_names}
    for key, name in (("fused", "fused"), ("loop", "loop"), ("foreach", best_foreach)):
        row.update({f"{key}_{stat}": value for stat, value in stats[name].items()})
        row[f"{key}_gbps"] = traffic / (stats[name]["median_ms"] * 1e-3) / 1e9
    row["speedup_vs_loop"] = row["loop_median_ms"] / row["fused_median_ms"]
    row["speedup_vs_foreach"] = row["foreach_median_ms"] / row["fused_median_ms"]
    row["slower_than_foreach"] = row["speedup_vs_foreach"] < 1.0
    # the quartile ranges do not overlap: the difference is larger than the measured noise (None: too few samples)
    enough = min(row["fused_samples"], row["foreach_samples"]) >= MIN_SAMPLES_FOR_NOISE
    row["slower_than_foreach_beyond_noise"] = (row["fused_q1_ms"] > row["foreach_q3_ms"]) if enough else None
    if copy_gbps:
        row["fused_fraction_of_copy_bw"] = row["fused_gbps"] / copy_gbps
    return row


def case_fields(size, n_tensors, tasks, shared):
    return {"size": size, "size_label": fmt_size(size), "n_tensors": n_tensors, "tasks": tasks,
            "params": "shared" if shared else "per_task"}


def measure_copy_bandwidth(device, repeats):
    """Device-to-device copy of 2^28 floats (1 GiB), GB/s counted as 2 * bytes (read + write)."""
    n = 2**28
    free = available_memory(device)
    while free is not None and 2 * n * ELEMENT_BYTES > 0.5 * free and n > 2**20:
        n //= 2
    src = torch.randn(n, device=device, dtype=DTYPE)
    dst = torch.empty_like(src)
    times = time_impls({"copy": lambda: dst.copy_(src)}, device, 1.0, repeats, warmup=3)["copy"]
    s = summary(times)
    gbps = 2 * n * ELEMENT_BYTES / (s["median_ms"] * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return {"elements": n, "median_ms": s["median_ms"], "iqr_ms": s["iqr_ms"], "gbps": gbps}


def case_line(row):
    head = (f"{row['size_label']:>5} N={row['n_tensors']:<3} T={row['tasks']:<2} {row['params']:<8} "
            f"({row['elements']:>11,d} el)")
    if row["status"] != "ok":
        return f"{head}  {row['status']}"
    return (f"{head}  fused {row['fused_median_ms']:9.3f} ms  loop {row['loop_median_ms']:9.3f} ms  "
            f"foreach {row['foreach_median_ms']:9.3f} ms  {row['fused_gbps']:7.1f} GB/s  "
            f"x{row['speedup_vs_loop']:.2f} vs loop  x{row['speedup_vs_foreach']:.2f} vs foreach")


NOISE_NOTE = {True: " (beyond noise: IQRs do not overlap)", False: " (within noise: IQRs overlap)",
              None: " (too few samples to tell noise)"}


def print_table(rows, copy, device):
    cols = ["size", "N", "T", "params", "elements", "fused ms (IQR)", "loop ms (IQR)", "foreach ms (IQR)",
            "foreach form", "fused GB/s", "vs loop", "vs foreach"]
    if copy:
        cols.append("of copy BW")
    cols.append("status")
    table = []
    for r in rows:
        cells = [r["size_label"], str(r["n_tensors"]), str(r["tasks"]), r["params"], f"{r['elements']:,d}"]
        if r["status"] == "ok":
            cells += [f"{r[k + '_median_ms']:.4g} ({r[k + '_iqr_ms']:.2g})" for k in ("fused", "loop", "foreach")]
            cells += [r["foreach_variant"], f"{r['fused_gbps']:.1f}", f"{r['speedup_vs_loop']:.2f}x",
                      f"{r['speedup_vs_foreach']:.2f}x"]
            if copy:
                cells.append(f"{100 * r['fused_fraction_of_copy_bw']:.0f}%" if r["size"] >= 10**7 else "")
            status = "ok"
            if r["slower_than_foreach"]:
                status = "SLOWER than foreach" + NOISE_NOTE[r["slower_than_foreach_beyond_noise"]]
            cells.append(status + noisy_note(r.get("foreign_cpu_load")))
        else:
            cells += [""] * (len(cols) - len(cells) - 1) + [r["status"]]
        table.append(cells)
    title = (f"task_sgd on {device} (float32, lr={LR}); ms = median per call, (IQR); "
             "speedups = other impl's median / fused median")
    print("\n" + "\n".join(aligned(cols, table, [title])))
    if copy:
        print(f"\ndevice-to-device copy: {copy['gbps']:.0f} GB/s ({copy['elements']:,d} floats, 2*bytes/time); "
              "'of copy BW' = fused GB/s / copy GB/s, shown for sizes >= 1e7")


def main(argv=None):
    parser = script_parser(__doc__, "task_sgd")
    parser.add_argument("--quick", action="store_true", help="tiny run (sizes 1e4 and 1e6, short timings)")
    parser.add_argument("--sizes", help="comma-separated total sizes to run instead, e.g. 1e7,1e8")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="before each case, wait up to S seconds for other processes to leave the CPUs idle "
                             "(for shared machines; default 0: do not wait)")
    parser.add_argument("--retry-noisy", type=int, default=0, metavar="K",
                        help="measure a case again, up to K times, when other processes used the CPUs meanwhile")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of blocked_autorange per implementation, interleaved (default 3, quick 1)")
    args = parser.parse_args(argv)
    device = pick_device(parser, args.device)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    out_path = args.out or os.path.join("bench-results", f"task_sgd_{device.type}.json")

    meta = machine_info(device)
    meta.update({"device": str(device), "dtype": str(DTYPE), "lr": LR, "quick": args.quick, "repeats": repeats})
    print_machine(meta, device, "task_sgd kernel", meta["fused_backend"] == "compiled")

    copy = None
    if device.type == "cuda":
        copy = measure_copy_bandwidth(device, repeats)
        print(f"device-to-device copy bandwidth: {copy['gbps']:.0f} GB/s", flush=True)

    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    if args.sizes:
        sizes = [int(float(x)) for x in args.sizes.split(",") if x.strip()]
    cases = []
    for size in sizes:
        for n_tensors in TENSOR_COUNTS:
            for tasks in TASK_COUNTS:
                cases.append((size, n_tensors, tasks, False))
            for tasks in SHARED_TASK_COUNTS:
                cases.append((size, n_tensors, tasks, True))

    rows = []
    start = time.perf_counter()
    for k, (size, n_tensors, tasks, shared) in enumerate(cases, 1):
        min_run_time = QUICK_MIN_RUN_TIME if args.quick else FULL_MIN_RUN_TIME.get(size, 0.5)
        for attempt in range(1 + args.retry_noisy):
            if args.wait_quiet:
                wait_quiet(args.wait_quiet)
            row = measure_case(lambda: run_case(device, size, n_tensors, tasks, shared, min_run_time, repeats,
                                                copy["gbps"] if copy else None),
                               {**case_fields(size, n_tensors, tasks, shared), "elements": 0}, device)
            row["attempts"] = attempt + 1
            print(f"[{k:>2}/{len(cases)} {time.perf_counter() - start:6.1f}s] {case_line(row)}"
                  f"{noisy_note(row['foreign_cpu_load'])}", flush=True)
            if not noisy(row["foreign_cpu_load"]) or row["status"] != "ok":
                break
            if attempt < args.retry_noisy:
                print("        ... measuring this case again", flush=True)
        rows.append(row)

    meta["loadavg_end"] = load_average()
    meta["noisy_rows"] = sum(noisy(r["foreign_cpu_load"]) for r in rows)
    meta["wall_s"] = time.perf_counter() - start
    print_table(rows, copy, device)

    slower = [r for r in rows if r["status"] == "ok" and r["slower_than_foreach"]]
    failed = [r for r in rows if r["status"].startswith("FAILED")]
    if slower:
        print("\nfused is slower than torch._foreach_* in:")
        for r in slower:
            print(f"  {r['size_label']} N={r['n_tensors']} T={r['tasks']} {r['params']}: "
                  f"{r['fused_median_ms']:.4g} ms vs {r['foreach_median_ms']:.4g} ms "
                  f"= {100 * (r['fused_median_ms'] / r['foreach_median_ms'] - 1):.1f}% slower"
                  f"{NOISE_NOTE[r['slower_than_foreach_beyond_noise']]}")
    else:
        print("\nfused is at least as fast as torch._foreach_* in every measured case")
    if meta["noisy_rows"]:
        print(f"\nWARNING: {meta['noisy_rows']} case(s) ran while other processes used more than "
              f"{FOREIGN_LOAD_WARN} CPUs; their timings (above all the multi-threaded ones) are not trustworthy: "
              "rerun on a quiet machine")
    if failed:
        print(f"\n{len(failed)} case(s) FAILED the equality check")

    write_json({"meta": meta, "copy_bandwidth": copy, "rows": rows}, out_path)
    print(f"\nwrote {out_path} ({len(rows)} rows, {meta['wall_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
