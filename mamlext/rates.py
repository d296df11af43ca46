"""The inner-loop step size, in one place: the forms the two op families take it in (task_sgd's per-step rate,
mlp_maml's rates of every step) and InnerRates, the normalized rate of the task-batched algorithms (BatchedMAML,
iMAML, ANIL, Reptile and the generic engine they run on).

A parameter that does not require grad has rate 0 everywhere (learn2learn's MAML(allow_nograd=True)): the inner loop
leaves it as it is, and it gets no meta-gradient.
"""
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

# task_sgd's rate: a float, or per parameter a scalar tensor or a tensor of the parameter's shape.
Rate = Union[float, List[Tensor]]
# What ops.task_sgd accepts, before normalization: also one scalar tensor for every parameter.
Lr = Union[float, Tensor, Sequence[Tensor]]
# What ops.mlp_maml accepts: a float or scalar tensor (every parameter and step), or per parameter a scalar, [N]
# (per step) or [N, *S_i] (per element per step).
MLPLr = Union[float, Tensor, Sequence[Tensor]]

LR_MODES = ("fixed", "per_layer_step", "per_param")


def task_sgd_rate(lr: Lr, num_params: int) -> Rate:
    """task_sgd's rate as the ops take it: a float, or a list of one tensor per parameter (a single scalar tensor
    stands for the same rate for every parameter)."""
    if isinstance(lr, bool) or not isinstance(lr, (numbers.Real, Tensor, list, tuple)):
        raise TypeError(f"task_sgd: lr must be a float, a tensor or a sequence of tensors, got {type(lr).__name__}")
    if isinstance(lr, numbers.Real):
        return float(lr)
    if isinstance(lr, Tensor):
        if lr.dim() != 0:
            raise ValueError(f"task_sgd: a single tensor lr must be a scalar, got shape {list(lr.shape)}; "
                             "pass one tensor per parameter for per-element rates")
        return [lr] * num_params
    for i, r in enumerate(lr):
        if not isinstance(r, Tensor):
            raise TypeError(f"task_sgd: lr[{i}] must be a tensor, got {type(r).__name__}")
    return list(lr)


def mlp_maml_rates(lrs: MLPLr, params: Sequence[Tensor], steps: int) -> List[Tensor]:
    """mlp_maml's rates as the op takes them: one tensor per parameter, [N] or [N, *S_i] (a scalar is the same rate
    at every step)."""
    p0 = params[0]
    if isinstance(lrs, bool) or not isinstance(lrs, (numbers.Real, Tensor, list, tuple)):
        raise TypeError(f"mlp_maml: lrs must be a float, a scalar tensor or a sequence of tensors, "
                        f"got {type(lrs).__name__}")
    if isinstance(lrs, numbers.Real):
        if not math.isfinite(lrs):
            raise ValueError(f"mlp_maml: lrs must be finite, got {lrs}")
        return [torch.full((steps,), float(lrs), dtype=p0.dtype, device=p0.device) for _ in params]
    if isinstance(lrs, Tensor):
        if lrs.dim() != 0:
            raise ValueError(f"mlp_maml: a single tensor lrs must be a scalar, got shape {list(lrs.shape)}; "
                             "pass one tensor per parameter ([N] or [N, *S_i]) otherwise")
        return [lrs.expand(steps) for _ in params]
    out = []
    for i, r in enumerate(lrs):
        if not isinstance(r, Tensor):
            raise TypeError(f"mlp_maml: lrs[{i}] must be a tensor, got {type(r).__name__}")
        out.append(r.expand(steps) if r.dim() == 0 else r)
    return out


def rate_times(rate: Rate, vectors: Sequence[Tensor]) -> List[Tensor]:
    """rate ⊙ v for per-task vectors [T, *S_i] (what the reverse recursion's Hessian-vector product takes)."""
    if isinstance(rate, float):
        return list(torch._foreach_mul(list(vectors), rate))
    return [v * r for v, r in zip(vectors, rate)]


class InnerRates:
    """The inner-loop rates of a task-batched algorithm.

    mode "fixed": ``value`` for every parameter and step (not learned); "per_layer_step": a learnable rate per
    parameter tensor and inner step (MAML++ LSLR), tensors [steps]; "per_param": a learnable rate per parameter
    element, the same at every step (Meta-SGD), tensors shaped like the parameters. ``tensors`` (empty for "fixed")
    is the nn.ParameterList the owning module registers (BatchedMAML.inner_lrs). The owner checks its arguments
    (mode one of LR_MODES, value finite, steps >= 1) and names itself in the errors.
    """

    def __init__(self, mode: str, value: float, steps: int, params: Sequence[Tensor]):
        self.mode, self.value, self.steps = mode, float(value), steps
        like = params[0]
        if mode == "per_layer_step":
            rates = [torch.full((steps,), self.value, dtype=like.dtype, device=like.device) for _ in params]
        elif mode == "per_param":
            rates = [torch.full_like(p, self.value, memory_format=torch.contiguous_format).detach() for p in params]
        else:
            rates = []
        self.tensors = torch.nn.ParameterList([torch.nn.Parameter(r) for r in rates])
        self._fixed: Tuple[Optional[tuple], Optional[Tensor]] = (None, None)  # (setting, mlp_maml's rate tensor)

    def fit(self, params: Sequence[Tensor]) -> bool:
        """Whether the learned rates still serve these parameters (one per parameter, of its dtype and device, and
        per_param of its shape); always for "fixed"."""
        if not self.learned:
            return True
        return len(self.tensors) == len(params) and all(
            r.dtype == p.dtype and r.device == p.device and (self.mode != "per_param" or r.shape == p.shape)
            for r, p in zip(self.tensors, params))

    @property
    def learned(self) -> bool:
        return self.mode != "fixed"

    def at(self, step: int, params: Sequence[Tensor]) -> Rate:
        """task_sgd's rate for inner step `step` (per_layer_step beyond its steps keeps the last step's rate)."""
        if self.mode == "fixed":
            rate: Rate = self.value
        elif self.mode == "per_layer_step":
            rate = [r[min(step, self.steps - 1)] for r in self.tensors]
        else:
            rate = list(self.tensors)
        frozen = [not p.requires_grad for p in params]
        if not any(frozen):
            return rate
        if isinstance(rate, float):
            rate = [torch.tensor(rate, dtype=params[0].dtype, device=params[0].device)] * len(params)
        return [r.new_zeros(()) if f else r for r, f in zip(rate, frozen)]

    def of_every_step(self, params: Sequence[Tensor], steps: int) -> List[Tensor]:
        """mlp_maml's rates: one tensor per parameter, [steps] or [steps, *S_i]."""
        like = params[0]
        if self.mode == "fixed":  # one tensor, read for every parameter, made once per setting
            key = (steps, self.value, like.dtype, like.device)
            if self._fixed[0] != key:
                self._fixed = (key, torch.full((steps,), self.value, dtype=like.dtype, device=like.device))
            lrs = [self._fixed[1]] * len(params)
        elif self.mode == "per_layer_step":
            lrs = list(self.tensors)
        else:
            lrs = [r.unsqueeze(0).expand(steps, *r.shape).contiguous() for r in self.tensors]
        return [r if p.requires_grad else torch.zeros_like(r) for r, p in zip(lrs, params)]

    def learnable(self, params: Sequence[Tensor]) -> List[Tensor]:
        """The learned rate tensors, a frozen parameter's detached (its rate is not used, so it gets no gradient)."""
        return [r if p.requires_grad else r.detach() for r, p in zip(self.tensors, params)]

    def accumulate(self, totals: List[Tensor], step: int, step_grads: Sequence[Tensor]) -> None:
        """Adds one inner step's rate gradients (maml_reverse_step's lr_grads, per element) to totals, the
        gradients of the learnable tensors."""
        for total, step_grad in zip(totals, step_grads):
            if self.mode == "per_layer_step":
                total[step] += step_grad.sum()
            else:  # per_param: one rate for every step
                total += step_grad
