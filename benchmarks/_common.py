"""Machine details, load measurement and timing summaries shared by the benchmark scripts."""
import os
import platform
import statistics
import sys
import time

import torch

import mamlext
from mamlext import _ext

MIN_SAMPLES_FOR_NOISE = 4  # fewer timed blocks than this give no quartiles
FOREIGN_LOAD_WARN = 0.1  # CPUs used by other processes during a case above which its row is flagged noisy


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
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
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


def _cuda_driver_version():
    try:
        v = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        if v is None:
            import ctypes
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
