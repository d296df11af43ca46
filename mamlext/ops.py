"""Typed wrappers of torch.ops.mamlext.*, with their fake (meta) and autograd registrations.

Each op runs its compiled kernel where one serves the tensors' device and its twin in mamlext.reference otherwise.
"""
from typing import List, Sequence, Union

import torch
from torch import Tensor

from mamlext import _ext, reference

Lr = Union[float, Tensor, Sequence[Tensor]]


def task_sgd(params: Sequence[Tensor], grads: Sequence[Tensor], lr: Lr) -> List[Tensor]:
    """The inner-loop SGD update of T tasks at once: ``out[i][t] = params[i][t or shared] - lr_i * grads[i][t]``.

    Args:
        params: N tensors, each shared by all tasks (shape ``S_i``) or per task (``[T, *S_i]``).
        grads: N tensors ``[T, *S_i]``.
        lr: a float; or a scalar tensor (one rate for every parameter); or a sequence of N tensors, each a scalar
            (per-layer rates, MAML++) or of shape ``S_i`` (per-element rates, Meta-SGD).

    Returns N tensors ``[T, *S_i]``. Differentiable in params, grads and tensor rates, twice over.
    """
    params, grads = list(params), list(grads)
    lr = reference.normalize_task_sgd_lr(lr, len(grads))
    if not grads or not _ext.has_kernels(grads[0].device.type):  # no tensor, no device to dispatch on
        return reference.task_sgd(params, grads, lr)
    if isinstance(lr, float):
        return torch.ops.mamlext.task_sgd.default(params, grads, lr)
    return torch.ops.mamlext.task_sgd.tensor_lr(params, grads, lr)


def _task_sgd_fake(params, grads, lr):
    reference.check_task_sgd(params, grads, lr)
    return [g.new_empty(g.shape) for g in grads]


def _task_sgd_setup_context(ctx, inputs, output):
    params, grads, lr = inputs
    ctx.param_shared = [p.dim() < g.dim() for p, g in zip(params, grads)]
    ctx.float_lr = lr if isinstance(lr, float) else None
    ctx.save_for_backward(*grads, *(() if isinstance(lr, float) else lr))


def _task_sgd_backward(ctx, grad_outs):
    """Made of differentiable torch ops, so that second-order MAML can differentiate through it again."""
    n = len(grad_outs)
    saved = ctx.saved_tensors
    grads, lrs = saved[:n], saved[n:]
    d_params, d_grads, d_lrs = [], [], []
    for i, go in enumerate(grad_outs):
        if go is None:
            d_params.append(None)
            d_grads.append(None)
            d_lrs.append(None)
            continue
        lr = ctx.float_lr if ctx.float_lr is not None else lrs[i]
        d_params.append(go.sum(0) if ctx.param_shared[i] else go)
        d_grads.append(-lr * go)
        if ctx.float_lr is None:
            d_lr = -(go * grads[i])
            d_lrs.append(d_lr.sum() if lrs[i].dim() == 0 else d_lr.sum(0))
    return d_params, d_grads, (None if ctx.float_lr is not None else d_lrs)


if _ext._C is not None:
    for _name in ("mamlext::task_sgd", "mamlext::task_sgd.tensor_lr"):
        torch.library.register_fake(_name)(_task_sgd_fake)
        torch.library.register_autograd(_name, _task_sgd_backward, setup_context=_task_sgd_setup_context)
