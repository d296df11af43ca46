"""iMAML (Rajeswaran, Finn, Kakade and Levine 2019, "Meta-Learning with Implicit Gradients") over a whole batch of
tasks at once, on the fused MLP engine.

    imaml = mamlext.iMAML(nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)),
                          inner_lr=0.01, inner_steps=5, lam=1.0, cg_steps=5)
    loss = imaml.meta_loss(xs, ys, xq, yq)   # xs [T, K, in], ys [T, K, out] (mse) or [T, K] int64 (ce)
    loss.backward()                          # mean_t g_t lands in model.parameters()
    adapted = imaml.adapt(xs, ys)            # per-task phi_t, [T, *S_i] each
    out = imaml.predict(adapted, xq)         # [T, Kq, out]

For each task t, starting from theta:
  inner solve    phi_t = `inner_steps` steps of gradient descent on  L_support,t(phi) + lam/2 ||phi - theta||^2
                 (ops.mlp_loss_grad + ops.task_sgd over all tasks at once, no autograd graph);
  meta-gradient  g_t = (I + H_t / lam)^{-1} grad L_query,t(phi_t),  H_t the Hessian of L_support,t at phi_t,
                 by `cg_steps` steps of conjugate gradient, all tasks in lockstep (per-task step sizes alpha_t,
                 beta_t; tensors [T, *S_i]) on the Hessian-vector products of ops.mlp_hvp.
meta_loss returns the mean over tasks of L_query,t(phi_t); its backward puts mean_t g_t into the model's parameters
(phi_t is treated as the exact minimiser of the proximal objective, as in the paper: no gradient through the inner
steps themselves). Parameters with requires_grad=False are not adapted (they stay at theta) and get no
meta-gradient; the solve runs on the adapted parameters.
"""
import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mamlext import ops
from mamlext._mlp_codes import OUTPUT_LOSSES
from mamlext.batched import TaskBatchedAlgorithm
from mamlext.rates import InnerRates


def _task_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Per-task inner product over all parameter tensors: [T]."""
    return sum((x * y).flatten(1).sum(1) for x, y in zip(a, b))


def _per_task(scale: Tensor, like: Tensor) -> Tensor:
    """[T] -> [T, 1, ..., 1] to broadcast against like [T, *S]."""
    return scale.reshape(-1, *([1] * (like.dim() - 1)))


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"iMAML: {name} must be an int >= 1, got {value!r}")
    return value


def _check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"iMAML: {name} must be a finite float > 0, got {value!r}")
    return float(value)


# lam's range: the solve scales Hessian-vector products by 1 / lam, which overflows for absurd values; the paper's
# settings are near 1.
LAM_RANGE = (1e-8, 1e8)


class iMAML(TaskBatchedAlgorithm):  # noqa: N801  (the algorithm's name)
    """Implicit MAML over a batch of T tasks at once.

    Args:
        model: an nn.Sequential of nn.Linear layers (with bias) with one activation kind between them (ReLU,
            LeakyReLU, Tanh, Sigmoid, GELU(approximate='none') or ELU) and none after the last (as BatchedMAML).
        inner_lr: the step size of the inner gradient descent on the proximal objective.
        inner_steps: the number of inner gradient-descent steps (meta_loss and adapt's default).
        lam: lambda > 0, the strength of the proximal term lam/2 ||phi - theta||^2.
        cg_steps: the number of conjugate-gradient steps solving (I + H_t / lam) g_t = grad L_query,t.
        loss: "mse" (ys [T, K, out]) or "ce" (ys [T, K] int64 class indices).
        backend: "auto" or "fused" (the fused MLP engine; see BatchedMAML).

    After meta_loss: ``last_task_losses`` [T] (the query losses at phi_t) and ``last_cg_residuals`` [T] (each
    task's relative CG residual ||b - A x|| / ||b|| by the CG recursion, 0 where b = 0).
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, lam: float = 1.0,
                 cg_steps: int = 5, loss: str = "mse", backend: str = "auto"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"iMAML: model must be an nn.Module, got {type(model).__name__}")
        if loss not in OUTPUT_LOSSES:
            raise ValueError(f"iMAML: loss must be one of {list(OUTPUT_LOSSES)}, got {loss!r}")
        self.inner_steps = _check_positive_int("inner_steps", inner_steps)
        self.cg_steps = _check_positive_int("cg_steps", cg_steps)
        inner_lr = _check_positive_float("inner_lr", inner_lr)
        self.lam = _check_positive_float("lam", lam)
        if not LAM_RANGE[0] <= self.lam <= LAM_RANGE[1]:
            raise ValueError(f"iMAML: lam must be in [{LAM_RANGE[0]:g}, {LAM_RANGE[1]:g}] (the strength of the "
                             f"proximal term; the solve divides by it), got {lam!r}")
        self.__dict__["_loss"] = loss
        self._bind_model(model, backend)
        self._rates = InnerRates("fixed", inner_lr, inner_steps, self._params())
        self.last_task_losses: Optional[Tensor] = None
        self.last_cg_residuals: Optional[Tensor] = None

    # --- the inner solve and the implicit gradient ----------------------------------------------------------------

    def _inner(self, xs: Tensor, ys: Tensor, steps: int) -> List[Tensor]:
        """phi after `steps` gradient-descent steps on L_support + lam/2 ||phi - theta||^2, [T, *S_i] each
        (parameters with requires_grad=False stay at theta)."""
        params = self._params()
        theta = [p.detach() for p in params]
        current = theta  # shared by all tasks until the first step; the proximal gradient is 0 there
        for step in range(steps):
            _, grads = ops.mlp_loss_grad(current, xs, ys, self.activation, self.act_param, self.loss)
            if step > 0:
                for g, c, p in zip(grads, current, theta):
                    g.add_(c - p, alpha=self.lam)
            current = ops.task_sgd(current, grads, self._rates.at(step, params))
        if steps == 0:
            current = [p.unsqueeze(0).expand(xs.shape[0], *p.shape).clone() for p in theta]
        return current

    def _solve(self, phi: List[Tensor], b: List[Tensor], xs: Tensor, ys: Tensor,
               adapted: List[bool]) -> Tuple[List[Tensor], Tensor]:
        """x ~ (I + H_t / lam)^{-1} b_t for every task: cg_steps of conjugate gradient in lockstep, from x = 0,
        on the adapted parameters only (the blocks of H between them; x is 0 for the others).
        Returns (x, the relative residual norms [T])."""
        inv_lam = 1.0 / self.lam
        b = [bi if a else torch.zeros_like(bi) for bi, a in zip(b, adapted)]

        def apply_a(v: List[Tensor]) -> List[Tensor]:
            hv = ops.mlp_hvp(phi, v, xs, ys, self.activation, self.act_param, self.loss)
            return [h.mul_(inv_lam).add_(vi) if a else h.zero_() for h, vi, a in zip(hv, v, adapted)]

        x = [torch.zeros_like(bi) for bi in b]
        r = [bi.clone() for bi in b]
        p = [bi.clone() for bi in b]
        rs = _task_dot(r, r)
        b_norm = rs.sqrt()
        zero = torch.zeros((), dtype=rs.dtype, device=rs.device)
        for _ in range(self.cg_steps):
            ap = apply_a(p)
            p_ap = _task_dot(p, ap)
            # A task whose residual is exactly 0 has p = 0: it stays where it is (no 0 / 0).
            alpha = torch.where(p_ap != 0, rs / torch.where(p_ap != 0, p_ap, 1), zero)
            for xi, ri, pi, api in zip(x, r, p, ap):
                a = _per_task(alpha, xi)
                xi.addcmul_(a, pi)
                ri.addcmul_(a, api, value=-1)
            rs_new = _task_dot(r, r)
            beta = torch.where(rs != 0, rs_new / torch.where(rs != 0, rs, 1), zero)
            p = [ri + _per_task(beta, ri) * pi for ri, pi in zip(r, p)]
            rs = rs_new
        residuals = torch.where(b_norm != 0, rs.sqrt() / torch.where(b_norm != 0, b_norm, 1), zero)
        return x, residuals

    # --- the public API ---------------------------------------------------------------------------------------------

    def meta_loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        """The mean over tasks of the query loss at the adapted parameters phi_t (a scalar). Its backward puts the
        iMAML meta-gradient mean_t g_t into model.parameters() (no gradient flows to the data). The per-task losses
        are kept in ``last_task_losses``, the CG residuals in ``last_cg_residuals``.

        xs [T, K, in], ys [T, K, out] (mse) or [T, K] int64 (ce); xq [T, Kq, in], yq likewise."""
        self._current_engine()
        self._check_support_query(xs, ys, xq, yq)
        params = self._params()
        with torch.no_grad():
            phi = self._inner(xs, ys, self.inner_steps)
            losses, query_grads = ops.mlp_loss_grad(phi, xq, yq, self.activation, self.act_param, self.loss)
            meta_grads, residuals = self._solve(phi, query_grads, xs, ys, [p.requires_grad for p in params])
        self.last_task_losses = losses.detach()
        self.last_cg_residuals = residuals
        return ops.with_task_gradients(losses.detach(), params, meta_grads).mean()

    def adapt(self, xs: Tensor, ys: Tensor, steps: Optional[int] = None) -> List[Tensor]:
        """Per-task adapted parameters phi_t after `steps` (default inner_steps) gradient-descent steps on the
        proximal support objective: P tensors [T, *S_i], without a graph."""
        self._current_engine()
        steps = self.inner_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"iMAML.adapt: steps must be an int >= 0, got {steps!r}")
        self._check_pair("adapt", xs, ys, "xs", "ys")
        with torch.no_grad():
            return self._inner(xs, ys, steps)

    def extra_repr(self) -> str:
        return (f"engine={self.engine!r}, activation={self.activation!r}, loss={self.loss!r}, "
                f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, lam={self.lam}, cg_steps={self.cg_steps}")
