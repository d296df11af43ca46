"""What every benchmark shares: the device, machine details, load measurement, timing, the agreement check of two
implementations' outputs, peak-memory measurement and the JSON file. Used by `python -m mamlext bench` and
benchmarks/*.py."""
import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.benchmark as benchmark
from torch import Tensor

import mamlext
from mamlext import _ext
from mamlext.train import ConfigError, set_threads

MIN_SAMPLES_FOR_NOISE = 4  # fewer timed blocks than this give no quartiles
FOREIGN_LOAD_WARN = 0.1  # CPUs used by other processes during a case above which its row is flagged noisy


# --- the command line -----------------------------------------------------------------------------------------------

def add_device_argument(parser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU is visible, else cpu")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(parser, name: Optional[str]) -> torch.device:
    """The device of --device `name` (None: default_device()), a GPU with its index; --device cuda where torch sees
    no GPU is a usage error."""
    name = name or default_device()
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def script_parser(doc: str, results: str) -> argparse.ArgumentParser:
    """The parser of a benchmarks/ script that writes one JSON file: the first paragraph of its docstring `doc` as
    the description, --device, and --out (default bench-results/<results>_<device>.json)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--out", help=f"JSON output path (default bench-results/{results}_<device>.json)")
    return parser


def use_threads(parser: argparse.ArgumentParser, threads: Optional[int]) -> None:
    """--threads as `python -m mamlext` takes it (mamlext.train.set_threads), a bad value a usage error of parser."""
    try:
        set_threads(threads)
    except ConfigError as error:
        parser.error(str(error))


# --- the machine ----------------------------------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device, **extra):
    info = {
        "mamlext_version": mamlext.__version__,
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "mamlext_backend_info": mamlext.backend_info(),
        "fused_backend": _ext.backend_for(device.type),
        **extra,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "loadavg_start": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu_name": props.name,
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_multiprocessors": props.multi_processor_count,
            "cuda_driver": _cuda_driver_version(),
        })
    return info


def load_average():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def print_machine(meta: dict, device, kernel: str, compiled: bool) -> None:
    """A script's first lines from machine_info's `meta`: torch, CPU, threads, device and whether mamlext's `kernel`
    is compiled for the device, with warnings where it is not (the pure-PyTorch reference runs in its place) or where
    other processes keep the CPUs busy."""
    gpu = f" ({meta['gpu_name']})" if device.type == "cuda" else ""
    print(f"torch {meta['torch_version']}, {meta['cpu_model']}, {meta['torch_num_threads']} threads, device {device}"
          f"{gpu}, {kernel}: {'compiled' if compiled else 'pure-PyTorch reference'}", flush=True)
    if not compiled:
        print(f"WARNING: mamlext has no compiled {kernel} for {device.type}; 'fused' runs the pure-PyTorch reference",
              flush=True)
    load, cpus = meta["loadavg_start"], meta["cpu_affinity"]
    if load and cpus and load[0] > 0.5 * cpus:
        print(f"WARNING: 1-minute load average {load[0]:.2f} on {cpus} CPUs: other processes are running, timings "
              "will be noisy", flush=True)


def _cuda_driver_version():
    try:
        v = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        if v is None:
            out = ctypes.c_int()
            ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(out))
            v = out.value
        return f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:  # informational only
        return None


class ForeignLoad:
    """CPU time that other processes used during a span, in CPUs (0.0 = the machine was ours, 1.0 = one core busy
    elsewhere), from /proc/stat less this process's own CPU time. Timings taken while it is high are not to be
    trusted: the OpenMP threads of ATen's parallel ops wait for descheduled peers. None where /proc is missing."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait, without guest (counted in user)
        return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.perf_counter()

    def cpus(self):
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        foreign = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, foreign / (end[2] - self.start[2]))


def noisy(foreign_cpus: Optional[float]) -> bool:
    """Whether other processes used more than FOREIGN_LOAD_WARN CPUs (ForeignLoad.cpus(); None, unknown, is not)."""
    return foreign_cpus is not None and foreign_cpus > FOREIGN_LOAD_WARN


def noisy_note(foreign_cpus: Optional[float]) -> str:
    """The mark of a noisy row: " [noisy: other processes used 1.5 CPUs]", or "" where it is not noisy."""
    return f" [noisy: other processes used {foreign_cpus:.1f} CPUs]" if noisy(foreign_cpus) else ""


def wait_quiet(max_s):
    """Waits until other processes used under FOREIGN_LOAD_WARN CPUs over two consecutive 1 s spans, or max_s."""
    deadline, calm = time.perf_counter() + max_s, 0
    while time.perf_counter() < deadline and calm < 2:
        load = ForeignLoad()
        time.sleep(1.0)
        cpus = load.cpus()
        if cpus is None:
            return
        calm = calm + 1 if cpus < FOREIGN_LOAD_WARN else 0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(times):
    times = sorted(times)
    if len(times) >= MIN_SAMPLES_FOR_NOISE:
        q = statistics.quantiles(times, n=4, method="inclusive")
        q1, med, q3 = q[0], q[1], q[2]
    else:
        q1, med, q3 = times[0], statistics.median(times), times[-1]
    return {"median_ms": med * 1e3, "iqr_ms": (q3 - q1) * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
            "samples": len(times)}


def first_call(fn: Callable[[], Sequence[Tensor]], device) -> Tuple[List[Tensor], float]:
    """fn()'s outputs (detached copies, so that later calls cannot change them) and the seconds the call took."""
    start = time.perf_counter()
    outputs = [t.detach().clone() for t in fn()]
    sync(device)
    return outputs, time.perf_counter() - start


def measure_case(run: Callable[[], dict], skipped_row: dict, device) -> dict:
    """run()'s row, or skipped_row marked skipped where the device ran out of memory (a skip: the case does not fit,
    nothing measured failed), with the CPUs other processes used meanwhile as "foreign_cpu_load"."""
    load = ForeignLoad()
    try:
        row = run()
    except torch.OutOfMemoryError as error:
        row = {**skipped_row, "status": f"skipped: out of memory ({str(error).splitlines()[0][:120]})"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["foreign_cpu_load"] = load.cpus()
    return row


def time_impls(impls: Dict[str, Callable], device, min_run_time: float, repeats: int, warmup: int = 1
               ) -> Dict[str, List[float]]:
    """Seconds per call of each implementation: `warmup` calls each, then `repeats` rounds interleaved over the
    implementations (so a change of machine load hits them all alike), each round a
    torch.utils.benchmark.Timer.blocked_autorange of min_run_time / repeats (it synchronizes the GPU)."""
    for fn in impls.values():
        for _ in range(warmup):
            fn()
        sync(device)
    times: Dict[str, List[float]] = {name: [] for name in impls}
    per_round = max(min_run_time / repeats, 0.01)
    for _ in range(repeats):
        for name, fn in impls.items():
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            times[name] += timer.blocked_autorange(min_run_time=per_round).times
    return times


# --- agreement of two implementations ----------------------------------------------------------------------------

# A tensor whose gradient is zero in exact arithmetic (the bias of a convolution followed by BatchNorm) holds only
# rounding noise; it is measured against this fraction of the largest gradient of the set instead of its own size.
ZERO_GRADIENT_FLOOR = 1e-2


def _rel_errors(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> List[float]:
    """Per tensor, max|a_i - e_i| / max(max|e_i|, ZERO_GRADIENT_FLOOR * max_j max|e_j|) (nan when any is nan)."""
    sizes = [e.double().abs().max().item() if e.numel() else 0.0 for e in expected]
    floor = max([ZERO_GRADIENT_FLOOR * s for s in sizes] + [1e-12])
    return [((a.double() - e.double()).abs().max().item() / max(size, floor)) if e.numel() else 0.0
            for a, e, size in zip(actual, expected, sizes)]


def max_rel_error(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> float:
    """The worst normwise relative error over the tensors (see _rel_errors; nan when any is nan)."""
    worst = 0.0
    for err in _rel_errors(actual, expected):
        if not err <= worst:  # nan counts as worst
            worst = err
    return worst


def mismatch(actual: Sequence[Tensor], expected: Sequence[Tensor], rtol: float) -> Optional[str]:
    """None when every tensor agrees normwise to rtol (see _rel_errors), else the worst disagreement as text."""
    if len(actual) != len(expected):
        return f"{len(actual)} tensors instead of {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        if not isinstance(a, Tensor) or a.shape != e.shape:
            shape = list(a.shape) if isinstance(a, Tensor) else type(a).__name__
            return f"tensor {i}: {shape} instead of {list(e.shape)}"
    errors = _rel_errors(actual, expected)
    worst = max(range(len(errors)), key=lambda i: float("inf") if errors[i] != errors[i] else errors[i])
    return None if errors[worst] <= rtol else f"tensor {worst}: rel. error {errors[worst]:.2e} > {rtol:.0e}"


# --- peak memory ---------------------------------------------------------------------------------------------------

CPU_MEMORY_KIND = "cpu_peak_rss_delta"
CUDA_MEMORY_KIND = "cuda_max_allocated_delta"
MEMORY_KINDS = {
    CUDA_MEMORY_KIND: "torch.cuda.max_memory_allocated during one call, less the memory allocated before it",
    CPU_MEMORY_KIND: "the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs) during one "
                     "call, less its resident size before it (after malloc_trim returned freed heap memory to "
                     "the system); includes allocator and thread overheads",
}


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, AttributeError):
        return False


def peak_memory(fn: Callable, device) -> Tuple[Optional[int], str]:
    """(bytes, kind) of one call of fn: kind is a key of MEMORY_KINDS; bytes is None where it cannot be measured
    (a CPU without Linux's /proc)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before, CUDA_MEMORY_KIND
    if not _reset_peak_rss():
        return None, CPU_MEMORY_KIND
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    if before is None or peak is None:
        return None, CPU_MEMORY_KIND
    return max(0, peak - before) * 1024, CPU_MEMORY_KIND


# --- the results file ----------------------------------------------------------------------------------------------

def write_json(results: dict, path: str) -> None:
    """Writes results to path (its folder made if need be) through a temporary file, so that a run cut short while
    writing leaves the previous file whole; what JSON cannot hold is written as text."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(tmp, path)
