"""Pure-PyTorch twins of every mamlext op, with the same signatures: the math, after the same argument checks as
the compiled kernels (mamlext._checks).

They are the test oracle for the compiled kernels and the fallback when mamlext._C is not available.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from mamlext._checks import (check_maml_reverse_step, check_mlp_hvp, check_mlp_loss_grad, check_mlp_maml,
                             check_task_sgd, check_task_sgd_lr_finite, has_loss_param, is_per_task, task_shapes)
from mamlext._mlp_codes import ACTIVATIONS, LOSSES
from mamlext.rates import Lr, task_sgd_rate


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


def clone_tensors(tensors: Sequence[Tensor]) -> List[Tensor]:
    return [t.clone() for t in tensors]


def sgd_update(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float) -> List[Tensor]:
    return list(torch._foreach_add(list(params), list(grads), alpha=-lr)) if params else []


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


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def mlp_task_loss(z: Tensor, y: Tensor, loss: int, weights: Optional[Tensor] = None,
                  log_std: Optional[Tensor] = None) -> Tensor:
    """One task's loss (LOSSES): mean squared error over all elements, mean cross-entropy over the rows, or the
    Gaussian's negative log-likelihood of the actions y [K, O] (mean z, log standard deviation log_std [O]) summed over
    the action dimensions, mean over the rows; with weights [K], each row's term times its weight before the same mean."""
    if loss == LOSSES["mse"]:
        if weights is None:
            return F.mse_loss(z, y)
        return (F.mse_loss(z, y, reduction="none") * weights.unsqueeze(-1)).mean()
    if loss == LOSSES["ce"]:
        if weights is None:
            return F.cross_entropy(z, y)
        return (F.cross_entropy(z, y, reduction="none") * weights).mean()
    if loss == LOSSES["gaussian"]:
        e = y - z
        nll = (0.5 * e * e * torch.exp(-2 * log_std) + log_std + _HALF_LOG_2PI).sum(-1)
        return (nll if weights is None else nll * weights).mean()
    raise ValueError(f"unknown loss code {loss!r}")


def _gaussian_fisher_loss(mean_old: Tensor, log_std_old: Tensor, mean: Tensor, log_std: Tensor,
                          weights: Tensor) -> Tensor:
    """mean_k w_k KL(N(mean_old, std_old) || N(mean, std)): its Hessian w.r.t. (mean, log_std) at the old values is
    the Gaussian's Fisher (label-independent)."""
    kl = (log_std - log_std_old + (torch.exp(2 * log_std_old) + (mean_old - mean) ** 2) * 0.5 *
          torch.exp(-2 * log_std) - 0.5).sum(-1)
    return (kl * weights).mean()


def _task_loss(activation: int, act_param: float, loss: int):
    """One task's loss as a function of its params (the log_std last for gaussian), x, y and the rows' weights."""
    def task_loss(ps, xt, yt, wt):
        log_std = ps[-1] if has_loss_param(loss) else None
        return mlp_task_loss(mlp_forward(ps, xt, activation, act_param), yt, loss, wt, log_std)
    return task_loss


def _per_task(params: Sequence[Tensor], tasks: int) -> List[Tensor]:
    """Every parameter as [T, *S_i] (shared ones expanded, no copy)."""
    return [p if is_per_task(i, p, len(params)) else p.expand(tasks, *p.shape) for i, p in enumerate(params)]


def _rows_weights(weights: Optional[Tensor], x: Tensor) -> Tensor:
    """The rows' weights [T, K] (ones when None), for torch.func.vmap."""
    return x.new_ones(x.shape[:2]) if weights is None else weights


def mlp_loss_grad(params: Sequence[Tensor], x: Tensor, y: Tensor, activation: int, act_param: float,
                  loss: int, weights: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor]]:
    """Per task loss [T] and its gradient w.r.t. that task's params (P tensors [T, *S_i]); torch.func.vmap(grad).
    weights: the rows' weights [T, K] or None. Differentiable (torch autograd through torch.func)."""
    check_mlp_loss_grad(params, x, y, activation, act_param, loss, weights=weights)
    tasks = x.shape[0]
    if tasks == 0 or x.shape[1] == 0:  # no rows: the mean of nothing is nan (as F.mse_loss), the gradient 0
        return (x.new_full((tasks,), math.nan), [params[0].new_zeros(s) for s in task_shapes(params, tasks)])

    task_loss = _task_loss(activation, act_param, loss)
    grads, losses = torch.func.vmap(torch.func.grad_and_value(task_loss))(_per_task(params, tasks), x, y,
                                                                          _rows_weights(weights, x))
    return losses.contiguous(), [g.contiguous() for g in grads]


def mlp_hvp(params: Sequence[Tensor], vectors: Sequence[Tensor], x: Tensor, y: Tensor, activation: int,
            act_param: float, loss: int, weights: Optional[Tensor] = None,
            gauss_newton: bool = False) -> List[Tensor]:
    """Per task Hessian-vector product H_t v_t (P tensors [T, *S_i]): torch.func.vmap of the gradient of
    <grad L_t(params), v_t> (reverse over reverse; forward-over-reverse trips on ZeroTensor tangents in relu).
    gauss_newton: J_t^T H_loss J_t v_t (J v by torch.func.jvp of the network, H_loss by a double gradient of the loss
    w.r.t. the output, then the network's vector-Jacobian product)."""
    check_mlp_hvp(params, vectors, x, y, activation, act_param, loss, weights=weights)
    tasks = x.shape[0]
    if tasks == 0 or x.shape[1] == 0:
        return [params[0].new_zeros(s) for s in task_shapes(params, tasks)]

    task_loss = _task_loss(activation, act_param, loss)

    def grad_dot(ps, vs, xt, yt, wt):
        grads = torch.func.grad(task_loss)(ps, xt, yt, wt)
        return sum((g * v).sum() for g, v in zip(grads, vs))

    def task_gauss_newton(ps, vs, xt, yt, wt):
        if has_loss_param(loss):  # the outputs are (mean, log_std); the Gaussian's Fisher in their place of H_loss
            def net(q):
                return mlp_forward(q, xt, activation, act_param), q[-1]

            out, jv = torch.func.jvp(net, (ps,), (vs,))
            output_grad = torch.func.grad(lambda o: _gaussian_fisher_loss(out[0], out[1], o[0], o[1], wt))
            h_jv = torch.func.grad(lambda o: sum((g * j).sum() for g, j in zip(output_grad(o), jv)))(out)
            return torch.func.vjp(net, ps)[1](h_jv)[0]

        def net(q):
            return mlp_forward(q, xt, activation, act_param)

        z, jv = torch.func.jvp(net, (ps,), (vs,))
        output_grad = torch.func.grad(lambda out: mlp_task_loss(out, yt, loss, wt))
        h_jv = torch.func.grad(lambda out: (output_grad(out) * jv).sum())(z)
        return torch.func.vjp(net, ps)[1](h_jv)[0]

    task_hvp = task_gauss_newton if gauss_newton else torch.func.grad(grad_dot)

    out = torch.func.vmap(task_hvp)(_per_task(params, tasks), list(vectors), x, y, _rows_weights(weights, x))
    return [o.contiguous() for o in out]


def mlp_maml(params: Sequence[Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, lrs: Sequence[Tensor],
             step_weights: Tensor, first_order: bool, activation: int, act_param: float,
             loss: int, support_weights: Optional[Tensor] = None,
             query_weights: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """The oracle of the fused MAML op: a plain create_graph autograd loop over tasks and steps.

    Returns (query_losses [T], meta_grads P x [T, *S_i], lr_grads P x [T, *lrs[i].shape]), all detached:
    query_loss_t = sum_k w_k L_query,t(theta_k), theta_{k+1} = theta_k - lrs[:, k] * grad L_support,t(theta_k),
    the gradients of query_loss_t w.r.t. theta_0 = params and lrs (first_order: the inner gradients are constants).
    support_weights [T, Ks] / query_weights [T, Kq]: the rows' weights in the support and query losses, or None.
    """
    check_mlp_maml(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss,
                   support_weights=support_weights, query_weights=query_weights)
    tasks = xs.shape[0]
    weights = [float(w) for w in step_weights.detach().to(params[0].dtype).reshape(-1).cpu()]
    theta0 = [p.detach() for p in params]
    rates = [r.detach() for r in lrs]

    task_loss = _task_loss(activation, act_param, loss)

    def rows(weights, t):
        return None if weights is None else weights[t]

    losses, meta_grads, lr_grads = [], [[] for _ in params], [[] for _ in params]
    with torch.enable_grad():
        for t in range(tasks):
            theta = [p.clone().requires_grad_() for p in theta0]
            alpha = [r.clone().requires_grad_() for r in rates]
            current, total = theta, None
            for k, weight in enumerate(weights):
                support = task_loss(current, xs[t], ys[t], rows(support_weights, t))
                grads = torch.autograd.grad(support, current, create_graph=not first_order, retain_graph=True)
                if first_order:
                    grads = [g.detach() for g in grads]
                current = [c - a[k] * g for c, a, g in zip(current, alpha, grads)]
                if weight != 0.0:
                    term = weight * task_loss(current, xq[t], yq[t], rows(query_weights, t))
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
