"""Reptile (Nichol, Achiam and Schulman 2018, "On First-Order Meta-Learning Algorithms"), a batch of tasks at once.

    reptile = mamlext.Reptile(model, inner_lr=0.01, inner_steps=5, outer_step=0.1)
    reptile.step(xs, ys)     # xs [T, K, *input shape]; theta <- theta + outer_step * (mean_t phi_t - theta)

Each task's phi_t is `inner_steps` full-batch SGD steps from theta on its data, all tasks together through
BatchedMAML.adapt (the fused MLP kernels for a supported MLP, the generic engine otherwise; the update of every task
and parameter in one ops.task_sgd call). No second-order terms: Reptile needs none.
"""
import math
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from mamlext.batched import BatchedMAML
from mamlext.engines.generic import LossFn


class _Learner(BatchedMAML):
    """Reptile's inner loop: a BatchedMAML whose errors name Reptile."""
    _display_name = "Reptile"


class Reptile(nn.Module):
    """Args:
        model: any nn.Module (see mamlext.BatchedMAML for which engine serves it).
        inner_lr: the inner SGD step. inner_steps: SGD steps per task.
        outer_step: epsilon, the step of theta towards the mean of the adapted parameters (in (0, 1] usually).
        loss: "mse", "ce" or a loss callable (the generic engine). backend: as in BatchedMAML.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, outer_step: float = 0.1,
                 loss: Union[str, LossFn] = "mse", backend: str = "auto"):
        super().__init__()
        if isinstance(outer_step, bool) or not isinstance(outer_step, (int, float)) or not outer_step > 0 \
                or not math.isfinite(outer_step):
            raise ValueError(f"Reptile: outer_step must be a finite float > 0, got {outer_step!r}")
        self.maml = _Learner(model, inner_lr=inner_lr, inner_steps=inner_steps, loss=loss, backend=backend)
        self.model = model
        self.outer_step = float(outer_step)

    @property
    def engine(self) -> str:
        return self.maml.engine

    def step(self, xs: Tensor, ys: Tensor) -> List[Tensor]:
        """One Reptile meta-step on T tasks: moves the model's parameters in place and returns the per-task adapted
        parameters phi_t ([T, *S_i] each). Parameters with requires_grad=False are neither adapted nor moved."""
        adapted = self.maml.adapt(xs, ys)
        with torch.no_grad():
            for param, phi in zip(self.maml._params(), adapted):
                if param.requires_grad:
                    param.add_(phi.mean(0) - param, alpha=self.outer_step)
        return adapted

    def adapt(self, xs: Tensor, ys: Tensor, steps: Optional[int] = None) -> List[Tensor]:
        return self.maml.adapt(xs, ys, steps)

    def predict(self, adapted: Sequence[Tensor], x: Tensor) -> Tensor:
        return self.maml.predict(adapted, x)
