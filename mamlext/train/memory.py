"""Memory checks: refuse, before building anything, a run too large for the device."""
from typing import Any, Dict, Optional

import torch

from mamlext.train.config import DTYPES, RL_TASKS, ConfigError

# The sizes that memory_estimate depends on, named when a run would not fit.
SIZE_OPTIONS = {"sine": ("hidden", "meta_batch", "shots", "query", "inner_steps"),
                "omniglot": ("hidden", "ways", "shots", "query", "inner_steps"),
                **{task: ("hidden", "meta_batch", "episodes") for task in RL_TASKS}}


def memory_estimate(config: Dict[str, Any]) -> int:
    """Roughly the bytes a meta-iteration needs at once: the parameters with their gradient and Adam's two moments,
    each task's adapted copy of them and the hidden activations of every inner step (kept for the meta-gradient).
    Sine runs its whole meta-batch at once; omniglot one task at a time. Good for refusing absurd sizes, not for
    planning a run."""
    c = config
    if c["task"] in RL_TASKS:  # the h-h policy's passes: about a dozen [samples, h] tensors, support and query
        samples = c["meta_batch"] * c["episodes"] * c["horizon"]
        return DTYPES[c["dtype"]].itemsize * 2 * samples * c["hidden"] * 12
    h, steps = c["hidden"], c["inner_steps"] + 1
    if c["task"] == "sine":  # 1-h-h-1 MLP
        params, tasks = h * h + 4 * h + 1, c["meta_batch"]
        activations = tasks * (c["shots"] + c["query"]) * 2 * h * steps
    else:  # Conv4 (3x3 convolutions, batch norm) on 28x28 images: the first layer's outputs dominate
        params, tasks = 27 * h * h + 21 * h + c["ways"] * (h + 1), 1
        activations = c["ways"] * (c["shots"] + c["query"]) * h * 28 * 28 * 2 * steps
    return DTYPES[c["dtype"]].itemsize * (params * (4 + tasks) + activations)


def available_memory(device: torch.device) -> Optional[int]:
    """Free bytes for the run: the GPU's free memory, or Linux's MemAvailable; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(config: Dict[str, Any], device: torch.device) -> None:
    """ConfigError naming the sizes when the run would need more memory than the device has free (it would fail to
    allocate, or crawl in swap, only after building the model)."""
    need, free = memory_estimate(config), available_memory(device)
    if free is not None and need > free:
        sizes = ", ".join(f"--{name.replace('_', '-')} {config[name]}" for name in SIZE_OPTIONS[config["task"]])
        raise ConfigError(f"{sizes}: training would need about {need / 2**30:,.1f} GiB of memory, more than the "
                          f"{free / 2**30:,.1f} GiB free on {device}")

