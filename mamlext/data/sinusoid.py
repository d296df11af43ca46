"""Finn et al. 2017's sinusoid regression tasks: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi],
x ~ U[-5, 5]."""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor


class TaskBatch(NamedTuple):
    x_support: Tensor  # [T, K_support, 1]
    y_support: Tensor
    x_query: Tensor    # [T, K_query, 1]
    y_query: Tensor
    amplitude: Tensor  # [T]
    phase: Tensor      # [T]


class SinusoidTasks:
    """Samples batches of sinusoid tasks from its own seeded generator, so a seed fixes every batch."""

    AMPLITUDE = (0.1, 5.0)
    PHASE = (0.0, math.pi)
    X_RANGE = (-5.0, 5.0)

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"SinusoidTasks: seed must be an int, got {seed!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"SinusoidTasks: dtype must be a floating-point torch.dtype, got {dtype!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"SinusoidTasks: device must name a torch device, got {device!r}") from error
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def _uniform(self, low: float, high: float, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.generator, dtype=torch.float64) * (high - low) + low

    def sample(self, tasks: int, support: int, query: Optional[int] = None) -> TaskBatch:
        """``tasks`` new sinusoids with ``support`` and ``query`` (default: as many) points each."""
        query = support if query is None else query
        for name, value in (("tasks", tasks), ("support", support), ("query", query)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SinusoidTasks.sample: {name} must be a positive int, got {value!r}")
        amplitude = self._uniform(*self.AMPLITUDE, tasks)
        phase = self._uniform(*self.PHASE, tasks)
        x = self._uniform(*self.X_RANGE, tasks, support + query, 1)
        y = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
        to = dict(dtype=self.dtype, device=self.device)
        return TaskBatch(x[:, :support].to(**to), y[:, :support].to(**to), x[:, support:].to(**to),
                         y[:, support:].to(**to), amplitude.to(**to), phase.to(**to))
