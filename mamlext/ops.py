"""Typed wrappers of torch.ops.mamlext.*, and their fake (meta) kernels (their autograd is in C++, csrc/autograd/).

Each op runs its compiled kernel where one serves the tensors' device and its twin in mamlext.reference otherwise;
_implementation is the one rule that decides (the twin, the registered op, or the extension's direct binding).
"""
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.autograd import forward_ad

from mamlext import _checks, _ext, rates, reference
from mamlext._mlp_codes import ACTIVATION_NAMES, ACTIVATIONS, DEFAULT_ACT_PARAM, LOSS_NAMES, LOSSES
from mamlext.rates import Lr, MLPLr


# ================================================================================================================
# Which implementation runs an op: one rule for every wrapper below.

def _compiled(name: str, device: torch.device) -> bool:
    """Whether this build has a kernel of op `name` for this device (the extension states it, see
    mamlext._ext.BUILD_INFO: the layer ops have CPU kernels only). A dictionary read, which torch.compile traces."""
    return device.type in _ext.BUILD_INFO.get("kernels", {}).get(name, ())


def _functorch_wrapped(tensors: Sequence[Tensor]) -> bool:
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _has_tangents(tensors: Sequence[Tensor]) -> bool:
    """Whether a tensor carries a forward-mode AD tangent (torch.autograd.forward_ad), which the fused layers
    have no formula for; free when no dual level is entered."""
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _implementation(name: str, tensors: Sequence[Tensor], binding: bool = False,
                    twin_in_transforms: bool = False) -> str:
    """What runs op `name` on these tensors (the first one's device decides):
    "twin"     mamlext.reference: no tensor, or no kernel of the op for the device in this build (no extension);
               and, for the ops whose twins serve them (twin_in_transforms: the MLP layers, a learner's ops), inside
               torch.func transforms and with forward-mode AD tangents, which the kernels do not serve (the other
               ops' kernels refuse transforms with advice);
    "op"       torch.ops.mamlext.<name>: under torch.compile, which traces it through its fake kernel, and eagerly
               where the op has no direct binding;
    "binding"  mamlext._C's direct binding of the same dispatcher call, eagerly: torch.ops' argument boxing costs
               as much as a small op."""
    first = tensors[0] if tensors else None
    if not isinstance(first, Tensor) or not _compiled(name, first.device):
        return "twin"
    if torch.compiler.is_compiling():
        return "op"
    if twin_in_transforms and (_functorch_wrapped(tensors) or _has_tangents(tensors)):
        return "twin"
    return "binding" if binding else "op"


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
    lr = rates.task_sgd_rate(lr, len(grads))
    runs = _implementation("task_sgd", grads, binding=True)
    if runs == "twin":
        return reference.task_sgd(params, grads, lr)
    if runs == "op":
        if isinstance(lr, float):
            return torch.ops.mamlext.task_sgd.default(params, grads, lr)
        return torch.ops.mamlext.task_sgd.tensor_lr(params, grads, lr)
    if isinstance(lr, float):
        return _ext._C.task_sgd(params, grads, lr)
    return _ext._C.task_sgd_tensor_lr(params, grads, lr)


def _task_sgd_fake(params, grads, lr):
    _checks.check_task_sgd(params, grads, lr)
    return [g.new_empty(g.shape) for g in grads]


def _learner_op(name: str, tensors: Sequence[Tensor], twin):
    """The callable that runs a learner's op (clone_tensors, sgd_update) on these tensors (_implementation)."""
    runs = _implementation(name, tensors, binding=True, twin_in_transforms=True)
    return twin if runs == "twin" else getattr(torch.ops.mamlext if runs == "op" else _ext._C, name)


def clone_tensors(tensors: Sequence[Tensor]) -> List[Tensor]:
    """Copies of the tensors, differentiable as t.clone(), through one autograd node for the whole list (a
    per-task learner's copy of its parameters)."""
    tensors = list(tensors)
    return _learner_op("clone_tensors", tensors, reference.clone_tensors)(tensors)


def sgd_update(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float) -> List[Tensor]:
    """``params[i] - lr * grads[i]`` for each i (grads[i] of params[i]'s shape, dtype and device; lr a finite
    float), differentiable in params and grads any number of times, through one autograd node for the whole list
    (a per-task learner's inner SGD step; task_sgd is the step of T tasks at once)."""
    params, grads = list(params), list(grads)
    return _learner_op("sgd_update", params + grads, reference.sgd_update)(params, grads, lr)


def _clone_tensors_fake(tensors):
    return [t.new_empty(t.shape) for t in tensors]


def _sgd_update_fake(params, grads, lr):
    torch._check(len(params) == len(grads), lambda: "sgd_update: params and grads must have the same length")
    for i, (p, g) in enumerate(zip(params, grads)):
        torch._check(p.shape == g.shape, lambda: f"sgd_update: grads[{i}] must have params[{i}]'s shape")
    return [p.new_empty(p.shape) for p in params]


# ================================================================================================================
# Fused task-batched MLP ops: mlp_loss_grad, mlp_hvp, mlp_maml (spec: params = [W_1, b_1, ..., W_L, b_L] in
# nn.Linear layout, activation between layers, none after the last, and for loss "gaussian" the log standard
# deviation [out] after them; see mamlext.reference for the twins).
#
# Gradients (the same on the compiled and the reference path):
#   mlp_maml: query_losses is differentiable w.r.t. params and lrs (d params = sum_t go_t meta_grads_t,
#     d lrs = sum_t go_t lr_grads_t: the exact meta-gradient, to second order unless first_order). No gradient flows
#     to xs, ys, xq, yq or step_weights, and meta_grads / lr_grads are outputs without a graph. The backward is
#     itself not differentiable (no third derivatives: do not double-backward through it).
#   mlp_loss_grad: losses is differentiable w.r.t. params (through the returned grads: first-order use, e.g. a
#     plain loss.backward()); no gradient flows to x or y, and grads carries no graph (to differentiate through an
#     inner step use mlp_hvp, or mlp_maml).
#   mlp_hvp: no autograd formula.

Activation = Union[str, int]
Loss = Union[str, int]


def _code(op: str, what: str, value, codes: dict, names: dict) -> int:
    """The integer code of a name (or a valid code itself)."""
    if isinstance(value, str):
        if value not in codes:
            raise ValueError(f"{op}: {what} must be one of {list(codes)}, got {value!r}")
        return codes[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in names:
        return value
    raise ValueError(f"{op}: {what} must be one of {list(codes)} (or its code), got {value!r}")


def mlp_codes(op: str, activation: Activation, act_param: Optional[float], loss: Loss) -> Tuple[int, float, int]:
    """(activation code, act_param, loss code) from names or codes; act_param defaults to nn.LeakyReLU's
    negative_slope (0.01) and nn.ELU's alpha (1.0)."""
    act_code = _code(op, "activation", activation, ACTIVATIONS, ACTIVATION_NAMES)
    loss_code = _code(op, "loss", loss, LOSSES, LOSS_NAMES)
    if act_param is None:
        act_param = DEFAULT_ACT_PARAM[ACTIVATION_NAMES[act_code]]
    if isinstance(act_param, bool) or not isinstance(act_param, numbers.Real):
        raise ValueError(f"{op}: act_param must be a float, got {act_param!r}")
    return act_code, float(act_param), loss_code


class _TaskGradients(torch.autograd.Function):
    """Losses whose gradients are given: d inputs[i] = sum_t go_t grads[i][t] for losses [T] and an input shared by
    the tasks (grads[i] is [T, *input.shape]); go_t grads[i][t] for a per-task input, or go grads[i] for a scalar
    loss (grads[i] of the input's shape)."""

    @staticmethod
    def forward(ctx, losses: Tensor, n: int, *inputs_and_grads: Tensor) -> Tensor:
        ctx.n = n
        ctx.elementwise = [t.shape == g.shape for t, g in zip(inputs_and_grads[:n], inputs_and_grads[n:])]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs_and_grads[n:])
        return losses.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        if go is None:
            return (None,) * (2 + 2 * ctx.n)
        grads = []
        for g, elementwise in zip(ctx.saved_tensors, ctx.elementwise):
            if not elementwise:
                grads.append(torch.tensordot(go, g, dims=([0], [0])))
            else:
                grads.append((go if go.dim() == 0 else go.reshape(-1, *([1] * (g.dim() - 1)))) * g)
        return (None, None, *grads, *([None] * ctx.n))


def with_task_gradients(losses: Tensor, inputs: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """losses (computed without a graph) made differentiable w.r.t. inputs with the given gradients: per-task
    losses [T] with grads[i] [T, *S_i], or a scalar loss with grads[i] shaped like inputs[i]. The autograd formula
    of everything whose kernel returns its own gradients (the reference twins of mlp_loss_grad and mlp_maml,
    iMAML's implicit meta-gradient, the generic engine's memory="low" recursion). Not differentiable twice."""
    inputs = list(inputs)
    return _TaskGradients.apply(losses, len(inputs), *inputs, *grads)


def mlp_loss_grad(params: Sequence[Tensor], x: Tensor, y: Tensor, activation: Activation = "relu",
                  act_param: Optional[float] = None, loss: Loss = "mse",
                  weights: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor]]:
    """Per-task loss of an MLP and its gradient w.r.t. that task's parameters, for T tasks at once.

    Args:
        params: [W_1, b_1, ..., W_L, b_L] (nn.Linear layout), each shared (``S_i``) or per task (``[T, *S_i]``),
            float32 or float64; for loss "gaussian" followed by log_std ``[out]`` or ``[T, out]``.
        x: ``[T, K, in]``. y: ``[T, K, out]`` (loss "mse"; the actions for "gaussian") or int64 class indices
            ``[T, K]`` (loss "ce").
        activation: "relu", "leaky_relu", "tanh", "sigmoid", "gelu" (exact) or "elu", between layers.
        act_param: negative_slope of leaky_relu (default 0.01) / alpha of elu (default 1.0); ignored otherwise.
        loss: "mse" (mean over K*out elements), "ce" (mean cross-entropy over the K rows) or "gaussian": the
            negative log-likelihood of a diagonal Gaussian policy, mean over the K rows of ``-log N(y_k; mu_k,
            diag(exp(2 log_std)))`` with mu the network's output and log_std the last parameter (learned,
            state-independent), i.e. ``-Normal(mu, log_std.exp()).log_prob(y).sum(-1).mean()``.
        weights: ``[T, K]``, each row's weight in the loss (its term is multiplied by it before the same mean:
            ``(F.cross_entropy(z, y, reduction="none") * w).mean()``), or None. With "ce" or "gaussian" and
            advantages as weights, the policy-gradient surrogate ``-mean_k A_k log pi(a_k | s_k)`` of a
            categorical or Gaussian policy; 0 leaves out a padding row.

    Returns ``(losses [T], grads)``, grads P tensors ``[T, *S_i]``. ``losses`` is differentiable w.r.t. params
    (first order: x, y and weights get no gradient, grads carries no graph).
    """
    act_code, act_param, loss_code = mlp_codes("mlp_loss_grad", activation, act_param, loss)
    params = list(params)
    if _implementation("mlp_loss_grad", [x]) == "op":  # the kernel checks its arguments
        return torch.ops.mamlext.mlp_loss_grad(params, x, y, act_code, act_param, loss_code, weights)
    with torch.no_grad():
        losses, grads = reference.mlp_loss_grad(params, x, y, act_code, act_param, loss_code, weights)
    return with_task_gradients(losses, params, grads), grads


def mlp_hvp(params: Sequence[Tensor], vectors: Sequence[Tensor], x: Tensor, y: Tensor,
            activation: Activation = "relu", act_param: Optional[float] = None,
            loss: Loss = "mse", weights: Optional[Tensor] = None, gauss_newton: bool = False) -> List[Tensor]:
    """Per-task Hessian-vector products ``H_t v_t`` of the MLP loss (arguments as in mlp_loss_grad; vectors:
    P tensors ``[T, *S_i]``). Returns P tensors ``[T, *S_i]``. Not differentiable.

    gauss_newton: the Gauss-Newton product ``J_t^T H_loss J_t v_t`` instead (J_t the network output's Jacobian,
    H_loss the loss's Hessian w.r.t. the output: H_t without the network's own curvature; positive semi-definite for
    non-negative weights). With "ce" and per-sample weights it is the Fisher-vector product of a categorical policy
    (the labels do not enter), TRPO's curvature; with "gaussian" H_loss is the Gaussian's Fisher w.r.t. (mean,
    log_std) (w exp(-2 log_std) for the mean, 2 w for log_std, no cross term): the Gaussian policy's Fisher-vector
    product."""
    act_code, act_param, loss_code = mlp_codes("mlp_hvp", activation, act_param, loss)
    params, vectors = list(params), list(vectors)
    if not isinstance(gauss_newton, bool):
        raise TypeError(f"mlp_hvp: gauss_newton must be a bool, got {type(gauss_newton).__name__}")
    if _implementation("mlp_hvp", [x]) == "op":  # the kernel checks its arguments
        return torch.ops.mamlext.mlp_hvp(params, vectors, x, y, act_code, act_param, loss_code, weights,
                                         gauss_newton)
    with torch.no_grad():
        return reference.mlp_hvp(params, vectors, x, y, act_code, act_param, loss_code, weights, gauss_newton)


def last_step_weights(steps: int, dtype: torch.dtype) -> Tensor:
    """mlp_maml's step_weights for the query loss after the last step only (plain MAML). On the CPU whatever the
    device, as step weights given in Python: the kernels then read them without waiting for the GPU."""
    weights = torch.zeros(steps, dtype=dtype)
    weights[-1] = 1.0
    return weights


def _mlp_maml_step_weights(step_weights, lrs, dtype) -> Tensor:
    if step_weights is None:
        steps = 1
        if not isinstance(lrs, (numbers.Real, Tensor)):
            steps = next((r.shape[0] for r in lrs if isinstance(r, Tensor) and r.dim() >= 1), 1)
        return last_step_weights(steps, dtype)
    if isinstance(step_weights, Tensor):
        return step_weights
    if isinstance(step_weights, (list, tuple)):
        return torch.tensor([float(w) for w in step_weights], dtype=dtype)
    raise TypeError(f"mlp_maml: step_weights must be None, a tensor or a sequence of floats, "
                    f"got {type(step_weights).__name__}")


def mlp_maml(params: Sequence[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, lrs: MLPLr,
             step_weights: Optional[Union[Tensor, Sequence[float]]] = None, first_order: bool = False,
             activation: Activation = "relu", act_param: Optional[float] = None, loss: Loss = "mse",
             support_weights: Optional[Tensor] = None,
             query_weights: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """MAML's inner loop, query losses and exact meta-gradients of an MLP for T tasks at once.

    Args:
        params: the meta-parameters [W_1, b_1, ..., W_L, b_L] (and log_std ``[out]`` for loss "gaussian", adapted
            in the inner loop like the others), shared (shapes ``S_i``), float32 or float64.
        xs, ys: support set, ``[T, K, in]`` and ``[T, K, out]`` (mse) or int64 ``[T, K]`` (ce).
        xq, yq: query set, ``[T, Kq, in]`` and ``[T, Kq, out]`` / ``[T, Kq]``.
        lrs: inner rates: a float or scalar tensor (all parameters, every step), or P tensors, each a scalar,
            ``[N]`` (one rate per step, MAML++ LSLR) or ``[N, *S_i]`` (per element per step, Meta-SGD expanded).
        step_weights: ``[N]`` weights of the query loss after each of the N inner steps (MAML++ multi-step
            loss); default ``[0, ..., 0, 1]`` (plain MAML) with N from lrs (1 for a float).
        first_order: drop the second-order terms (FOMAML).
        activation, act_param, loss: as in mlp_loss_grad.
        support_weights, query_weights: ``[T, Ks]`` / ``[T, Kq]``, the rows' weights in the support and query
            losses (as mlp_loss_grad's ``weights``), or None. With "ce" or "gaussian" and advantages as weights,
            the inner step is a policy-gradient step of a categorical or Gaussian policy and the meta-gradient that
            of the query surrogate.

    Returns ``(query_losses [T], meta_grads, lr_grads)``: meta_grads P tensors ``[T, *S_i]`` and lr_grads P tensors
    ``[T, *lrs[i].shape]``, per task (not summed). ``query_losses`` is differentiable w.r.t. params and lrs (the
    meta-gradient); xs, ys, xq, yq and the weights get no gradient.
    """
    act_code, act_param, loss_code = mlp_codes("mlp_maml", activation, act_param, loss)
    params = list(params)
    if not params or not isinstance(params[0], Tensor):  # the rates' and weights' dtype and device come from it
        _checks.check_mlp_maml(params, xs, ys, xq, yq, [], None, first_order, act_code, act_param, loss_code)
    weights = _mlp_maml_step_weights(step_weights, lrs, params[0].dtype)
    steps = weights.shape[0] if isinstance(weights, Tensor) and weights.dim() == 1 else 1
    lrs = rates.mlp_maml_rates(lrs, params, steps)
    if _implementation("mlp_maml", [xs]) == "op":  # the kernel checks its arguments
        return torch.ops.mamlext.mlp_maml(params, xs, ys, xq, yq, lrs, weights, first_order, act_code, act_param,
                                          loss_code, support_weights, query_weights)
    with torch.no_grad():
        losses, meta_grads, lr_grads = reference.mlp_maml(params, xs, ys, xq, yq, lrs, weights, first_order,
                                                          act_code, act_param, loss_code, support_weights,
                                                          query_weights)
    return with_task_gradients(losses, params + lrs, meta_grads + lr_grads), meta_grads, lr_grads


def mlp_maml_mean(params: Sequence[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, lrs: Sequence[Tensor],
                  step_weights: Tensor, first_order: bool, activation: int, act_param: float,
                  loss: int) -> Tuple[Tensor, Tensor]:
    """(mean query loss, per-task query losses [T]) of mlp_maml with arguments in the op's own form (lrs one tensor
    per parameter, step_weights a tensor, integer codes): BatchedMAML's meta-loss. Eagerly, one binding whose
    autograd node holds the mean's meta-gradient (no mean node, no weighted sum over tasks in the backward);
    otherwise (torch.compile, no kernel for the device) mlp_maml and a mean."""
    if _implementation("mlp_maml", [xs], binding=True) == "binding":
        return _ext._C.mlp_maml_mean(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param,
                                     loss)
    losses = mlp_maml(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss)[0]
    return losses.mean(), losses


# --- fake (meta) implementations and autograd formulas of the compiled ops ---------------------------------------

def _mlp_loss_grad_fake(params, x, y, activation, act_param, loss, weights=None):
    _checks.check_mlp_loss_grad(params, x, y, activation, act_param, loss, check_values=False, weights=weights)
    tasks = x.shape[0]
    return x.new_empty(tasks), [params[0].new_empty(s) for s in _checks.task_shapes(params, tasks)]


def _mlp_hvp_fake(params, vectors, x, y, activation, act_param, loss, weights=None, gauss_newton=False):
    _checks.check_mlp_hvp(params, vectors, x, y, activation, act_param, loss, check_values=False, weights=weights)
    return [v.new_empty(v.shape) for v in vectors]


def _mlp_maml_fake(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss,
                   support_weights=None, query_weights=None):
    _checks.check_mlp_maml(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss,
                           check_values=False, support_weights=support_weights, query_weights=query_weights)
    tasks = xs.shape[0]
    return (xs.new_empty(tasks), [p.new_empty(tasks, *p.shape) for p in params],
            [r.new_empty(tasks, *r.shape) for r in lrs])


# ================================================================================================================
# The layers of one MLP with analytic first and second derivatives: mlp_forward, mlp_backward, mlp_backward_backward
# (the layers of mamlext.nn.FusedMLP and of mamlext.MAML's learners on a supported MLP). Their autograd is registered
# in C++ (csrc/autograd/mlp_layers.cpp): mlp_forward's backward is mlp_backward, whose backward is
# mlp_backward_backward (not differentiable again).


def mlp(params: Sequence[Tensor], x: Tensor, activation: Activation = "relu",
        act_param: Optional[float] = None) -> Tensor:
    """An MLP's output for x [..., in]: params [W_1, b_1, ..., W_L, b_L] (nn.Linear layout, no task dimension),
    the activation between layers and none after the last (names and act_param as in mlp_loss_grad).

    One fused op (mlp_forward) whose backward is one fused op (mlp_backward) and whose double backward is analytic
    (mlp_backward_backward, by Pearlmutter's R-operator): a handful of autograd nodes instead of several per layer.
    Where no compiled kernel serves the device, and inside torch.func transforms (vmap, grad), the same layers run
    as plain PyTorch ops (mamlext.reference.mlp_forward), differentiable any number of times; so do inputs with
    forward-mode AD tangents (torch.autograd.forward_ad), which those ops carry. Third derivatives
    through the fused op raise an error."""
    act_code, act_param, _ = mlp_codes("mlp", activation, act_param, "mse")
    params = list(params)
    if not isinstance(x, Tensor) or x.dim() < 1:  # the rows below need a last dimension
        raise ValueError(f"mlp: x must be a tensor [..., in], got {list(x.shape) if isinstance(x, Tensor) else x!r}")
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    runs = _implementation("mlp_forward", [x, *params], binding=True, twin_in_transforms=True)
    if runs == "op":  # the kernel checks the arguments
        out = torch.ops.mamlext.mlp_forward(params, rows, act_code, act_param)[0]
    elif runs == "binding":
        out = _ext._C.mlp_forward(params, rows, act_code, act_param)[0]
    else:
        _check_mlp_layers(params, x)
        out = reference.mlp_forward(params, rows, act_code, act_param)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def _check_mlp_layers(params: List[Tensor], x: Tensor) -> None:
    """mlp's arguments, where the reference layers run (the kernel has the same checks)."""
    sizes = _checks._check_mlp_params("mlp", params, shared_only=True)
    if x.shape[-1] != sizes[0]:
        raise ValueError(f"mlp: x must be [..., in] with in = {sizes[0]} (params[0] is {list(params[0].shape)}), "
                         f"got {list(x.shape)}")
    if x.dtype != params[0].dtype or x.device != params[0].device:
        raise ValueError(f"mlp: x is {x.dtype} on {x.device} but params[0] is {params[0].dtype} on "
                         f"{params[0].device}")


def _hidden_numel(params, rows: int) -> int:
    return rows * sum(params[i].shape[0] for i in range(0, len(params) - 2, 2))


def _mlp_forward_fake(params, x, activation, act_param):
    torch._check(x.dim() == 2, lambda: f"mlp_forward: x must be [K, in], got {list(x.shape)}")
    return x.new_empty(x.shape[0], params[-1].shape[0]), x.new_empty(2 * _hidden_numel(params, x.shape[0]))


def _mlp_backward_fake(params, x, activations, grad_out, activation, act_param, input_grad):
    return [p.new_empty(p.shape) for p in params], x.new_empty(x.shape if input_grad else (0,))


def _mlp_backward_backward_fake(params, x, activations, grad_out, grad_param_grads, grad_grad_x, activation,
                                act_param, input_grad):
    return ([p.new_empty(p.shape) for p in params], x.new_empty(x.shape if input_grad else (0,)),
            grad_out.new_empty(grad_out.shape))




# ================================================================================================================
# maml_reverse_step: the combine step of MAML's reverse recursion for any model (the generic engine, memory="low").
#
# Gradients (csrc/autograd/maml_reverse_step.cpp; the same formulas for the reference twin through plain autograd):
# v_next is linear in v and hv; lr_grads = -sum_t grads_t * v_t is bilinear in grads and v. Differentiable twice over.


def maml_reverse_step(v: Sequence[Tensor], hv: Sequence[Tensor], grads: Sequence[Tensor] = (),
                      sum_tasks: bool = False) -> Tuple[List[Tensor], List[Tensor]]:
    """One step of MAML's reverse recursion, for all tasks and parameters in one call.

    With theta_{k+1} = theta_k - alpha_k * g_k per task, the meta-gradient v carried back to theta_{k+1} becomes
    ``v - H(alpha_k * v)`` at theta_k; pass that Hessian-vector product as hv.

    Args:
        v: P tensors ``[T, *S_i]``, the per-task meta-gradients w.r.t. theta_{k+1}.
        hv: P tensors ``[T, *S_i]``, the per-task products H_t(alpha_k * v_t) of the support loss's Hessian at theta_k.
        grads: empty (no rate gradients), or P tensors ``[T, *S_i]``: the support gradients g_k at theta_k.
        sum_tasks: sum v_next over the tasks (the last step, whose theta_0 all tasks share).

    Returns ``(v_next, lr_grads)``: v_next P tensors ``[T, *S_i]`` (``[S_i]`` when sum_tasks); lr_grads P tensors
    ``[S_i]``, ``-sum_t g_t * v_t`` (per-element d meta-loss / d alpha_k; sum it for one rate per tensor), or empty.
    """
    if isinstance(v, (list, tuple)) and _implementation("maml_reverse_step", v) == "op":
        v_next, lr_grads = torch.ops.mamlext.maml_reverse_step(v, hv, grads, sum_tasks)  # the kernel checks them
        return list(v_next), list(lr_grads)
    return reference.maml_reverse_step(v, hv, grads, sum_tasks)


def _maml_reverse_step_fake(v, hv, grads, sum_tasks):
    _checks.check_maml_reverse_step(v, hv, grads, sum_tasks)
    v_next = [t.new_empty(t.shape[1:] if sum_tasks else t.shape) for t in v]
    return v_next, [t.new_empty(t.shape[1:]) for t in v] if grads else []




# The fake (meta) kernels, which torch.compile and opcheck trace; every op's autograd is registered in C++
# (csrc/autograd/).
if _ext._C is not None:
    for _name, _fake in (("task_sgd", _task_sgd_fake), ("task_sgd.tensor_lr", _task_sgd_fake),
                         ("clone_tensors", _clone_tensors_fake), ("sgd_update", _sgd_update_fake),
                         ("mlp_loss_grad", _mlp_loss_grad_fake), ("mlp_hvp", _mlp_hvp_fake),
                         ("mlp_maml", _mlp_maml_fake), ("mlp_forward", _mlp_forward_fake),
                         ("mlp_backward", _mlp_backward_fake), ("mlp_backward_backward", _mlp_backward_backward_fake),
                         ("maml_reverse_step", _maml_reverse_step_fake)):
        torch.library.register_fake(f"mamlext::{_name}")(_fake)
