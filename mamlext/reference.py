"""Pure-PyTorch twins of every mamlext op, with the same signatures and the same argument checks.

They are the test oracle for the compiled kernels and the fallback when mamlext._C is not available.
"""
import math
import numbers
from typing import List, Sequence, Union

import torch
from torch import Tensor

Lr = Union[float, Tensor, Sequence[Tensor]]
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def normalize_task_sgd_lr(lr: Lr, num_params: int) -> Union[float, List[Tensor]]:
    """task_sgd's rate as the ops take it: a float, or a list of one tensor per parameter.
    A single scalar tensor stands for the same rate for every parameter."""
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


def check_task_sgd(params: Sequence[Tensor], grads: Sequence[Tensor], lr: Lr) -> None:
    """Raises ValueError naming the argument and index when task_sgd's arguments do not fit together."""
    if len(params) != len(grads):
        raise ValueError(f"task_sgd: params and grads must have the same length, got {len(params)} and {len(grads)}")
    if isinstance(lr, (int, float)):
        if not math.isfinite(lr):
            raise ValueError(f"task_sgd: lr must be finite, got {lr}")
    elif len(lr) != len(grads):
        raise ValueError(f"task_sgd: lr must hold one tensor per parameter ({len(grads)}), got {len(lr)}")
    if not grads:
        return
    if grads[0].dim() < 1:
        raise ValueError(f"task_sgd: grads[0] must be [T, *S_0] with a leading task dimension, "
                         f"got shape {list(grads[0].shape)}")
    tasks, device, dtype = grads[0].shape[0], grads[0].device, grads[0].dtype
    if dtype not in _DTYPES:
        raise ValueError(f"task_sgd: grads[0] must be float64, float32, float16 or bfloat16, got {dtype}")
    for i, (p, g) in enumerate(zip(params, grads)):
        for name, t in (("grads", g), ("params", p)):
            if t.device != device:
                raise ValueError(f"task_sgd: {name}[{i}] is on {t.device} but grads[0] is on {device}")
            if t.dtype != dtype:
                raise ValueError(f"task_sgd: {name}[{i}] has dtype {t.dtype} but grads[0] has dtype {dtype}")
        if g.dim() < 1:
            raise ValueError(f"task_sgd: grads[{i}] must be [T, *S_{i}], got shape {list(g.shape)}")
        if g.shape[0] != tasks:
            raise ValueError(f"task_sgd: grads[{i}] has {g.shape[0]} tasks (leading dimension) "
                             f"but grads[0] has {tasks}")
        if p.shape != g.shape and p.shape != g.shape[1:]:
            raise ValueError(f"task_sgd: params[{i}] has shape {list(p.shape)} but grads[{i}] has shape "
                             f"{list(g.shape)}; params[{i}] must be shared ({list(g.shape[1:])}) "
                             f"or per task ({list(g.shape)})")
        if not isinstance(lr, (int, float)):
            r = lr[i]
            if r.device != g.device:
                raise ValueError(f"task_sgd: lr[{i}] is on {r.device} but grads[{i}] is on {g.device}")
            if r.dtype != g.dtype:
                raise ValueError(f"task_sgd: lr[{i}] has dtype {r.dtype} but grads[{i}] has dtype {g.dtype}")
            if r.dim() != 0 and r.shape != g.shape[1:]:
                raise ValueError(f"task_sgd: lr[{i}] must be a scalar or have shape {list(g.shape[1:])} "
                                 f"(the parameter's shape), got {list(r.shape)}")


def check_task_sgd_lr_finite(lr: Lr) -> None:
    """Tensor rates are checked where it costs no host sync (CPU tensors)."""
    if isinstance(lr, (int, float)):
        return
    for i, r in enumerate(lr):
        if r.device.type == "cpu" and not torch.isfinite(r).all():
            raise ValueError(f"task_sgd: lr[{i}] must be finite")


def task_sgd(params: Sequence[Tensor], grads: Sequence[Tensor], lr: Lr) -> List[Tensor]:
    """out[i][t] = params[i][t, or shared] - lr_i * grads[i][t], computed in float32 for half types."""
    lr = normalize_task_sgd_lr(lr, len(grads))
    check_task_sgd(params, grads, lr)
    check_task_sgd_lr_finite(lr)
    outs = []
    for i, (p, g) in enumerate(zip(params, grads)):
        r = lr if isinstance(lr, (int, float)) else lr[i]
        if g.dtype in (torch.float16, torch.bfloat16):
            r = r if isinstance(r, (int, float)) else r.float()
            outs.append((p.float() - r * g.float()).to(g.dtype).contiguous())
        else:
            outs.append((p - r * g).contiguous())
    return outs
