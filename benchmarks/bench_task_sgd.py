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
Before timing, all implementations are checked to give equal outputs (torch.testing.assert_close); a mismatch
marks the row failed (and the script exits 1). Timing: warm-up, then torch.utils.benchmark.Timer(...)
.blocked_autorange(), --repeats rounds interleaved over the implementations; median and IQR over all measured
blocks. GB/s counts the minimal traffic: params (shared ones once) + grads read, outputs written.

Usage:
  python benchmarks/bench_task_sgd.py                 # full run; CUDA if available, else CPU
  python benchmarks/bench_task_sgd.py --device cpu --quick
  python benchmarks/bench_task_sgd.py --device cuda --out gpu-results/task_sgd_cuda.json
"""
import argparse
import json
import os
import sys
import time

import torch

from mamlext.bench.common import (FOREIGN_LOAD_WARN, MIN_SAMPLES_FOR_NOISE, ForeignLoad, machine_info, summary,
                                  time_impls, wait_quiet)
from mamlext.bench.task_sgd import fmt_size, layer_shapes, numel, task_sgd_impls
from mamlext.train import available_memory

LR = 0.01
DTYPE = torch.float32
ELEMENT_BYTES = torch.finfo(DTYPE).bits // 8
FULL_SIZES = [10**4, 10**5, 10**6, 10**7, 10**8]
QUICK_SIZES = [10**4, 10**6]
TENSOR_COUNTS = [6, 100]
TASK_COUNTS = [1, 32]
SHARED_TASK_COUNTS = [32]  # shared params with T = 1 are the per-task case with a squeezed dimension
# Total measured time per implementation and case (split over the repeats), by total size.
FULL_MIN_RUN_TIME = {10**4: 0.3, 10**5: 0.3, 10**6: 0.45, 10**7: 0.6, 10**8: 1.5}
QUICK_MIN_RUN_TIME = 0.15


def check_equal(outs, ref):
    """None when outs equals ref (the fused outputs), else the first mismatch as text."""
    try:
        if len(outs) != len(ref):
            return f"{len(outs)} outputs instead of {len(ref)}"
        for i, (a, b) in enumerate(zip(outs, ref)):
            torch.testing.assert_close(a, b, msg=lambda m, i=i: f"output {i}: {m}")
    except AssertionError as error:
        return str(error).splitlines()[0][:300]
    return None


def run_case(device, size, n_tensors, tasks, shared, min_run_time, repeats, copy_gbps):
    per_task = max(1, size // tasks)
    shapes = layer_shapes(n_tensors, per_task)
    per_task_actual = sum(numel(s) for s in shapes)
    elements = tasks * per_task_actual
    param_elements = per_task_actual if shared else elements
    traffic = (param_elements + 2 * elements) * ELEMENT_BYTES
    row = {
        "size": size, "size_label": fmt_size(size), "n_tensors": n_tensors, "tasks": tasks,
        "params": "shared" if shared else "per_task", "elements": elements, "per_task_elements": per_task_actual,
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

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=DTYPE)

    params = [rand(*s) if shared else rand(tasks, *s) for s in shapes]
    grads = [rand(tasks, *s) for s in shapes]
    lr = LR

    impls, foreach_names = task_sgd_impls(params, grads, lr, shared)

    ref = impls["fused"]()
    failures = []
    for name, fn in impls.items():
        if name == "fused":
            continue
        problem = check_equal(fn(), ref)
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
        s = stats[name]
        row[f"{key}_median_ms"] = s["median_ms"]
        row[f"{key}_iqr_ms"] = s["iqr_ms"]
        row[f"{key}_q1_ms"] = s["q1_ms"]
        row[f"{key}_q3_ms"] = s["q3_ms"]
        row[f"{key}_samples"] = s["samples"]
        row[f"{key}_gbps"] = traffic / (s["median_ms"] * 1e-3) / 1e9
    row["speedup_vs_loop"] = row["loop_median_ms"] / row["fused_median_ms"]
    row["speedup_vs_foreach"] = row["foreach_median_ms"] / row["fused_median_ms"]
    row["slower_than_foreach"] = row["speedup_vs_foreach"] < 1.0
    # the quartile ranges do not overlap: the difference is larger than the measured noise (None: too few samples)
    enough = min(row["fused_samples"], row["foreach_samples"]) >= MIN_SAMPLES_FOR_NOISE
    row["slower_than_foreach_beyond_noise"] = (row["fused_q1_ms"] > row["foreach_q3_ms"]) if enough else None
    if copy_gbps:
        row["fused_fraction_of_copy_bw"] = row["fused_gbps"] / copy_gbps
    return row


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
            if (r.get("foreign_cpu_load") or 0) > FOREIGN_LOAD_WARN:
                status += f" [noisy: other processes used {r['foreign_cpu_load']:.1f} CPUs]"
            cells.append(status)
        else:
            cells += [""] * (len(cols) - len(cells) - 1) + [r["status"]]
        table.append(cells)
    widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c) for i, c in enumerate(cols)]
    print()
    print(f"task_sgd on {device} (float32, lr={LR}); ms = median per call, (IQR); "
          f"speedups = other impl's median / fused median")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for cells in table:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    if copy:
        print(f"\ndevice-to-device copy: {copy['gbps']:.0f} GB/s ({copy['elements']:,d} floats, 2*bytes/time); "
              "'of copy BW' = fused GB/s / copy GB/s, shown for sizes >= 1e7")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="JSON output path (default bench-results/task_sgd_<device>.json)")
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
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    out_path = args.out or os.path.join("bench-results", f"task_sgd_{args.device}.json")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    meta = machine_info(device)
    meta.update({"device": str(device), "dtype": str(DTYPE), "lr": LR, "quick": args.quick, "repeats": repeats})
    print(f"torch {torch.__version__}, {meta['cpu_model']}, {meta['torch_num_threads']} threads, "
          f"device {device}{' (' + meta['gpu_name'] + ')' if device.type == 'cuda' else ''}, "
          f"fused backend: {meta['fused_backend']}", flush=True)
    if meta["fused_backend"] != "compiled":
        print(f"WARNING: mamlext has no compiled kernels for {device.type}; 'fused' is the pure-PyTorch reference",
              flush=True)
    if meta["loadavg_start"] and meta["cpu_affinity"] and meta["loadavg_start"][0] > 0.5 * meta["cpu_affinity"]:
        print(f"WARNING: 1-minute load average {meta['loadavg_start'][0]:.2f} on {meta['cpu_affinity']} CPUs: "
              "other processes are running, timings will be noisy", flush=True)

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
            load = ForeignLoad()
            try:
                row = run_case(device, size, n_tensors, tasks, shared, min_run_time, repeats,
                               copy["gbps"] if copy else None)
            except torch.OutOfMemoryError as error:  # a skip, not a failure of the op
                row = {"size": size, "size_label": fmt_size(size), "n_tensors": n_tensors, "tasks": tasks,
                       "params": "shared" if shared else "per_task", "elements": 0,
                       "status": f"skipped: out of memory ({str(error).splitlines()[0][:120]})"}
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row["foreign_cpu_load"] = load.cpus()
            row["attempts"] = attempt + 1
            noisy = row["foreign_cpu_load"] is not None and row["foreign_cpu_load"] > FOREIGN_LOAD_WARN
            note = f"  [other processes used {row['foreign_cpu_load']:.1f} CPUs: noisy]" if noisy else ""
            print(f"[{k:>2}/{len(cases)} {time.perf_counter() - start:6.1f}s] {case_line(row)}{note}", flush=True)
            if not noisy or row["status"] != "ok":
                break
            if attempt < args.retry_noisy:
                print("        ... measuring this case again", flush=True)
        rows.append(row)

    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    noisy = [r for r in rows if (r.get("foreign_cpu_load") or 0) > FOREIGN_LOAD_WARN]
    meta["noisy_rows"] = len(noisy)
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
    if noisy:
        print(f"\nWARNING: {len(noisy)} case(s) ran while other processes used more than {FOREIGN_LOAD_WARN} CPUs; "
              "their timings (above all the multi-threaded ones) are not trustworthy: rerun on a quiet machine")
    if failed:
        print(f"\n{len(failed)} case(s) FAILED the equality check")

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "copy_bandwidth": copy, "rows": rows}, f, indent=2)
    print(f"\nwrote {out_path} ({len(rows)} rows, {meta['wall_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
