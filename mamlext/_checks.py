"""The Python argument checks of every op: the reference twins (mamlext.reference) and the fake kernels run them
(the compiled kernels have the same checks in C++, csrc/common/*checks.h). Errors name the argument and its index."""
import math
import numbers
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from mamlext._mlp_codes import ACTIVATION_NAMES, ACTIVATIONS, LOSS_NAMES, LOSSES, LOSSES_WITH_PARAM
from mamlext.rates import Lr


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_class_indices(where: str, y_name: str, y: Tensor, classes: int) -> None:
    """y holds class indices in [0, classes): the one wording of that rule (the C++ kernels check it as they read
    the labels, csrc/common/mlp_checks.h)."""
    if y.numel() == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        on_device = "; checked on the host before the launch: inside a CUDA kernel a bad index is a device-side " \
            "assert that ends the process's CUDA context" if y.is_cuda else ""
        raise ValueError(f"{where}: {y_name} holds the class index {low if low < 0 else high}, outside "
                         f"[0, {classes}) (the model has {classes} outputs{on_device})")


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


_MLP_DTYPES = (torch.float64, torch.float32)
MLP_MAX_LAYERS = 16  # kMlpMaxLayers in csrc/common/mlp_passes.h


def _shape(t: Tensor) -> List[int]:
    return list(t.shape)


def has_loss_param(loss: int) -> bool:
    """Whether the loss has a parameter after the layers' (gaussian: log_std [out]): params then has 2L + 1 tensors."""
    return LOSS_NAMES.get(loss) in LOSSES_WITH_PARAM


def is_layer_weight(i: int, count: int) -> bool:
    """params[i] of `count` tensors is a layer's weight [out, in] (else a bias [out] or the loss's log_std [out])."""
    return i % 2 == 0 and i < count - count % 2


def is_per_task(i: int, p: Tensor, count: int) -> bool:
    """params[i] (of `count`) has a leading task dimension."""
    return p.dim() == (3 if is_layer_weight(i, count) else 2)


def task_shapes(params: Sequence[Tensor], tasks: int) -> List[List[int]]:
    """[T, *S_i] for each parameter (its shape without a task dimension)."""
    return [[tasks, *(p.shape[1:] if is_per_task(i, p, len(params)) else p.shape)] for i, p in enumerate(params)]


def _param_label(i: int, count: int) -> str:
    if i == count - 1 and count % 2:
        return f"params[{i}] (log_std)"
    return f"params[{i}] ({'W' if i % 2 == 0 else 'b'}_{i // 2 + 1})"


def _check_mlp_codes(op: str, activation, act_param, loss) -> None:
    if isinstance(activation, bool) or not isinstance(activation, int) or activation not in ACTIVATION_NAMES:
        raise ValueError(f"{op}: activation must be one of the codes {ACTIVATIONS}, got {activation!r}")
    if isinstance(loss, bool) or not isinstance(loss, int) or loss not in LOSS_NAMES:
        raise ValueError(f"{op}: loss must be one of the codes {LOSSES}, got {loss!r}")
    if isinstance(act_param, bool) or not isinstance(act_param, numbers.Real) or not math.isfinite(act_param):
        raise ValueError(f"{op}: act_param must be a finite float, got {act_param!r}")


def _check_like_params(op: str, name: str, t: Tensor, params: Sequence[Tensor]) -> None:
    """t has params[0]'s dtype and device."""
    if t.dtype != params[0].dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype} but params[0] has dtype {params[0].dtype}")
    if t.device != params[0].device:
        raise ValueError(f"{op}: {name} is on {t.device} but params[0] is on {params[0].device}")


def _check_mlp_params(op: str, params: Sequence[Tensor], shared_only: bool,
                      loss: int = LOSSES["mse"]) -> List[int]:
    """Checks the layer chain (and the loss's log_std); returns the layer sizes [in_1, out_1, ..., out_L]."""
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"{op}: params must be a list of tensors, got {type(params).__name__}")
    with_param = has_loss_param(loss)
    if with_param and (len(params) < 3 or len(params) % 2 == 0):
        raise ValueError(f"{op}: params must be [W_1, b_1, ..., W_L, b_L, log_std] for loss {LOSS_NAMES[loss]} "
                         f"(an odd number >= 3 of tensors), got {len(params)} tensors")
    if not with_param and (len(params) < 2 or len(params) % 2):
        raise ValueError(f"{op}: params must be [W_1, b_1, ..., W_L, b_L] (an even number >= 2 of tensors), "
                         f"got {len(params)} tensors")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{op}: params[{i}] must be a tensor, got {type(p).__name__}")
    if len(params) // 2 > MLP_MAX_LAYERS:
        raise ValueError(f"{op}: at most {MLP_MAX_LAYERS} layers are supported, got {len(params) // 2}")
    dtype = params[0].dtype
    if dtype not in _MLP_DTYPES:
        raise ValueError(f"{op}: params[0] must be float32 or float64, got {dtype}")
    sizes: List[int] = []
    count = len(params)
    for i, p in enumerate(params):
        _check_like_params(op, f"params[{i}]", p, params)
        weight = is_layer_weight(i, count)
        what = "[out, in]" if weight else "[out]"
        shared_dim = 2 if weight else 1
        allowed = (shared_dim,) if shared_only else (shared_dim, shared_dim + 1)
        if p.dim() not in allowed:
            form = f"shared {what}" if shared_only else f"shared {what} or per task [T, {what[1:]}"
            raise ValueError(f"{op}: {_param_label(i, count)} must be {form}, got {_shape(p)}")
        if weight:
            out_f, in_f = p.shape[-2], p.shape[-1]
            if sizes and in_f != sizes[-1]:
                raise ValueError(f"{op}: {_param_label(i, count)} must be [out, {sizes[-1]}] (its input is the "
                                 f"{sizes[-1]} outputs of layer {i // 2}), got {_shape(p)}")
            if not sizes:
                sizes.append(in_f)
            sizes.append(out_f)
        elif p.shape[-1] != sizes[-1]:
            match = "the network's outputs" if i == count - 1 and count % 2 else \
                f"{_param_label(i - 1, count)} {_shape(params[i - 1])}"
            raise ValueError(f"{op}: {_param_label(i, count)} must be [{sizes[-1]}] to match {match}, "
                             f"got {_shape(p)}")
    return sizes


def _check_mlp_per_task(op: str, params: Sequence[Tensor], tasks: int, x_name: str) -> None:
    for i, p in enumerate(params):
        if is_per_task(i, p, len(params)) and p.shape[0] != tasks:
            raise ValueError(f"{op}: {_param_label(i, len(params))} is per task with {p.shape[0]} tasks (leading dimension) "
                             f"but {x_name} has T = {tasks}")


def _check_mlp_xy(op: str, params: Sequence[Tensor], sizes: List[int], x: Tensor, y: Tensor, loss: int,
                  x_name: str, y_name: str, check_values: bool) -> None:
    dtype, device = params[0].dtype, params[0].device
    for name, t in ((x_name, x), (y_name, y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if x.dim() != 3 or x.shape[2] != sizes[0]:
        raise ValueError(f"{op}: {x_name} must be [T, K, in] with in = {sizes[0]} (params[0] is "
                         f"{_shape(params[0])}), got {_shape(x)}")
    _check_like_params(op, x_name, x, params)
    tasks, rows, out = x.shape[0], x.shape[1], sizes[-1]
    if y.device != device:
        raise ValueError(f"{op}: {y_name} is on {y.device} but params[0] is on {device}")
    if loss != LOSSES["ce"]:  # real targets: mse's values, gaussian's actions
        name = LOSS_NAMES[loss]
        if y.shape != (tasks, rows, out):
            raise ValueError(f"{op}: {y_name} must be [T, K, out] = {[tasks, rows, out]} for loss {name} "
                             f"({x_name} is {_shape(x)}, the last layer has {out} outputs), got {_shape(y)}")
        if y.dtype != dtype:
            raise ValueError(f"{op}: {y_name} has dtype {y.dtype} but params[0] has dtype {dtype} (loss {name})")
    else:
        if y.dtype != torch.int64:
            raise ValueError(f"{op}: {y_name} must hold int64 class indices for loss ce, got dtype {y.dtype}")
        if y.shape != (tasks, rows):
            raise ValueError(f"{op}: {y_name} must be [T, K] = {[tasks, rows]} for loss ce ({x_name} is "
                             f"{_shape(x)}), got {_shape(y)}")
        if check_values and y.device.type == "cpu":
            check_class_indices(op, y_name, y, out)


def _check_mlp_row_weights(op: str, weights: Optional[Tensor], x: Tensor, check_values: bool,
                           name: str = "weights", x_name: str = "x") -> None:
    """A loss's per-row weights: None, or [T, K] of x's dtype and device, finite (checked on the CPU only, as the
    compiled ops: elsewhere it would cost a device sync)."""
    if weights is None:
        return
    if not isinstance(weights, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor or None, got {type(weights).__name__}")
    if weights.dtype != x.dtype or weights.device != x.device:
        raise ValueError(f"{op}: {name} must have {x_name}'s dtype and device ({x.dtype}, {x.device}), got "
                         f"{weights.dtype} on {weights.device}")
    if list(weights.shape) != list(x.shape[:2]):
        raise ValueError(f"{op}: {name} (one weight per row) must be [T, K] = {list(x.shape[:2])} ({x_name} is "
                         f"{_shape(x)}), got {_shape(weights)}")
    if check_values and weights.device.type == "cpu" and not torch.isfinite(weights).all():
        raise ValueError(f"{op}: {name} must be finite (it holds nan or inf)")


def check_mlp_loss_grad(params: Sequence[Tensor], x: Tensor, y: Tensor, activation: int, act_param: float,
                        loss: int, check_values: bool = True, op: str = "mlp_loss_grad",
                        weights: Optional[Tensor] = None) -> None:
    """Raises ValueError/TypeError naming the argument when mlp_loss_grad's arguments do not fit together.
    check_values=False skips the checks that read tensor data (class index range), as fake tensors must."""
    _check_mlp_codes(op, activation, act_param, loss)
    sizes = _check_mlp_params(op, params, shared_only=False, loss=loss)
    _check_mlp_xy(op, params, sizes, x, y, loss, "x", "y", check_values)
    _check_mlp_per_task(op, params, x.shape[0], "x")
    _check_mlp_row_weights(op, weights, x, check_values)


def check_mlp_hvp(params: Sequence[Tensor], vectors: Sequence[Tensor], x: Tensor, y: Tensor, activation: int,
                  act_param: float, loss: int, check_values: bool = True, weights: Optional[Tensor] = None) -> None:
    op = "mlp_hvp"
    check_mlp_loss_grad(params, x, y, activation, act_param, loss, check_values, op=op, weights=weights)
    if not isinstance(vectors, (list, tuple)):
        raise TypeError(f"{op}: vectors must be a list of tensors, got {type(vectors).__name__}")
    if len(vectors) != len(params):
        raise ValueError(f"{op}: vectors must hold one tensor per parameter ({len(params)}), got {len(vectors)}")
    tasks = x.shape[0]
    for i, (p, v) in enumerate(zip(params, vectors)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{op}: vectors[{i}] must be a tensor, got {type(v).__name__}")
        shape = task_shapes(params, tasks)[i]
        if _shape(v) != shape:
            raise ValueError(f"{op}: vectors[{i}] must be [T, *S_{i}] = {shape}, got {_shape(v)}")
        _check_like_params(op, f"vectors[{i}]", v, params)


def check_mlp_maml(params: Sequence[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor,
                   lrs: Sequence[Tensor], step_weights: Tensor, first_order: bool, activation: int,
                   act_param: float, loss: int, check_values: bool = True, support_weights: Optional[Tensor] = None,
                   query_weights: Optional[Tensor] = None) -> None:
    """Raises ValueError/TypeError naming the argument when mlp_maml's arguments do not fit together.
    check_values=False skips the checks that read tensor data (class index range), as fake tensors must."""
    op = "mlp_maml"
    _check_mlp_codes(op, activation, act_param, loss)
    if not isinstance(first_order, bool):
        raise TypeError(f"{op}: first_order must be a bool, got {type(first_order).__name__}")
    sizes = _check_mlp_params(op, params, shared_only=True, loss=loss)
    _check_mlp_xy(op, params, sizes, xs, ys, loss, "xs", "ys", check_values)
    _check_mlp_xy(op, params, sizes, xq, yq, loss, "xq", "yq", check_values)
    if xq.shape[0] != xs.shape[0]:
        raise ValueError(f"{op}: xq has {xq.shape[0]} tasks (leading dimension) but xs has {xs.shape[0]}")
    _check_mlp_row_weights(op, support_weights, xs, check_values, "support_weights", "xs")
    _check_mlp_row_weights(op, query_weights, xq, check_values, "query_weights", "xq")
    device = params[0].device
    if not isinstance(step_weights, Tensor):
        raise TypeError(f"{op}: step_weights must be a tensor, got {type(step_weights).__name__}")
    if step_weights.numel() < 1:
        raise ValueError(f"{op}: step_weights must hold one weight per inner step (N >= 1), got shape "
                         f"{_shape(step_weights)}")
    if step_weights.dtype not in _DTYPES:  # not is_floating_point: that admits float8, which no kernel computes in
        raise ValueError(f"{op}: step_weights must be a floating-point tensor (float64, float32, float16 or "
                         f"bfloat16), got {step_weights.dtype}")
    if step_weights.device != device and step_weights.device.type != "cpu":
        raise ValueError(f"{op}: step_weights must be on the CPU or on params[0]'s device ({device}), got "
                         f"{step_weights.device}")
    steps = step_weights.numel()  # any shape: its elements in order (as the compiled op)
    if not isinstance(lrs, (list, tuple)):
        raise TypeError(f"{op}: lrs must be a list of tensors, got {type(lrs).__name__}")
    if len(lrs) != len(params):
        raise ValueError(f"{op}: lrs must hold one tensor per parameter ({len(params)}), got {len(lrs)}")
    for i, (p, r) in enumerate(zip(params, lrs)):
        if not isinstance(r, Tensor):
            raise TypeError(f"{op}: lrs[{i}] must be a tensor, got {type(r).__name__}")
        if _shape(r) != [steps] and _shape(r) != [steps, *p.shape]:
            raise ValueError(f"{op}: lrs[{i}] must be [N] = [{steps}] or [N, *S_{i}] = {[steps, *p.shape]} "
                             f"(N = step_weights.numel()), got {_shape(r)}")
        _check_like_params(op, f"lrs[{i}]", r, params)
        if check_values and not torch.isfinite(r).all():
            raise ValueError(f"{op}: lrs[{i}] must be finite (it holds nan or inf)")
    if check_values and not torch.isfinite(step_weights).all():
        raise ValueError(f"{op}: step_weights must be finite (it holds nan or inf)")
    data = (("xs", xs), ("xq", xq)) + ((("ys", ys), ("yq", yq)) if loss != LOSSES["ce"] else ())
    for name, t in data:  # on the CPU, as the compiled op (elsewhere that would cost a device sync)
        if check_values and t.device.type == "cpu" and not torch.isfinite(t).all():
            raise ValueError(f"{op}: {name} must be finite (it holds nan or inf)")


def check_maml_reverse_step(v: Sequence[Tensor], hv: Sequence[Tensor], grads: Sequence[Tensor],
                            sum_tasks: bool) -> None:
    """Raises ValueError naming the argument and index when maml_reverse_step's arguments do not fit together."""
    op = "maml_reverse_step"
    for name, seq in (("v", v), ("hv", hv), ("grads", grads)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a sequence of tensors, got {type(seq).__name__}")
        for i, t in enumerate(seq):
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
    if len(v) != len(hv):
        raise ValueError(f"{op}: v and hv must have the same length, got {len(v)} and {len(hv)}")
    if grads and len(grads) != len(v):
        raise ValueError(f"{op}: grads must be empty (no lr gradients) or hold one tensor per v ({len(v)}), "
                         f"got {len(grads)}")
    if not isinstance(sum_tasks, bool):
        raise TypeError(f"{op}: sum_tasks must be a bool, got {type(sum_tasks).__name__}")
    if not v:
        return
    if v[0].dim() < 1:
        raise ValueError(f"{op}: v[0] must be [T, *S_0] with a leading task dimension, got shape {_shape(v[0])}")
    tasks, device, dtype = v[0].shape[0], v[0].device, v[0].dtype
    if dtype not in _DTYPES:
        raise ValueError(f"{op}: v[0] must be a floating-point tensor (float64, float32, float16 or bfloat16), "
                         f"got {dtype}")
    for i in range(len(v)):
        if v[i].dim() < 1 or v[i].shape[0] != tasks:
            raise ValueError(f"{op}: v[{i}] must be [T, *S_{i}] with T = {tasks} (from v[0]), got shape {_shape(v[i])}")
        for name, t in (("v", v[i]), ("hv", hv[i])) + ((("grads", grads[i]),) if grads else ()):
            if t.device != device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device} but v[0] is on {device}")
            if t.dtype != dtype:
                raise ValueError(f"{op}: {name}[{i}] has dtype {t.dtype} but v[0] has dtype {dtype}")
            if t.shape != v[i].shape:
                raise ValueError(f"{op}: {name}[{i}] has shape {_shape(t)} but v[{i}] has shape {_shape(v[i])}")
