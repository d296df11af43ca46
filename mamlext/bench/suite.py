"""The benchmark suite of `python -m mamlext bench`: every implementation of a workload, in one process, on the same
data and initial parameters; meta-gradients checked against the plain loop's before anything is timed.

Workloads (implementations in mamlext.bench.impls):
  mlp       Finn et al.'s sinusoid regression, 1-w-w-1 ReLU MLP, MSE, K = 10 support + 10 query points, inner lr 0.01;
            loop, vmap, higher, torchopt, fused (the fused MLP engine), generic-graph (the generic engine)
  conv4     Omniglot-shaped N-way 1-shot classification with the Conv4 of mamlext.models.conv4 (BatchNorm in
            training mode), random 28x28 images, cross-entropy, second order; loop, vmap, higher, torchopt,
            generic-graph, generic-low, generic-low-chunk1 (memory="low", task_chunk=1)
  imaml     iMAML's inner solve and conjugate-gradient meta-gradient on the sinusoid MLP; loop, vmap, fused
            (mamlext.iMAML)
  task_sgd  the inner SGD update alone, T = 32 tasks of 6 tensors, over total sizes; loop, foreach, fused
  distributed  (only with --distributed P, after the others) meta-training throughput on the sinusoid MLP at
            T = 1000 with the meta-batch split across 1 and P CPU processes (gloo; mamlext.bench.distributed), and
            the scaling tasks/s(P) / tasks/s(1); results.json's "distributed" section

Per case: every implementation runs once in float64 on the same data and initial parameters (at most
CHECK_MAX_TASKS tasks), and its result is checked against the float64 loop's (normwise relative error per tensor <= the workload's rtol; see CHECK_DTYPE); a
mismatch marks its row failed; then, in float32, a warm-up call, one call
measures peak memory, then all passing implementations are timed in interleaved rounds (mamlext.bench.common
.time_impls). The loop's timing is skipped where one call of it takes longer than the suite's loop_max_call_s
(60 s for Conv4 on the CPU; its meta-gradient still serves as the reference), and speedups against it are then
missing.
"""
import argparse
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from mamlext.bench import distributed as distributed_bench
from mamlext.bench import impls as implementations
from mamlext.bench.common import (FOREIGN_LOAD_WARN, MEMORY_KINDS, ForeignLoad, add_device_argument, default_device,
                                  first_call, load_average, machine_info, max_rel_error, mismatch, noisy, peak_memory,
                                  pick_device, summary, time_impls, write_json)
from mamlext.bench.impls import IMAML_IMPLS, MAML_IMPLS, MAMLEXT_IMPLS, IMAMLSetting, Setting, Skip
from mamlext.bench.task_sgd import fmt_size, layer_shapes, random_inputs, task_sgd_impls
from mamlext.data.sinusoid import SinusoidTasks
from mamlext.models import conv4, sine_mlp

SCHEMA_VERSION = 1
SUITES = ("quick", "full", "dropin", "rl")  # rl: MAML-TRPO, its own runner (mamlext.bench.rl)
WORKLOADS = ("mlp", "conv4", "imaml", "task_sgd")
DISTRIBUTED = "distributed"  # a --workloads name that selects only the --distributed measurement
DISTRIBUTED_TASKS = 1000
# mamlext.bench.distributed.run's timing per suite: iterations per world size, and how long each waits for idle cores
DISTRIBUTED_TIMING = {"quick": dict(warmup=2, blocks=4, iters_per_block=3, quiet_wait_s=2.0),
                      "full": dict(warmup=3, blocks=8, iters_per_block=5, quiet_wait_s=10.0)}
DISTRIBUTED_TIMING["dropin"] = DISTRIBUTED_TIMING["full"]
REFERENCE = "loop"
DTYPE = torch.float32
SINE_SHOTS = SINE_QUERIES = 10
SINE_INNER_LR = 0.01
CONV_INNER_LR = {5: 0.4, 20: 0.1}  # MAML's Omniglot settings
IMAML = dict(inner_lr=0.01, steps=5, lam=10.0, cg_steps=5)  # lam large enough for CG to converge on the sinusoids
TASK_SGD_TASKS, TASK_SGD_TENSORS, TASK_SGD_LR = 32, 6, 0.01
# The check runs every implementation once in float64 on the same data and initial parameters, and compares with
# the float64 loop; the timing runs in float32. Comparing float32 results says little: second-order MAML amplifies
# rounding so much that the float32 loop itself is 2.4 (relative) from the float64 one on Conv4-32 20-way N = 5,
# where every float64 implementation agrees with the loop to 2e-13, and 1e-3 from it on 1-256-256-1 T = 1000 N = 5.
CHECK_DTYPE = torch.float64
# The check runs the case with at most this many tasks (its first ones' worth of data): the engines treat tasks alike,
# and a float64 Conv4 20-way T = 32 N = 5 second-order graph does not fit in 24 GB.
CHECK_MAX_TASKS = 8
# Normwise relative tolerance per tensor, by the dtype of the check (float32 only for builders given by tests).
RTOL = {torch.float64: {"mlp": 1e-6, "conv4": 1e-6, "imaml": 1e-6, "task_sgd": 1e-12},
        torch.float32: {"mlp": 2e-3, "conv4": 2e-3, "imaml": 2e-3, "task_sgd": 1e-6}}
# The learn2learn-style loops (clone / adapt / backward per task): learn2learn's algorithm written out, learn2learn
# itself when installed, the one-import swap to mamlext.MAML and its floor, the same loop on mamlext's ops without a
# module; learn2learn's MetaSGD written out and its swap mamlext.MetaSGD (rates all inner_lr: MAML's meta-gradient);
# higher's loop on mamlext.innerloop_ctx (cases with learner_loops: the quick and dropin suites); the speed-ups are
# also given against the first two.
LEARNER_LOOPS = ("l2l-style", "learn2learn", "mamlext.MAML", "ops-only", "metasgd-style", "mamlext.MetaSGD",
                 "mamlext.innerloop_ctx")
BASELINES = ("loop", "vmap", "l2l-style", "learn2learn")
LABELS = {"loop": "plain loop", "vmap": "torch.func vmap", "higher": "higher", "torchopt": "torchopt",
          "l2l-style": "l2l-style loop", "learn2learn": "learn2learn", "mamlext.MAML": "mamlext.MAML",
          "metasgd-style": "l2l-style MetaSGD loop", "mamlext.MetaSGD": "mamlext.MetaSGD",
          "mamlext.innerloop_ctx": "mamlext.innerloop_ctx (higher's loop)",
          "ops-only": "ops-only loop",
          "fused": "mamlext fused", "generic-graph": "mamlext generic (graph)",
          "generic-low": "mamlext generic (low)", "generic-low-chunk1": "mamlext generic (low, task_chunk=1)",
          "foreach": "torch._foreach"}
VMAP_NOTE = ("vmap runs the model as it is: under torch.func.vmap an nn.BatchNorm2d in training mode gives wrong "
             "meta-gradients (functorch issue 534), so the conv4 vmap rows fail the meta-gradient check instead of "
             "reporting a speed; batch norm is deliberately not rewritten from primitive ops")


LOOP_NO_SECOND_CALL = 3.0  # a loop whose first call took this many times its cap is not called again
# The loop's cap per workload, in multiples of the suite's: a Conv4 meta-iteration is compute-bound, every
# implementation takes seconds on a CPU, and the loop is the baseline the speedups need.
LOOP_CAP_SCALE = {"conv4": 15.0}


class Case(NamedTuple):
    workload: str
    family: str  # the case without its task count: one line of the plot
    tasks: int
    steps: Optional[int]  # inner steps (None for task_sgd)
    params: dict  # workload-specific: width, first_order, ways, queries, hidden, size
    learner_loops: bool = False  # also the learn2learn-style loops (LEARNER_LOOPS): the quick and dropin suites

    @property
    def name(self) -> str:
        return f"{self.family}-T{self.tasks}"


class SuiteSettings(NamedTuple):
    repeats: int  # interleaved timing rounds
    min_run_time: float  # measured seconds per implementation and case, over all rounds
    loop_max_call_s: float  # the loop is not timed where one call takes longer (times LOOP_CAP_SCALE)


def _mlp(width, tasks, steps, first_order, learner_loops=False):
    return Case("mlp", f"sine{width}-N{steps}-{'FO' if first_order else 'SO'}", tasks, steps,
                {"width": width, "first_order": first_order}, learner_loops)


def _conv(ways, queries, hidden, tasks, steps, learner_loops=False):
    return Case("conv4", f"conv4-{hidden}-{ways}way1shot-N{steps}-SO", tasks, steps,
                {"ways": ways, "shots": 1, "queries": queries, "hidden": hidden, "first_order": False}, learner_loops)


def _imaml(tasks):
    return Case("imaml", "imaml-sine40", tasks, IMAML["steps"], dict(IMAML, width=40))


def _task_sgd(size):
    return Case("task_sgd", f"task_sgd-{fmt_size(size)}", TASK_SGD_TASKS, None,
                {"size": size, "n_tensors": TASK_SGD_TENSORS})


def cases(suite: str, device: torch.device) -> List[Case]:
    """The cases of a suite on a device. The full suite's Conv4 has 64 filters on the GPU and 32 on the CPU (64
    would take the CPU suite past 20 minutes on 2 cores)."""
    if suite == "quick":
        return ([_mlp(40, t, 1, False, learner_loops=True) for t in (5, 20)] + [_mlp(40, 10, 2, True)]
                + [_conv(5, 2, 8, 2, 1, learner_loops=True)] + [_imaml(4)] + [_task_sgd(10**4)])
    if suite == "dropin":  # the learn2learn user's loop and its swaps: the sinusoid MLP and Conv4, second order
        hidden = 64 if device.type == "cuda" else 32
        return [_mlp(40, 25, 1, False, True), _mlp(40, 25, 5, False, True), _mlp(40, 250, 1, False, True),
                _conv(5, 15, hidden, 8, 1, True)]
    if suite != "full":
        raise ValueError(f"suite must be one of {list(SUITES)}, got {suite!r}")
    hidden = 64 if device.type == "cuda" else 32
    out = [_mlp(width, t, n, fo) for width in (40, 256) for fo in (False, True) for n in (1, 5)
           for t in (25, 250, 1000)]
    out += [_conv(ways, queries, hidden, t, n) for ways, queries in ((5, 15), (20, 5)) for n in (1, 5)
            for t in (8, 32)]
    out += [_imaml(t) for t in (25, 250)]
    out += [_task_sgd(size) for size in (10**4, 10**6, 10**7)]
    return out


def suite_settings(suite: str, device: torch.device) -> SuiteSettings:
    if suite == "quick":
        return SuiteSettings(2, 0.1, 5.0)
    # GPU calls are short and many: less measured time per implementation, and the loop's cap lower
    return SuiteSettings(3, 0.3, 1.5) if device.type == "cuda" else SuiteSettings(3, 0.6, 4.0)


# --- building a case: model, data and implementations ---------------------------------------------------------------

class Built(NamedTuple):
    data: tuple
    builders: Dict[str, Callable[[], Callable[[], List[Tensor]]]]  # name -> () -> run; raises Skip


def _maml_builders(model, setting, data, names):
    return {name: (lambda name=name: MAML_IMPLS[name](model, setting, data)) for name in names}


def problem(case: Case, device: torch.device, seed: int, dtype: torch.dtype = DTYPE) -> Tuple[nn.Module, tuple, tuple]:
    """(model, setting, data) of an mlp, imaml or conv4 case: the model initialised from `seed`, the tasks' data
    (xs, ys, xq, yq) drawn from seed + 1, the Setting (IMAMLSetting for imaml) its implementations take."""
    torch.manual_seed(seed)
    p = case.params
    if case.workload in ("mlp", "imaml"):
        model = sine_mlp(p["width"]).to(device=device, dtype=dtype)
        batch = SinusoidTasks(seed=seed + 1, dtype=dtype, device=device).sample(case.tasks, SINE_SHOTS,
                                                                                SINE_QUERIES)
        data = (batch.x_support, batch.y_support, batch.x_query, batch.y_query)
        if case.workload == "mlp":
            return model, Setting(SINE_INNER_LR, case.steps, p["first_order"], "mse"), data
        return model, IMAMLSetting(p["inner_lr"], p["steps"], p["lam"], p["cg_steps"], "mse"), data
    if case.workload == "conv4":
        ways, shots, queries = p["ways"], p["shots"], p["queries"]
        model = conv4(ways, hidden=p["hidden"]).to(device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        images = lambda per_class: torch.randn(case.tasks, ways * per_class, 1, 28, 28, generator=gen,  # noqa: E731
                                               device=device, dtype=dtype)
        labels = lambda per_class: torch.arange(ways, device=device).repeat_interleave(per_class).repeat(  # noqa: E731
            case.tasks, 1)
        data = (images(shots), labels(shots), images(queries), labels(queries))
        return model, Setting(CONV_INNER_LR[ways], case.steps, p["first_order"], "ce"), data
    raise ValueError(f"no model for workload {case.workload!r}; mlp, imaml and conv4 have one")


def build_case(case: Case, device: torch.device, seed: int, dtype: torch.dtype = DTYPE) -> Built:
    if case.workload == "task_sgd":
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        shapes = layer_shapes(case.params["n_tensors"], max(1, case.params["size"] // case.tasks))
        params, grads = random_inputs(shapes, case.tasks, False, gen, dtype)
        impls, _ = task_sgd_impls(params, grads, TASK_SGD_LR, shared=False)
        named = {"loop": impls["loop"], "foreach": impls["foreach:add"], "fused": impls["fused"]}
        return Built((params, grads), {name: (lambda fn=fn: fn) for name, fn in named.items()})
    model, setting, data = problem(case, device, seed, dtype)
    if case.workload == "imaml":
        return Built(data, {name: (lambda fn=fn: fn(model, setting, data)) for name, fn in IMAML_IMPLS.items()})
    loops = LEARNER_LOOPS if case.learner_loops else ()
    engines = ("fused", "generic-graph") if case.workload == "mlp" else (
        "generic-graph", "generic-low", "generic-low-chunk1")
    return Built(data, _maml_builders(model, setting, data, ("loop", *loops, "vmap", "higher", "torchopt", *engines)))


# --- running a case --------------------------------------------------------------------------------------------------

def _row(case: Case, impl: str) -> dict:
    return {"workload": case.workload, "case": case.name, "family": case.family, "impl": impl,
            "label": LABELS.get(impl, impl), "tasks": case.tasks, "steps": case.steps, **case.params,
            "status": "ok", "reason": None, "rel_error": None, "first_call_s": None, "second_call_s": None,
            "median_ms": None,
            "iqr_ms": None, "q1_ms": None, "q3_ms": None, "samples": None, "tasks_per_s": None,
            **{f"speedup_vs_{baseline}": None for baseline in BASELINES}, "peak_mem_bytes": None}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _build_runs(builders: Dict[str, Callable], rows: Dict[str, dict]) -> Dict[str, Callable[[], List[Tensor]]]:
    """The implementations that build; the others' rows say why not."""
    runs = {}
    for name, build in builders.items():
        if rows[name]["status"] != "ok":
            continue
        try:
            runs[name] = build()
        except Skip as skip:
            rows[name].update(status="skipped", reason=str(skip))
        except Exception as error:  # an implementation that breaks is a failed row, not a crashed suite
            rows[name].update(status="failed", reason=f"could not be built: {_first_line(error)}")
    return runs


def _first_calls(runs, rows, device, time_it: bool) -> Dict[str, List[Tensor]]:
    """Each implementation's first call (its outputs); one that raises is a failed row."""
    outputs = {}
    for name, run in list(runs.items()):
        try:
            outputs[name], seconds = first_call(run, device)
            if time_it:
                rows[name]["first_call_s"] = seconds
        except Exception as error:
            rows[name].update(status="failed", reason=f"raised {_first_line(error)}")
            del runs[name]
    return outputs


def run_case(case: Case, device: torch.device, settings: SuiteSettings, seed: int = 0,
             builders: Optional[Dict[str, Callable]] = None) -> List[dict]:
    """One row per implementation of the case: checked in CHECK_DTYPE, then timed in DTYPE. `builders` replaces
    the case's implementations (tests); they are then checked as they are."""
    check_builders = builders
    if builders is None:
        builders = build_case(case, device, seed).builders
        check_builders = build_case(case._replace(tasks=min(case.tasks, CHECK_MAX_TASKS)), device, seed,
                                    CHECK_DTYPE).builders
    rows = {name: _row(case, name) for name in builders}

    # The check: every implementation against the plain loop, on the same data and initial parameters.
    check_runs = _build_runs(check_builders, rows)
    outputs = _first_calls(check_runs, rows, device, time_it=check_builders is builders)
    del check_runs
    reference = outputs.get(REFERENCE)
    for name in list(outputs):
        if name == REFERENCE:
            continue
        if reference is None:
            rows[name].update(status="failed", reason="no reference: the plain loop did not run")
            continue
        rtol = RTOL[reference[0].dtype][case.workload]
        bad = mismatch(outputs[name], reference, rtol)
        rows[name]["rel_error"] = None if bad and "rel. error" not in bad else max_rel_error(outputs[name], reference)
        if bad:
            what = "output" if case.workload == "task_sgd" else "meta-gradient"
            rows[name].update(status="failed", reason=f"{what} disagrees with the plain loop's ({bad})")
    del outputs, reference
    # The timed implementations: those that passed, their first call a warm-up.
    runs = _build_runs(builders, rows)
    _first_calls(runs, rows, device, time_it=True)
    loop_cap_s = settings.loop_max_call_s * LOOP_CAP_SCALE.get(case.workload, 1.0)
    # Peak memory, from each implementation's second call, whose duration also decides whether the loop is timed
    # (a first call can be slowed by one-time initialisation; one far over the cap is not called again).
    loop_first_s = rows[REFERENCE]["first_call_s"] if REFERENCE in runs else None
    if loop_first_s is not None and loop_first_s > LOOP_NO_SECOND_CALL * loop_cap_s:
        rows[REFERENCE].update(status="skipped", reason=(
            f"not timed: its first call took {loop_first_s:.1f} s (> {loop_cap_s:g} s cap); it ran "
            "once, as the reference of the check"))
        del runs[REFERENCE]
    for name, run in list(runs.items()):
        start = time.perf_counter()
        try:
            rows[name]["peak_mem_bytes"], _ = peak_memory(run, device)
        except Exception as error:  # e.g. out of memory on its second call
            rows[name].update(status="failed", reason=f"raised {_first_line(error)}")
            del runs[name]
            continue
        rows[name]["second_call_s"] = time.perf_counter() - start
    if REFERENCE in runs and rows[REFERENCE]["second_call_s"] > loop_cap_s:
        rows[REFERENCE].update(status="skipped", reason=(
            f"not timed: one call took {rows[REFERENCE]['second_call_s']:.1f} s (> {loop_cap_s:g} s cap); it "
            "ran as the reference of the check"))
        del runs[REFERENCE]

    # Fast implementations get one more warm-up call (caches, allocator); slow ones are warm enough.
    slow = any(rows[name]["second_call_s"] > 1.0 for name in runs)
    times = time_impls(runs, device, settings.min_run_time, settings.repeats, warmup=0 if slow else 1)
    for name in runs:
        stats = summary(times[name])
        rows[name].update(stats)
        rows[name]["tasks_per_s"] = case.tasks / (stats["median_ms"] * 1e-3)
    for baseline in BASELINES:
        if baseline not in runs:
            continue
        for name in runs:
            if name != baseline:
                rows[name][f"speedup_vs_{baseline}"] = rows[baseline]["median_ms"] / rows[name]["median_ms"]
    return list(rows.values())


# --- the whole suite -------------------------------------------------------------------------------------------------

def notes(workloads, impl_names) -> List[str]:
    """What a reader of the results must know about the implementations that took part."""
    out = []
    for lib in ("learn2learn", "higher", "torchopt"):
        if lib in impl_names and not implementations.importable(lib):
            out.append(f"{lib} is not installed: its rows are skipped (pip install {lib} to include it)")
    if {"higher", "torchopt"} & set(impl_names):
        out.append("higher and torchopt run second-order cases only (no first-order mode that yields meta-gradients)")
    if {"generic-graph", "generic-low", "generic-low-chunk1"} & set(impl_names) \
            and not implementations.generic_available():
        out.append("this mamlext has no generic engine: the generic-graph / generic-low rows are skipped")
    if "conv4" in workloads and "vmap" in impl_names:
        out.append(VMAP_NOTE)
    return out


def run_distributed(suite: str, processes: int, progress: bool = True) -> dict:
    """results.json's "distributed" section: tasks/s with the meta-batch split across 1 and `processes` CPU
    processes, and the scaling (mamlext.bench.distributed.run); a failure is reported in it, not raised."""
    try:
        section = distributed_bench.run((1, processes), DISTRIBUTED_TASKS, progress=progress,
                                        **DISTRIBUTED_TIMING[suite])
    except Exception as error:  # e.g. a rank that could not start: the rest of the suite's results still count
        return {"status": "failed", "reason": f"raised {_first_line(error)}"}
    del section["machine"]  # the suite's own machine section describes it; rows carry the threads per process
    return {"status": "ok", "reason": None, **section, "timing": DISTRIBUTED_TIMING[suite]}


def distributed_notes(section: dict, processes: int) -> List[str]:
    out = []
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cpus is not None and processes > cpus:
        out.append(f"distributed: {processes} processes on {cpus} CPUs share cores; the scaling measures that")
    noisy = [row["world_size"] for row in section.get("rows", []) if row["noisy"]]
    if noisy:
        out.append(f"distributed: the rows with {', '.join(map(str, noisy))} process(es) ran while other processes "
                   f"used more than {FOREIGN_LOAD_WARN} CPUs: their timings and the scaling are noisy")
    return out


def run_suite(suite: str, device: torch.device, out_dir: str, workloads=WORKLOADS, seed: int = 0,
              progress: bool = True, command: Optional[str] = None, time_budget_s: Optional[float] = None,
              distributed_processes: Optional[int] = None) -> dict:
    """Runs the suite, writes out_dir/results.json (after every case, so an interrupted run keeps what it measured)
    and, at the end, out_dir/results.md (the table in Markdown) and out_dir/speedup.png; prints the table. Once
    time_budget_s has passed, the cases not started get skipped rows. With distributed_processes = P (CPU only),
    the distributed measurement with 1 and P processes runs last, into results["distributed"]. Returns the
    results dict."""
    from tqdm.auto import tqdm

    from mamlext.bench.report import format_table, markdown_table, plot_speedups

    if suite == "rl":
        from mamlext.bench import rl as rl_bench
        return rl_bench.run(device, out_dir, seed=seed, progress=progress, command=command)
    if distributed_processes is not None and device.type != "cpu":
        raise ValueError(f"the distributed measurement runs CPU processes (gloo) only, not on {device}")

    settings = suite_settings(suite, device)
    selected = [c for c in cases(suite, device) if c.workload in workloads]
    full_conv_on_cpu = suite == "full" and device.type != "cuda" and "conv4" in workloads
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    _, memory_kind = peak_memory(lambda: None, device)
    results = {
        "schema_version": SCHEMA_VERSION, "title": f"mamlext bench --suite {suite} on {device}", "suite": suite,
        "device": str(device), "command": command, "complete": False, "machine": machine_info(device),
        "settings": {**settings._asdict(), "seed": seed, "dtype": str(DTYPE), "check_dtype": str(CHECK_DTYPE), "check_max_tasks": CHECK_MAX_TASKS,
                     "rtol": {str(dtype): tolerances for dtype, tolerances in RTOL.items()},
                     "time_budget_s": time_budget_s},
        "memory_kind": memory_kind, "memory_kind_description": MEMORY_KINDS[memory_kind],
        "notes": notes(workloads, MAML_IMPLS) if workloads else [], "rows": [], "wall_s": None,
    }
    if full_conv_on_cpu:
        results["notes"].append("the full suite's Conv4 has 32 filters on the CPU (64 on the GPU) to stay within "
                                "about 20 minutes on 2 cores")
    start = time.perf_counter()
    bar = tqdm(selected, desc="mamlext bench", unit="case", disable=not progress or not selected,
               file=sys.stderr)
    for case in bar:
        bar.set_postfix_str(case.name)
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            rows = [_row(case, name) for name in build_case(case, device, seed).builders]
            for row in rows:
                row.update(status="skipped", reason=f"not run: the time budget of {time_budget_s:g} s was spent")
            results["rows"] += rows
            continue
        load = ForeignLoad()
        rows = run_case(case, device, settings, seed)
        foreign = load.cpus()
        for row in rows:
            row["foreign_cpu_load"] = foreign
        results["rows"] += rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["wall_s"] = time.perf_counter() - start
        write_json(results, json_path)
    bar.close()
    if distributed_processes is not None:
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            results["distributed"] = {"status": "skipped",
                                      "reason": f"not run: the time budget of {time_budget_s:g} s was spent"}
        else:
            results["distributed"] = run_distributed(suite, distributed_processes, progress)
            results["notes"] += distributed_notes(results["distributed"], distributed_processes)
    results["complete"] = True
    results["wall_s"] = time.perf_counter() - start
    results["machine"]["loadavg_end"] = load_average()
    noisy_rows = sum(1 for r in results["rows"] if noisy(r.get("foreign_cpu_load")))
    if noisy_rows:
        results["notes"].append(f"{noisy_rows} rows ran while other processes used more than {FOREIGN_LOAD_WARN} "
                                "CPUs: their timings are noisy")
    # no plot when only the distributed measurement ran (--workloads distributed)
    results["plot"] = plot_speedups(results, os.path.join(out_dir, "speedup.png")) if selected else None
    write_json(results, json_path)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown_table(results) + "\n")
    print(format_table(results))
    plot = f" and {results['plot']}" if results["plot"] else ""
    print(f"\nwrote {json_path}, results.md{plot} ({results['wall_s']:.0f} s)")
    return results


def _process_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 2 <= value <= DISTRIBUTED_TASKS:
        raise argparse.ArgumentTypeError(
            f"expected a number of processes P from 2 to {DISTRIBUTED_TASKS} (measured against 1 process), "
            f"got {text!r}")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("--suite", choices=SUITES, default="full",
                        help="quick: a tiny subset in about a minute (a smoke test); full: every workload "
                             "(about 20 minutes on a 2-core CPU); dropin: the learn2learn user's per-task loop "
                             "against mamlext.MAML and the batched engines (sinusoid T = 25 N = 1 and 5, T = 250 "
                             "N = 1; Conv4 5-way 1-shot T = 8); rl: MAML-TRPO at the 2D-navigation setting, "
                             "l2l-style and bmm plain PyTorch against mamlext (mamlext.bench.rl)")
    add_device_argument(parser)
    parser.add_argument("--out", help="output folder for results.json and speedup.png "
                                      "(default bench-results/<suite>-<device>)")
    parser.add_argument("--workloads", help=f"comma-separated subset of {', '.join(WORKLOADS)} (default all); "
                                            f"'{DISTRIBUTED}' alone: only the --distributed measurement")
    parser.add_argument("--distributed", type=_process_count, metavar="P",
                        help=f"also measure meta-training throughput on the sinusoid MLP at T = {DISTRIBUTED_TASKS} "
                             "with the meta-batch split across 1 and P CPU processes (gloo, 1 thread each), after "
                             "the other workloads, and the scaling tasks/s(P) / tasks/s(1); CPU only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's)")
    parser.add_argument("--time-budget", type=float, metavar="S",
                        help="start no new case after S seconds; the rest get skipped rows (default: no limit)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(parser, args) -> int:
    from mamlext.train import SEED_RANGE, check_int, set_threads, writable_dir

    if args.suite == "rl":
        from mamlext.bench import rl as rl_bench
        return rl_bench.main(parser, args)
    device_name = args.device or default_device()
    if args.distributed is not None and device_name != "cpu":
        parser.error(f"--distributed measures CPU processes (gloo) only; add --device cpu (the device is "
                     f"{device_name}{'' if args.device else ' by default, as a GPU is visible'})")
    workloads = WORKLOADS
    if args.workloads:
        workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
        unknown = [w for w in workloads if w not in WORKLOADS]
        if workloads == (DISTRIBUTED,):
            if args.distributed is None:
                parser.error(f"--workloads {DISTRIBUTED} needs --distributed P (the number of processes)")
            workloads = ()
        elif unknown or not workloads:
            parser.error(f"--workloads must be a comma-separated subset of {list(WORKLOADS)}, or {DISTRIBUTED} alone "
                         f"with --distributed P, got {args.workloads!r}")
    set_threads(args.threads)
    if args.time_budget is not None and not args.time_budget > 0:
        parser.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    check_int(args.seed, "--seed", SEED_RANGE[0], SEED_RANGE[1] - 1)  # the cases' data take seed + 1
    device = pick_device(parser, device_name)
    out_dir = args.out or os.path.join("bench-results", f"{args.suite}-{device.type}")
    writable_dir(out_dir, "--out")  # before the suite's minutes of measuring, not after them
    command = "python -m mamlext " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(
        "__main__.py") else None
    results = run_suite(args.suite, device, out_dir, workloads, args.seed, progress=not args.no_progress,
                        command=command, time_budget_s=args.time_budget, distributed_processes=args.distributed)
    engine_failed = any(r["status"] == "failed" and r["impl"] in MAMLEXT_IMPLS for r in results["rows"])
    return 1 if engine_failed or results.get("distributed", {}).get("status") == "failed" else 0
