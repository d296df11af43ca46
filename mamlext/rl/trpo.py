"""MAML-TRPO (Finn, Abbeel & Levine 2017, section 5.3): one vanilla policy-gradient step per task as the inner loop,
TRPO on the meta-objective, exact and without third derivatives.

Notation, per task t: theta the meta-parameters (the policy's, and Meta-SGD's rates alpha when learned), L^S_t the
inner loss on the support episodes (sampled with theta), g_t its gradient and H_t its Hessian at theta, the adapted
theta'_t = theta - alpha * g_t (elementwise), and on the query episodes (sampled with theta'_t) the surrogate
  L_t(theta) = -sum_k c_k A_k pi_{theta'_t(theta)}(a_k) / pi_old(a_k),   c_k = 1 / (valid steps of task t)
and KL_t(theta) = sum_k c_k KL(pi_old(.|x_k) || pi_{theta'_t(theta)}(.|x_k)), both averaged over the tasks.

With J_t = d theta'_t / d theta = I - diag(alpha) H_t (and d theta'_t / d alpha = -diag(g_t)):
  meta-gradient  dL/dtheta = mean_t J_t^T g'_t = mean_t (g'_t - H_t (alpha * g'_t)),  dL/dalpha = -mean_t g_t * g'_t,
                 g'_t the policy-gradient of the query loss at theta'_t (the surrogate's gradient at ratio 1);
  Fisher         at theta_old the KL's gradient through theta'_t vanishes, so its Hessian is exactly
                 F v = mean_t J_t^T G_t J_t v, G_t the policy's Fisher at theta'_t on the query states:
                 two Hessian-vector products at theta and one Fisher product at theta'_t per task, no third
                 derivative (the products' forward and backward passes are computed once per meta-update).
TRPO: conjugate gradient on (F + damping I) x = dL, the step scaled to KL = max_kl by the quadratic model, and a
backtracking line search that re-adapts the tasks (first order: the adapted parameters, no graph) at each candidate
and accepts the first with a lower surrogate and KL < max_kl; none: the parameters stay.
"""
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mamlext.rl.passes import (FusedPolicyPasses, PolicyPasses, check_samples, fused_products_available,
                               policy_gradient, policy_outputs)
from mamlext.rl.policy import CategoricalMLPPolicy, GaussianMLPPolicy
from mamlext.rl.sampling import Episodes

LR_MODES = ("fixed", "per_param")
PRODUCTS = ("auto", "fused", "bmm")


def conjugate_gradient(product: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10,
                       tolerance: float = 1e-10, with_product: bool = False):
    """An approximate solution x of A x = b for the symmetric positive definite A given by ``product``; with
    ``with_product``, (x, A x), A x read from the residual (b - r) instead of one more product."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iterations):
        if float(rr) < tolerance:
            break
        Ap = product(p)
        step = rr / (p @ Ap)
        x = x + step * p
        r = r - step * Ap
        rr_next = r @ r
        p = r + (rr_next / rr) * p
        rr = rr_next
    return (x, b - r) if with_product else x


def trpo_full_step(product: Callable[[Tensor], Tensor], gradient: Tensor, max_kl: float, iterations: int) -> Tensor:
    """TRPO's full step: the conjugate-gradient solution x of (F + damping) x = gradient, scaled so that the
    quadratic model's KL, x^T F x / 2, equals max_kl (zero if the curvature is not positive)."""
    direction, product_of_direction = conjugate_gradient(product, gradient, iterations, with_product=True)
    curvature = 0.5 * (direction @ product_of_direction)
    if not curvature > 0:
        return torch.zeros_like(direction)
    return direction * torch.sqrt(max_kl / curvature)


class TaskData(NamedTuple):
    """A meta-batch's episodes as the passes read them: observations [T, K, D], actions, the loss weights w (the
    normalised advantages / valid steps) and the averaging weights c (1 / valid steps, 0 on padding)."""
    observations: Tensor
    actions: Tensor
    weights: Tensor
    average: Tensor

    @classmethod
    def from_episodes(cls, episodes: Episodes, advantages: Tensor) -> "TaskData":
        obs, actions, mask = episodes.flat()
        average = mask / mask.sum(1, keepdim=True).clamp_min(1)
        return cls(obs, actions, advantages.reshape(mask.shape) * average, average)


def check_task_data(spec, data: "TaskData", what: str) -> None:
    """ValueError naming ``what`` (support, query) and the field unless ``data`` is a TaskData the policy can read:
    shapes and dtypes (mamlext.rl.passes.check_samples), finite observations and weights, averaging weights >= 0,
    class indices in range."""
    if not isinstance(data, TaskData):
        raise TypeError(f"{what}: expected a mamlext.rl.trpo.TaskData (TaskData.from_episodes), got "
                        f"{type(data).__name__}")
    check_samples(spec, data.observations, data.actions, data.weights, what)
    check_samples(spec, data.observations, weights=data.average, what=f"{what}.average")
    for field in ("observations", "weights", "average"):
        if not bool(torch.isfinite(getattr(data, field)).all()):
            raise ValueError(f"{what}.{field}: has non-finite values (NaN or infinity)")
    if bool((data.average < 0).any()):
        raise ValueError(f"{what}.average: the averaging weights must be >= 0 (1 / valid steps, 0 on padding)")
    if spec.distribution == "categorical" and data.actions.numel() and \
            not bool(((data.actions >= 0) & (data.actions < spec.action_dim)).all()):
        raise ValueError(f"{what}.actions: class indices must lie in [0, {spec.action_dim})")
    elif spec.distribution == "gaussian" and not bool(torch.isfinite(data.actions).all()):
        raise ValueError(f"{what}.actions: has non-finite values (NaN or infinity)")


class MAMLTRPO(nn.Module):
    """MAML-TRPO on a GaussianMLPPolicy or CategoricalMLPPolicy (one inner policy-gradient step per task).

    inner_lr: the inner step size alpha (the paper's code: 0.5 for 2D navigation, 0.1 for the cheetahs);
    first_order: FOMAML (J_t = I); lr_mode "per_param": Meta-SGD's learned step size per parameter element,
    initialised to inner_lr and updated by TRPO with the policy; max_kl, cg_iters, cg_damping, ls_steps,
    ls_backtrack: TRPO's (the paper's: 0.01, 10, 1e-5, 15, 0.8); products: what computes the meta-gradient's and
    the Fisher-vector products' passes: "fused" (FusedPolicyPasses: the fused MLP kernels, which keep each task's
    passes across conjugate gradient's products; CPU), "bmm" (PolicyPasses: batched GEMMs over the tasks, any device)
    or "auto" (fused where it runs)."""

    def __init__(self, policy: nn.Module, inner_lr: float = 0.5, first_order: bool = False, lr_mode: str = "fixed",
                 max_kl: float = 1e-2, cg_iters: int = 10, cg_damping: float = 1e-5, ls_steps: int = 15,
                 ls_backtrack: float = 0.8, products: str = "auto"):
        super().__init__()
        if not isinstance(policy, (GaussianMLPPolicy, CategoricalMLPPolicy)):
            raise TypeError(f"MAMLTRPO: policy must be a mamlext.rl GaussianMLPPolicy or CategoricalMLPPolicy, got "
                            f"{type(policy).__name__}")
        for name, value in (("inner_lr", inner_lr), ("max_kl", max_kl)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"MAMLTRPO: {name} must be a finite number > 0, got {value!r}")
        if cg_damping < 0 or not math.isfinite(cg_damping):
            raise ValueError(f"MAMLTRPO: cg_damping must be a finite number >= 0, got {cg_damping!r}")
        for name, value in (("cg_iters", cg_iters), ("ls_steps", ls_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MAMLTRPO: {name} must be an integer >= 1, got {value!r}")
        if not 0 < ls_backtrack < 1:
            raise ValueError(f"MAMLTRPO: ls_backtrack must lie in (0, 1), got {ls_backtrack!r}")
        if lr_mode not in LR_MODES:
            raise ValueError(f"MAMLTRPO: lr_mode must be one of {', '.join(LR_MODES)}, got {lr_mode!r}")
        if products not in PRODUCTS:
            raise ValueError(f"MAMLTRPO: products must be one of {', '.join(PRODUCTS)}, got {products!r}")
        self.products_impl = products
        # the kept passes' buffers of search's products, reused by every meta-update (search holds them until it
        # returns; products() allocates its own)
        self._passes_buffers: Dict[str, Tensor] = {}
        self.policy, self.spec = policy, policy.spec
        self.inner_lr, self.first_order, self.lr_mode = float(inner_lr), bool(first_order), lr_mode
        self.max_kl, self.cg_iters, self.cg_damping = float(max_kl), cg_iters, float(cg_damping)
        self.ls_steps, self.ls_backtrack = ls_steps, float(ls_backtrack)
        self.lrs = nn.ParameterList(
            [nn.Parameter(torch.full_like(p, inner_lr)) for p in policy.param_list()]) if lr_mode == "per_param" \
            else None

    # ---------------------------------------------------------------------------------------------------------

    def policy_params(self) -> List[Tensor]:
        return [p.detach() for p in self.policy.param_list()]

    def rates(self) -> List:
        """alpha per parameter: a tensor shaped like it (Meta-SGD) or the float inner_lr."""
        if self.lrs is None:
            return [self.inner_lr] * len(self.policy_params())
        return [lr.detach() for lr in self.lrs]

    def meta_parameters(self) -> List[nn.Parameter]:
        """What TRPO updates: the policy's parameters, then Meta-SGD's rates when learned."""
        return self.policy.param_list() + (list(self.lrs) if self.lrs is not None else [])

    @torch.no_grad()
    def adapt(self, support: TaskData, params: Optional[Sequence[Tensor]] = None,
              rates: Optional[Sequence] = None) -> List[Tensor]:
        """The tasks' adapted parameters theta - alpha * g_t, per task [T, *shape] each."""
        check_task_data(self.spec, support, "support")
        params = self.policy_params() if params is None else list(params)
        return self._adapted(support, params, self.rates() if rates is None else list(rates))

    def _adapted(self, support: TaskData, params: List[Tensor], rates: Sequence) -> List[Tensor]:
        """adapt on a support set already checked (the line search's candidates: one check per meta-update)."""
        grads = policy_gradient(self.spec, params, support.observations, support.actions, support.weights)
        return [p - lr * g for p, lr, g in zip(params, rates, grads)]

    def passes_class(self, observations: Tensor) -> type:
        """FusedPolicyPasses or PolicyPasses for these observations (the ``products`` option)."""
        fused = self.products_impl == "fused" or \
            (self.products_impl == "auto" and fused_products_available(observations))
        return FusedPolicyPasses if fused else PolicyPasses

    def products(self, support: TaskData, query: TaskData,
                 all_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> "MetaProducts":
        """The meta-gradient and Fisher-vector products of a meta-batch at the current meta-parameters."""
        return MetaProducts(self, support, query, all_reduce)

    @torch.no_grad()
    def search(self, support: TaskData, query: TaskData, all_reduce: Optional[Callable[[Tensor], Tensor]] = None
               ) -> Tuple[Optional[List[Tensor]], Dict[str, float]]:
        """TRPO's step from a meta-batch's support episodes (sampled with the current policy) and query episodes
        (sampled with the policies adapted on them by ``adapt``), without applying it: (the new values of
        meta_parameters(), or None when the line search accepted no step; the surrogate loss and KL before and
        after, and the accepted fraction of the full step). ``all_reduce`` (under torchrun): sums a tensor over the
        ranks, each holding a share of the tasks, for the meta-gradient, every Fisher-vector product and the line
        search's losses."""
        m = MetaProducts(self, support, query, all_reduce, self._passes_buffers)
        full_step = trpo_full_step(m.fisher_product, m.gradient, self.max_kl, self.cg_iters)
        before = m.before
        step_size = 1.0
        for _ in range(self.ls_steps):
            candidate = m.start - step_size * full_step
            value = m.surrogate_and_kl(candidate)
            if bool(torch.isfinite(value).all()) and value[0] < before[0] and value[1] < self.max_kl:
                return m.split(candidate), {"loss_before": float(before[0]), "loss_after": float(value[0]),
                                            "kl": float(value[1]), "step_fraction": step_size}
            step_size *= self.ls_backtrack
        return None, {"loss_before": float(before[0]), "loss_after": float(before[0]), "kl": 0.0,
                      "step_fraction": 0.0}

    @torch.no_grad()
    def apply(self, values: Sequence[Tensor]) -> None:
        """Sets meta_parameters() to ``values`` (search's)."""
        for param, new in zip(self.meta_parameters(), values):
            param.copy_(new)

    def step(self, support: TaskData, query: TaskData,
             all_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Dict[str, float]:
        """search, then apply the step it accepted (if any); returns search's figures."""
        values, info = self.search(support, query, all_reduce)
        if values is not None:
            self.apply(values)
        return info


class MetaProducts:
    """A meta-batch's products at the current meta-parameters (see the module's docstring), over flat vectors of the
    meta-parameters (MAMLTRPO.meta_parameters order): ``gradient`` (of the mean surrogate), ``fisher_product(v)``
    (F v + damping v), ``surrogate_and_kl(flat candidate)`` (the mean surrogate and KL after re-adapting at it).
    The passes at theta (support) and at the adapted parameters (query) are computed once, here; ``buffers``: where
    fused passes keep them (FusedPolicyPasses; MAMLTRPO.search passes its own, reused by every meta-update)."""

    @torch.no_grad()
    def __init__(self, algo: MAMLTRPO, support: TaskData, query: TaskData,
                 all_reduce: Optional[Callable[[Tensor], Tensor]] = None,
                 buffers: Optional[Dict[str, Tensor]] = None):
        check_task_data(algo.spec, support, "support")
        check_task_data(algo.spec, query, "query")
        if support.observations.shape[0] != query.observations.shape[0]:
            raise ValueError(f"support and query must hold the same tasks: {support.observations.shape[0]} and "
                             f"{query.observations.shape[0]} tasks")
        self.algo, self.support, self.query = algo, support, query
        self.theta, self.rates = algo.policy_params(), algo.rates()
        self.learn_rates = algo.lrs is not None
        self.local_tasks = support.observations.shape[0]
        self.reduce_sum = all_reduce if all_reduce is not None else (lambda v: v)
        count = torch.tensor([float(self.local_tasks)], dtype=torch.float64, device=support.observations.device)
        self.tasks = float(self.reduce_sum(count).item())
        self.sizes = [p.numel() for p in self.theta] * (2 if self.learn_rates else 1)
        self.shapes = [p.shape for p in self.theta]
        passes = algo.passes_class(support.observations)

        def make(params, observations, key):  # buffers: the fused passes' (see FusedPolicyPasses)
            if passes is FusedPolicyPasses:
                return passes(algo.spec, params, observations, buffers, key)
            return passes(algo.spec, params, observations)

        self.at_theta = make(self.theta, support.observations, "support")
        _, self.g_support = self.at_theta.loss_grad(support.actions, support.weights)
        adapted = [p - lr * g for p, lr, g in zip(self.theta, self.rates, self.g_support)]
        self.at_adapted = make(adapted, query.observations, "query")
        _, g_query = self.at_adapted.loss_grad(query.actions, query.weights)  # first: fused passes keep the output
        self.old_log_prob, self.old_outputs = self.at_adapted.log_prob(query.actions), self.at_adapted.outputs()
        self.gradient = self.reduce_sum(self.flat(self.through_adaptation(g_query))) / self.tasks
        self.start = self.flat(self.theta + (list(self.rates) if self.learn_rates else []))
        # the surrogate and KL at the start: the ratios are 1 (the query's policies are these adapted ones)
        at_start = torch.stack([-query.weights.sum(), query.weights.new_zeros(())]).to(torch.float64)
        self.before = self.reduce_sum(at_start) / self.tasks

    def flat(self, parts: Sequence[Tensor]) -> Tensor:
        return torch.cat([p.reshape(-1) for p in parts])

    def split(self, vector: Tensor) -> List[Tensor]:
        parts = torch.split(vector, self.sizes)
        return [part.view(self.shapes[i % len(self.shapes)]) for i, part in enumerate(parts)]

    def through_adaptation(self, per_task: List[Tensor]) -> List[Tensor]:
        """sum_t J_t^T u_t for per-task u_t (the theta part, then the rates' part)."""
        out = [u.sum(0) for u in per_task]
        if not self.algo.first_order:
            hv = self.at_theta.hvp([lr * u for lr, u in zip(self.rates, per_task)], reduce=True)
            out = [o - h for o, h in zip(out, hv)]
        if self.learn_rates:
            out += [-(g * u).sum(0) for g, u in zip(self.g_support, per_task)]
        return out

    def into_adaptation(self, v: List[Tensor]) -> List[Tensor]:
        """J_t v per task."""
        n = len(self.theta)
        v_theta = v[:n]
        out = [vi.expand(self.local_tasks, *vi.shape) for vi in v_theta]
        if not self.algo.first_order:
            hv = self.at_theta.hvp(v_theta)
            out = [o - lr * h for o, lr, h in zip(out, self.rates, hv)]
        if self.learn_rates:
            out = [o - g * va for o, g, va in zip(out, self.g_support, v[n:])]
        return out

    @torch.no_grad()
    def fisher_product(self, vector: Tensor) -> Tensor:
        per_task = self.at_adapted.gauss_newton(self.into_adaptation(self.split(vector)), self.query.average)
        return self.reduce_sum(self.flat(self.through_adaptation(per_task))) / self.tasks \
            + self.algo.cg_damping * vector

    @torch.no_grad()
    def surrogate_and_kl(self, candidate: Tensor) -> Tensor:
        """[mean surrogate loss, mean KL] (float64) with the meta-parameters at the flat ``candidate``."""
        parts = self.split(candidate)
        n = len(self.theta)
        rates = parts[n:] if self.learn_rates else self.rates
        adapted = self.algo._adapted(self.support, parts[:n], rates)
        policy = policy_outputs(self.algo.spec, adapted, self.query.observations)
        ratio = torch.exp(policy.log_prob(self.query.actions) - self.old_log_prob)
        loss = -(self.query.weights * ratio).sum(1).sum()
        kl = (self.query.average * policy.kl_from(self.old_outputs)).sum(1).sum()
        return self.reduce_sum(torch.stack([loss, kl]).to(torch.float64)) / self.tasks
