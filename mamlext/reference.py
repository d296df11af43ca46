"""Pure-PyTorch twins of every mamlext op, with the same signatures and the same argument checks.

They are the test oracle for the compiled kernels and the fallback when mamlext._C is not available.
"""
import math
import numbers
from typing import List, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from mamlext._mlp_codes import ACTIVATION_NAMES, ACTIVATIONS, LOSS_NAMES, LOSSES
from mamlext.rates import Lr, task_sgd_rate
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


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
    lr = task_sgd_rate(lr, len(grads))
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


# ================================================================================================================
# Fused task-batched MLP ops: mlp_loss_grad, mlp_hvp, mlp_maml (see mamlext/_mlp_codes.py for the integer codes).
#
# params = [W_1, b_1, ..., W_L, b_L], W_l [out_l, in_l], b_l [out_l] (nn.Linear layout), each shared (S_i) or per
# task ([T, *S_i]); the activation sits between layers, none after the last.


_MLP_DTYPES = (torch.float64, torch.float32)
MLP_MAX_LAYERS = 16  # kMlpMaxLayers in csrc/common/mlp_passes.h


def clone_tensors(tensors: Sequence[Tensor]) -> List[Tensor]:
    return [t.clone() for t in tensors]


def sgd_update(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float) -> List[Tensor]:
    return list(torch._foreach_add(list(params), list(grads), alpha=-lr)) if params else []


def _shape(t: Tensor) -> List[int]:
    return list(t.shape)


def _param_label(i: int) -> str:
    return f"params[{i}] ({'W' if i % 2 == 0 else 'b'}_{i // 2 + 1})"


def _check_mlp_codes(op: str, activation, act_param, loss) -> None:
    if isinstance(activation, bool) or not isinstance(activation, int) or activation not in ACTIVATION_NAMES:
        raise ValueError(f"{op}: activation must be one of the codes {ACTIVATIONS}, got {activation!r}")
    if isinstance(loss, bool) or not isinstance(loss, int) or loss not in LOSS_NAMES:
        raise ValueError(f"{op}: loss must be one of the codes {LOSSES}, got {loss!r}")
    if isinstance(act_param, bool) or not isinstance(act_param, numbers.Real) or not math.isfinite(act_param):
        raise ValueError(f"{op}: act_param must be a finite float, got {act_param!r}")


def _check_mlp_params(op: str, params: Sequence[Tensor], shared_only: bool) -> List[int]:
    """Checks the layer chain; returns the layer sizes [in_1, out_1, ..., out_L]."""
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"{op}: params must be a list of tensors, got {type(params).__name__}")
    if len(params) < 2 or len(params) % 2:
        raise ValueError(f"{op}: params must be [W_1, b_1, ..., W_L, b_L] (an even number >= 2 of tensors), "
                         f"got {len(params)} tensors")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{op}: params[{i}] must be a tensor, got {type(p).__name__}")
    if len(params) // 2 > MLP_MAX_LAYERS:
        raise ValueError(f"{op}: at most {MLP_MAX_LAYERS} layers are supported, got {len(params) // 2}")
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _MLP_DTYPES:
        raise ValueError(f"{op}: params[0] must be float32 or float64, got {dtype}")
    sizes: List[int] = []
    for i, p in enumerate(params):
        if p.dtype != dtype:
            raise ValueError(f"{op}: params[{i}] has dtype {p.dtype} but params[0] has dtype {dtype}")
        if p.device != device:
            raise ValueError(f"{op}: params[{i}] is on {p.device} but params[0] is on {device}")
        what = "[out, in]" if i % 2 == 0 else "[out]"
        shared_dim = 2 if i % 2 == 0 else 1
        allowed = (shared_dim,) if shared_only else (shared_dim, shared_dim + 1)
        if p.dim() not in allowed:
            form = f"shared {what}" if shared_only else f"shared {what} or per task [T, {what[1:]}"
            raise ValueError(f"{op}: {_param_label(i)} must be {form}, got {_shape(p)}")
        if i % 2 == 0:
            out_f, in_f = p.shape[-2], p.shape[-1]
            if sizes and in_f != sizes[-1]:
                raise ValueError(f"{op}: {_param_label(i)} must be [out, {sizes[-1]}] (its input is the "
                                 f"{sizes[-1]} outputs of layer {i // 2}), got {_shape(p)}")
            if not sizes:
                sizes.append(in_f)
            sizes.append(out_f)
        elif p.shape[-1] != sizes[-1]:
            raise ValueError(f"{op}: {_param_label(i)} must be [{sizes[-1]}] to match {_param_label(i - 1)} "
                             f"{_shape(params[i - 1])}, got {_shape(p)}")
    return sizes


def _check_mlp_per_task(op: str, params: Sequence[Tensor], tasks: int, x_name: str) -> None:
    for i, p in enumerate(params):
        if p.dim() == (3 if i % 2 == 0 else 2) and p.shape[0] != tasks:
            raise ValueError(f"{op}: {_param_label(i)} is per task with {p.shape[0]} tasks (leading dimension) "
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
    if x.dtype != dtype:
        raise ValueError(f"{op}: {x_name} has dtype {x.dtype} but params[0] has dtype {dtype}")
    if x.device != device:
        raise ValueError(f"{op}: {x_name} is on {x.device} but params[0] is on {device}")
    tasks, rows, out = x.shape[0], x.shape[1], sizes[-1]
    if y.device != device:
        raise ValueError(f"{op}: {y_name} is on {y.device} but params[0] is on {device}")
    if loss == LOSSES["mse"]:
        if y.shape != (tasks, rows, out):
            raise ValueError(f"{op}: {y_name} must be [T, K, out] = {[tasks, rows, out]} for loss mse "
                             f"({x_name} is {_shape(x)}, the last layer has {out} outputs), got {_shape(y)}")
        if y.dtype != dtype:
            raise ValueError(f"{op}: {y_name} has dtype {y.dtype} but params[0] has dtype {dtype} (loss mse)")
    else:
        if y.dtype != torch.int64:
            raise ValueError(f"{op}: {y_name} must hold int64 class indices for loss ce, got dtype {y.dtype}")
        if y.shape != (tasks, rows):
            raise ValueError(f"{op}: {y_name} must be [T, K] = {[tasks, rows]} for loss ce ({x_name} is "
                             f"{_shape(x)}), got {_shape(y)}")
        if check_values and y.numel() and y.device.type == "cpu":
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= out:
                bad = low if low < 0 else high
                raise ValueError(f"{op}: {y_name} holds the class index {bad}, outside [0, {out}) (the last layer "
                                 f"has {out} outputs)")


def check_mlp_loss_grad(params: Sequence[Tensor], x: Tensor, y: Tensor, activation: int, act_param: float,
                        loss: int, check_values: bool = True, op: str = "mlp_loss_grad") -> None:
    """Raises ValueError/TypeError naming the argument when mlp_loss_grad's arguments do not fit together.
    check_values=False skips the checks that read tensor data (class index range), as fake tensors must."""
    _check_mlp_codes(op, activation, act_param, loss)
    sizes = _check_mlp_params(op, params, shared_only=False)
    _check_mlp_xy(op, params, sizes, x, y, loss, "x", "y", check_values)
    _check_mlp_per_task(op, params, x.shape[0], "x")


def check_mlp_hvp(params: Sequence[Tensor], vectors: Sequence[Tensor], x: Tensor, y: Tensor, activation: int,
                  act_param: float, loss: int, check_values: bool = True) -> None:
    op = "mlp_hvp"
    check_mlp_loss_grad(params, x, y, activation, act_param, loss, check_values, op=op)
    if not isinstance(vectors, (list, tuple)):
        raise TypeError(f"{op}: vectors must be a list of tensors, got {type(vectors).__name__}")
    if len(vectors) != len(params):
        raise ValueError(f"{op}: vectors must hold one tensor per parameter ({len(params)}), got {len(vectors)}")
    tasks = x.shape[0]
    for i, (p, v) in enumerate(zip(params, vectors)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{op}: vectors[{i}] must be a tensor, got {type(v).__name__}")
        shape = [tasks, *(p.shape[1:] if p.dim() == (3 if i % 2 == 0 else 2) else p.shape)]
        if _shape(v) != shape:
            raise ValueError(f"{op}: vectors[{i}] must be [T, *S_{i}] = {shape}, got {_shape(v)}")
        if v.dtype != p.dtype:
            raise ValueError(f"{op}: vectors[{i}] has dtype {v.dtype} but params[0] has dtype {p.dtype}")
        if v.device != p.device:
            raise ValueError(f"{op}: vectors[{i}] is on {v.device} but params[0] is on {p.device}")


def check_mlp_maml(params: Sequence[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor,
                   lrs: Sequence[Tensor], step_weights: Tensor, first_order: bool, activation: int,
                   act_param: float, loss: int, check_values: bool = True) -> None:
    """Raises ValueError/TypeError naming the argument when mlp_maml's arguments do not fit together.
    check_values=False skips the checks that read tensor data (class index range), as fake tensors must."""
    op = "mlp_maml"
    _check_mlp_codes(op, activation, act_param, loss)
    if not isinstance(first_order, bool):
        raise TypeError(f"{op}: first_order must be a bool, got {type(first_order).__name__}")
    sizes = _check_mlp_params(op, params, shared_only=True)
    _check_mlp_xy(op, params, sizes, xs, ys, loss, "xs", "ys", check_values)
    _check_mlp_xy(op, params, sizes, xq, yq, loss, "xq", "yq", check_values)
    if xq.shape[0] != xs.shape[0]:
        raise ValueError(f"{op}: xq has {xq.shape[0]} tasks (leading dimension) but xs has {xs.shape[0]}")
    dtype, device = params[0].dtype, params[0].device
    if not isinstance(step_weights, Tensor):
        raise TypeError(f"{op}: step_weights must be a tensor, got {type(step_weights).__name__}")
    if step_weights.numel() < 1:
        raise ValueError(f"{op}: step_weights must hold one weight per inner step (N >= 1), got shape "
                         f"{_shape(step_weights)}")
    if not step_weights.dtype.is_floating_point:
        raise ValueError(f"{op}: step_weights must be a floating-point tensor, got {step_weights.dtype}")
    if step_weights.device != device:
        raise ValueError(f"{op}: step_weights is on {step_weights.device} but params[0] is on {device}")
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
        if r.dtype != dtype:
            raise ValueError(f"{op}: lrs[{i}] has dtype {r.dtype} but params[0] has dtype {dtype}")
        if r.device != device:
            raise ValueError(f"{op}: lrs[{i}] is on {r.device} but params[0] is on {device}")
        if check_values and not torch.isfinite(r).all():
            raise ValueError(f"{op}: lrs[{i}] must be finite (it holds nan or inf)")
    if check_values and not torch.isfinite(step_weights).all():
        raise ValueError(f"{op}: step_weights must be finite (it holds nan or inf)")


def mlp_activation(z: Tensor, activation: int, act_param: float) -> Tensor:
    """The activation with the given code (ACTIVATIONS)."""
    if activation == ACTIVATIONS["relu"]:
        return torch.relu(z)
    if activation == ACTIVATIONS["leaky_relu"]:
        return F.leaky_relu(z, act_param)
    if activation == ACTIVATIONS["tanh"]:
        return torch.tanh(z)
    if activation == ACTIVATIONS["sigmoid"]:
        return torch.sigmoid(z)
    if activation == ACTIVATIONS["gelu"]:
        return F.gelu(z)
    if activation == ACTIVATIONS["elu"]:
        return F.elu(z, act_param)
    raise ValueError(f"unknown activation code {activation!r}")


def mlp_forward(params: Sequence[Tensor], x: Tensor, activation: int, act_param: float) -> Tensor:
    """The MLP's output. Shared params ([out, in], [out]) with x [..., in]; or all params per task
    ([T, out, in], [T, out]) with x [T, K, in] (a batched matmul)."""
    h = x
    layers = len(params) // 2
    for layer in range(layers):
        weight, bias = params[2 * layer], params[2 * layer + 1]
        if weight.dim() == 3:
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        else:
            h = F.linear(h, weight, bias)
        if layer + 1 < layers:
            h = mlp_activation(h, activation, act_param)
    return h


def mlp_task_loss(z: Tensor, y: Tensor, loss: int) -> Tensor:
    """One task's loss (LOSSES): mean squared error over all elements, or mean cross-entropy over the rows."""
    if loss == LOSSES["mse"]:
        return F.mse_loss(z, y)
    if loss == LOSSES["ce"]:
        return F.cross_entropy(z, y)
    raise ValueError(f"unknown loss code {loss!r}")


def _per_task(params: Sequence[Tensor], tasks: int) -> List[Tensor]:
    """Every parameter as [T, *S_i] (shared ones expanded, no copy)."""
    return [p if p.dim() == (3 if i % 2 == 0 else 2) else p.expand(tasks, *p.shape) for i, p in enumerate(params)]


def _task_shapes(params: Sequence[Tensor], tasks: int) -> List[List[int]]:
    return [[tasks, *(p.shape[1:] if p.dim() == (3 if i % 2 == 0 else 2) else p.shape)] for i, p in enumerate(params)]


def mlp_loss_grad(params: Sequence[Tensor], x: Tensor, y: Tensor, activation: int, act_param: float,
                  loss: int) -> Tuple[Tensor, List[Tensor]]:
    """Per task loss [T] and its gradient w.r.t. that task's params (P tensors [T, *S_i]); torch.func.vmap(grad).
    Differentiable (torch autograd through torch.func)."""
    check_mlp_loss_grad(params, x, y, activation, act_param, loss)
    tasks = x.shape[0]
    if tasks == 0 or x.shape[1] == 0:  # no rows: the mean of nothing is nan (as F.mse_loss), the gradient 0
        return (x.new_full((tasks,), math.nan), [params[0].new_zeros(s) for s in _task_shapes(params, tasks)])

    def task_loss(ps, xt, yt):
        return mlp_task_loss(mlp_forward(ps, xt, activation, act_param), yt, loss)

    grads, losses = torch.func.vmap(torch.func.grad_and_value(task_loss))(_per_task(params, tasks), x, y)
    return losses.contiguous(), [g.contiguous() for g in grads]


def mlp_hvp(params: Sequence[Tensor], vectors: Sequence[Tensor], x: Tensor, y: Tensor, activation: int,
            act_param: float, loss: int) -> List[Tensor]:
    """Per task Hessian-vector product H_t v_t (P tensors [T, *S_i]): torch.func.vmap of the gradient of
    <grad L_t(params), v_t> (reverse over reverse; forward-over-reverse trips on ZeroTensor tangents in relu)."""
    check_mlp_hvp(params, vectors, x, y, activation, act_param, loss)
    tasks = x.shape[0]
    if tasks == 0 or x.shape[1] == 0:
        return [params[0].new_zeros(s) for s in _task_shapes(params, tasks)]

    def task_loss(ps, xt, yt):
        return mlp_task_loss(mlp_forward(ps, xt, activation, act_param), yt, loss)

    def grad_dot(ps, vs, xt, yt):
        grads = torch.func.grad(task_loss)(ps, xt, yt)
        return sum((g * v).sum() for g, v in zip(grads, vs))

    task_hvp = torch.func.grad(grad_dot)

    out = torch.func.vmap(task_hvp)(_per_task(params, tasks), list(vectors), x, y)
    return [o.contiguous() for o in out]


def mlp_maml(params: Sequence[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, lrs: Sequence[Tensor],
             step_weights: Tensor, first_order: bool, activation: int, act_param: float,
             loss: int) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """The oracle of the fused MAML op: a plain create_graph autograd loop over tasks and steps.

    Returns (query_losses [T], meta_grads P x [T, *S_i], lr_grads P x [T, *lrs[i].shape]), all detached:
    query_loss_t = sum_k w_k L_query,t(theta_k), theta_{k+1} = theta_k - lrs[:, k] * grad L_support,t(theta_k),
    the gradients of query_loss_t w.r.t. theta_0 = params and lrs (first_order: the inner gradients are constants).
    """
    check_mlp_maml(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss)
    tasks = xs.shape[0]
    weights = [float(w) for w in step_weights.detach().to(params[0].dtype).reshape(-1).cpu()]
    theta0 = [p.detach() for p in params]
    rates = [r.detach() for r in lrs]

    def task_loss(ps, x, y):
        return mlp_task_loss(mlp_forward(ps, x, activation, act_param), y, loss)

    losses, meta_grads, lr_grads = [], [[] for _ in params], [[] for _ in params]
    with torch.enable_grad():
        for t in range(tasks):
            theta = [p.clone().requires_grad_() for p in theta0]
            alpha = [r.clone().requires_grad_() for r in rates]
            current, total = theta, None
            for k, weight in enumerate(weights):
                support = task_loss(current, xs[t], ys[t])
                grads = torch.autograd.grad(support, current, create_graph=not first_order, retain_graph=True)
                if first_order:
                    grads = [g.detach() for g in grads]
                current = [c - a[k] * g for c, a, g in zip(current, alpha, grads)]
                if weight != 0.0:
                    term = weight * task_loss(current, xq[t], yq[t])
                    total = term if total is None else total + term
            if total is None:  # every weight is 0
                losses.append(theta0[0].new_zeros(()))
                derivs = [None] * (2 * len(params))
            else:
                losses.append(total.detach())
                derivs = torch.autograd.grad(total, theta + alpha, allow_unused=True)
            for i, (p, r) in enumerate(zip(theta, alpha)):
                dp, dr = derivs[i], derivs[len(params) + i]
                meta_grads[i].append(torch.zeros_like(p) if dp is None else dp.detach())
                lr_grads[i].append(torch.zeros_like(r) if dr is None else dr.detach())
    if tasks == 0:
        return (xs.new_empty(0), [p.new_empty(0, *p.shape) for p in theta0],
                [r.new_empty(0, *r.shape) for r in rates])
    return (torch.stack(losses), [torch.stack(g) for g in meta_grads], [torch.stack(g) for g in lr_grads])


# ================================================================================================================
# maml_reverse_step: one step of MAML's reverse recursion for any model (the generic engine's combine step).


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
    if not dtype.is_floating_point:
        raise ValueError(f"{op}: v[0] must be a floating-point tensor, got {dtype}")
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


def maml_reverse_step(v: Sequence[Tensor], hv: Sequence[Tensor], grads: Sequence[Tensor],
                      sum_tasks: bool) -> Tuple[List[Tensor], List[Tensor]]:
    """v_next = v - hv per task ([T, *S_i]; summed over tasks, [S_i], when sum_tasks) and, when grads is not empty,
    lr_grads = -sum_t grads_t * v_t ([S_i]); arithmetic in float32 for half types."""
    check_maml_reverse_step(v, hv, grads, sum_tasks)
    v_next, lr_grads = [], []
    for i in range(len(v)):
        vi, hvi = v[i], hv[i]
        wide = vi.dtype in (torch.float16, torch.bfloat16)
        if wide:
            vi, hvi = vi.float(), hvi.float()
        out = vi - hvi
        v_next.append((out.sum(0) if sum_tasks else out).to(v[i].dtype))
        if grads:
            g = grads[i].float() if wide else grads[i]
            lr_grads.append(-(g * vi).sum(0).to(v[i].dtype))
    return v_next, lr_grads
