"""`python -m mamlext bench --suite rl`: MAML-TRPO (Finn, Abbeel & Levine 2017, section 5.3) at the paper's 2D
navigation setting, three implementations side by side in one process, on the same data and initial parameters.

Setting: T = 20 tasks of Navigation2D, 20 episodes x 100 steps per task (K = 2,000 samples), GaussianMLPPolicy(2, 2,
(100, 100)) with ReLU, one inner policy-gradient step of lr 0.5, second order, TRPO with max_kl 0.01, 10 conjugate-
gradient iterations, damping 1e-5, a line search of 15 steps x 0.8. The data are sampled once (seeded): the support
episodes with the policy, the query episodes with the policies adapted on them; advantages by mamlext.rl.advantages.

Implementations:
  l2l-style  learn2learn's examples/rl/maml_trpo.py algorithm written out in plain PyTorch, one task at a time: per
             task the inner loss (weighted negative log-likelihood, torch.distributions.Normal), autograd.grad with
             create_graph=True, the adapted parameters, the query surrogate (ratio to the old log-probabilities) and
             KL(old || new); the meta-gradient by autograd of the mean surrogate; Fisher-vector products by third-
             order autograd (cherry's trpo.hessian_vector_product: the KL's gradient with create_graph=True, built
             once per meta-update, then grad(dot(flat KL gradient, v)) + damping v); the line search re-adapts at
             each candidate without create_graph.
  bmm        the same algorithm batched over the tasks: the parameters expanded to [T, ...], the layers torch.bmm /
             baddbmm, the per-task inner gradients by autograd w.r.t. the expanded parameters; third-order FVPs.
  fused      mamlext.rl.trpo: MAMLTRPO.step / MetaProducts (exact Fisher-vector products without third derivatives).
All three use the same conjugate gradient and step scaling (mamlext.rl.trpo.trpo_full_step, plain tensor code) and
line-search rule (MAMLTRPO.step's). The plain rows take the loss before the step from their graph's forward
(as learn2learn does); MAMLTRPO takes it as -mean_t sum_k w_tk (the ratios are 1 at the start).

Measured: first, in float64 on a smaller problem (CHECK: T = 4, 2 episodes = 200 samples per task), every
implementation's meta-gradient and Fisher-vector product of a random vector against l2l-style's (normwise relative
error ||a - b|| / ||b|| <= RTOL; a mismatch marks the row failed and it is not timed); then, in float32 at full
size, (1) one FVP with each implementation's per-meta-update setup done once beforehand (the KL-gradient graph for
the plain rows, the MetaProducts construction for fused), (2) one whole meta-update (meta-gradient, CG, step scaling,
line search, parameter update) from the same starting parameters each time (restored after each call; the restore,
a copy of 20k numbers, is inside the timing), both in interleaved rounds (the FVP by mamlext.bench.common
.time_impls, the meta-update, seconds per call on a CPU, by time_rounds: one call each per round), medians,
(3) the sampling of one meta-batch (support episodes, their advantages, the adaptation, query episodes and their
advantages), (4) the machine's float32 GEMM rate (torch.mm of 2048 x 2048) and the fused FVP's achieved rate: its
GEMM FLOPs (fvp_gemm_flops, counted from the layer widths, T and K as mamlext.rl.passes' batched GEMMs perform them,
checked against torch.utils.flop_counter on a call of those (MAMLTRPO products="bmm"); the fused kernels compute the
same products with the bias outside the GEMM, about 1% fewer multiply-adds at the navigation widths) over its median
time.
"""
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, autograd
from torch.distributions import Normal, kl_divergence

from mamlext.bench.common import (FOREIGN_LOAD_WARN, ForeignLoad, load_average, machine_info, noisy, noisy_note,
                                  summary, sync, time_impls, write_json)
from mamlext.rl.advantages import advantages
from mamlext.rl.envs import Navigation2D
from mamlext.rl.policy import GaussianMLPPolicy, PolicySpec
from mamlext.rl.sampling import sample_episodes
from mamlext.rl.trpo import MAMLTRPO, TaskData, trpo_full_step

SCHEMA_VERSION = 1
SUITE = "rl"
DTYPE = torch.float32
CHECK_DTYPE = torch.float64
RTOL = 1e-8  # normwise relative error of the float64 meta-gradient and FVP against l2l-style's
REFERENCE = "l2l-style"
PLAIN = ("l2l-style", "bmm")
LABELS = {"l2l-style": "l2l-style per-task loop, 3rd-order autograd FVP",
          "bmm": "plain PyTorch batched (bmm), 3rd-order autograd FVP",
          "fused": "mamlext MAMLTRPO / MetaProducts"}


class RLSetting(NamedTuple):
    """The problem: the paper's 2D navigation (MAML section 5.3) by default."""
    tasks: int = 20
    episodes: int = 20
    horizon: int = 100
    hidden: Tuple[int, ...] = (100, 100)
    activation: str = "relu"
    inner_lr: float = 0.5
    first_order: bool = False
    max_kl: float = 1e-2
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_steps: int = 15
    ls_backtrack: float = 0.8

    @property
    def samples(self) -> int:
        """K: samples per task as the passes see them (episodes x horizon, padding included)."""
        return self.episodes * self.horizon


class Timing(NamedTuple):
    repeats: int = 3            # interleaved rounds
    fvp_min_run_time: float = 1.5     # measured seconds per implementation, over all rounds
    update_min_run_time: float = 10.0  # at least `repeats` rounds, and until each ran this long (time_rounds)
    sampling_min_run_time: float = 1.0
    gemm_min_run_time: float = 1.0
    gemm_size: int = 2048       # torch.mm of gemm_size x gemm_size


CHECK = dict(tasks=4, episodes=2)  # the float64 check's T and episodes (x horizon 100 = 200 samples per task)


# --- FLOP count ------------------------------------------------------------------------------------------------------

def fvp_gemm_flops(widths: Sequence[int], tasks: int, samples: int, first_order: bool = False) -> int:
    """The GEMM FLOPs (2 per multiply-add) of one MetaProducts.fisher_product, as mamlext.rl.passes performs it on
    T = ``tasks`` x K = ``samples`` rows (padding included). The passes keep each layer's input with a column of
    ones ([h | 1] times [W | b]), so a GEMM with a layer's input or its R{h} is n_l + 1 wide: with
    Y_l = 2 T K (n_l + 1) n_{l+1} and X_l = 2 T K n_l n_{l+1} for layer l (n the widths):
      hvp at theta (twice: J v with a shared v, J^T u with per-task u): R-forward Y_0 | 2 Y_l (l > 0); backward:
          outer Y_0 | 2 Y_l, and for l > 0 the two R{dh} products 2 X_l              -> 2 Y_0, 4 Y_l + 2 X_l
      gauss_newton at the adapted parameters: R-forward Y_0 | 2 Y_l; backward: outer Y_l, and for l > 0 the
          product with W_l X_l                                                        -> 2 Y_0, 3 Y_l + X_l
    i.e. 6 Y_0 + sum_{l>0} (11 Y_l + 5 X_l) second order; first order (no hvp) 2 Y_0 + sum_{l>0} (3 Y_l + X_l). A
    GEMM that accumulates into its output (baddbmm_) counts as the GEMM alone."""
    total = 0
    for l, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        x, y = 2 * tasks * samples * n_in * n_out, 2 * tasks * samples * (n_in + 1) * n_out
        if l == 0:
            total += y * (2 if first_order else 6)
        else:
            total += (3 * y + x) if first_order else (11 * y + 5 * x)
    return total


FLOP_FORMULA = ("with Y_l = 2 T K (n_l + 1) n_{l+1} and X_l = 2 T K n_l n_{l+1} (layer l maps n_l to n_{l+1}; the +1 "
                "is the bias column of [h | 1]): 6 Y_0 + sum_{l>0} (11 Y_l + 5 X_l) second order (two Hessian-vector "
                "products at theta, one Gauss-Newton product at the adapted parameters); first order 2 Y_0 + "
                "sum_{l>0} (3 Y_l + X_l)")


def counted_gemm_flops(fn: Callable[[], object]) -> int:
    """The matrix-multiply FLOPs torch.utils.flop_counter counts in one call of fn, the in-place addmm_ and
    baddbmm_ (which mamlext.rl.passes accumulates with, and which the counter's registry lacks) included."""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def baddbmm_(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]

    in_place = {torch.ops.aten.addmm_: addmm_, torch.ops.aten.baddbmm_: baddbmm_}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        fn()
    return int(counter.get_total_flops())


# --- data ------------------------------------------------------------------------------------------------------------

def make_policy(setting: RLSetting, seed: int, dtype: torch.dtype, device: torch.device) -> GaussianMLPPolicy:
    torch.manual_seed(seed)
    return GaussianMLPPolicy(2, 2, tuple(setting.hidden), setting.activation).to(device=device, dtype=dtype)


def make_algo(policy: GaussianMLPPolicy, setting: RLSetting, products: str = "auto") -> MAMLTRPO:
    return MAMLTRPO(policy, inner_lr=setting.inner_lr, first_order=setting.first_order, max_kl=setting.max_kl,
                    cg_iters=setting.cg_iters, cg_damping=setting.cg_damping, ls_steps=setting.ls_steps,
                    ls_backtrack=setting.ls_backtrack, products=products)


def sample_meta_batch(algo: MAMLTRPO, env: Navigation2D, tasks: int, episodes: int, generator: torch.Generator
                      ) -> Tuple[TaskData, TaskData, float]:
    """One meta-batch: goals, support episodes with the policy, their advantages, the adaptation, query episodes
    with the adapted policies and their advantages. Returns (support, query, mean query return)."""
    goals = env.sample_tasks(tasks, generator)
    spec = algo.spec
    support_episodes = sample_episodes(env, goals, spec, algo.policy_params(), episodes, generator)
    support = TaskData.from_episodes(support_episodes, advantages(support_episodes))
    adapted = algo.adapt(support)
    query_episodes = sample_episodes(env, goals, spec, adapted, episodes, generator)
    query = TaskData.from_episodes(query_episodes, advantages(query_episodes))
    return support, query, float(query_episodes.returns().mean())


# --- the plain implementations ---------------------------------------------------------------------------------------

def _flat(parts: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.reshape(-1) for p in parts])


def _split(vector: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    out, i = [], 0
    for p in like:
        out.append(vector[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


class PlainTRPO:
    """MAML-TRPO in plain PyTorch autograd (learn2learn's examples/rl/maml_trpo.py algorithm); subclasses give
    meta_losses: the mean query surrogate and KL(old || new) after adapting on the support episodes."""

    name = ""

    def __init__(self, spec: PolicySpec, theta: Sequence[Tensor], support: TaskData, query: TaskData,
                 setting: RLSetting):
        self.spec, self.support, self.query, self.setting = spec, support, query, setting
        self.params = [p.detach().clone().requires_grad_(True) for p in theta]
        self.saved = [p.detach().clone() for p in self.params]
        self.tasks = support.observations.shape[0]
        self.act = torch.relu if spec.activation == "relu" else torch.tanh

    def meta_losses(self, params: Sequence[Tensor], create_graph: bool, old=None):
        """(mean surrogate, mean KL, old) with old the adapted policies' outputs when ``old`` is None."""
        raise NotImplementedError

    def products(self) -> Tuple[Tensor, Callable[[Tensor], Tensor], Tuple[Tensor, Tensor], object]:
        """(meta-gradient, Fisher-vector product, (loss, KL) before the step, old outputs) at the current
        parameters: the meta-update's setup (the graph through the adaptation and the KL's gradient)."""
        with torch.enable_grad():
            loss, kl, old = self.meta_losses(self.params, create_graph=not self.setting.first_order)
            gradient = _flat(autograd.grad(loss, self.params, retain_graph=True)).detach()
            kl_grad = _flat(autograd.grad(kl, self.params, create_graph=True))
        damping = self.setting.cg_damping

        def fisher_product(v: Tensor) -> Tensor:
            with torch.enable_grad():
                hv = autograd.grad(kl_grad @ v, self.params, retain_graph=True)
            return _flat(hv).detach() + damping * v

        return gradient, fisher_product, (loss.detach(), kl.detach()), old

    def surrogate_and_kl(self, candidate: Tensor, old) -> Tuple[Tensor, Tensor]:
        """Re-adapts at the flat candidate (no create_graph); (mean surrogate, mean KL)."""
        params = [p.detach().requires_grad_(True) for p in _split(candidate, self.params)]
        loss, kl, _ = self.meta_losses(params, create_graph=False, old=old)
        return loss.detach(), kl.detach()

    def meta_update(self) -> dict:
        s = self.setting
        gradient, fvp, (loss, _), old = self.products()
        full_step = trpo_full_step(fvp, gradient, s.max_kl, s.cg_iters)
        start = _flat(self.params).detach()
        accepted, fraction, step_size = start, 0.0, 1.0
        for _ in range(s.ls_steps):
            candidate = start - step_size * full_step
            value = self.surrogate_and_kl(candidate, old)
            if bool(torch.isfinite(torch.stack(value)).all()) and value[0] < loss and value[1] < s.max_kl:
                accepted, fraction = candidate, step_size
                break
            step_size *= s.ls_backtrack
        with torch.no_grad():
            for p, new in zip(self.params, _split(accepted, self.params)):
                p.copy_(new)
        return {"step_fraction": fraction}

    def current(self) -> Tensor:
        return _flat(self.params).detach()

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, self.saved):
                p.copy_(saved)


class L2LStyle(PlainTRPO):
    """One task at a time, torch.distributions, F.linear."""

    name = "l2l-style"

    def _mean(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        h = x
        layers = self.spec.layers
        for l in range(layers):
            h = F.linear(h, params[2 * l], params[2 * l + 1])
            if l + 1 < layers:
                h = self.act(h)
        return h

    def _dist(self, params: Sequence[Tensor], x: Tensor) -> Normal:
        mean = self._mean(params, x)
        return Normal(mean, params[-1].exp().expand_as(mean), validate_args=False)

    def meta_losses(self, params, create_graph, old=None):
        sup, qry = self.support, self.query
        keep_old = old is None
        old = [] if keep_old else old
        total_loss = total_kl = 0.0
        for t in range(self.tasks):
            with torch.enable_grad():
                log_prob = self._dist(params, sup.observations[t]).log_prob(sup.actions[t]).sum(-1)
                inner = -(sup.weights[t] * log_prob).sum()
                grads = autograd.grad(inner, params, create_graph=create_graph)
            adapted = [p - self.setting.inner_lr * g for p, g in zip(params, grads)]
            if not create_graph:
                adapted = [a.detach() for a in adapted]
            with torch.set_grad_enabled(create_graph):
                new = self._dist(adapted, qry.observations[t])
                new_log_prob = new.log_prob(qry.actions[t]).sum(-1)
                if keep_old:
                    old.append((new.loc.detach(), new.scale.detach(), new_log_prob.detach()))
                old_loc, old_scale, old_log_prob = old[t]
                ratio = torch.exp(new_log_prob - old_log_prob)
                total_loss = total_loss - (qry.weights[t] * ratio).sum()
                kl = kl_divergence(Normal(old_loc, old_scale, validate_args=False), new).sum(-1)
                total_kl = total_kl + (qry.average[t] * kl).sum()
        return total_loss / self.tasks, total_kl / self.tasks, old


class Batched(PlainTRPO):
    """All tasks at once: parameters expanded to [T, ...], torch.bmm / baddbmm."""

    name = "bmm"

    def _mean(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        h = x
        layers = self.spec.layers
        for l in range(layers):
            h = torch.baddbmm(params[2 * l + 1].unsqueeze(1), h, params[2 * l].transpose(1, 2))
            if l + 1 < layers:
                h = self.act(h)
        return h

    def _dist(self, params: Sequence[Tensor], x: Tensor) -> Normal:
        mean = self._mean(params, x)
        return Normal(mean, params[-1].exp().unsqueeze(1).expand_as(mean), validate_args=False)

    def meta_losses(self, params, create_graph, old=None):
        sup, qry, T = self.support, self.query, self.tasks
        with torch.enable_grad():
            per_task = [p.expand(T, *p.shape) for p in params]
            log_prob = self._dist(per_task, sup.observations).log_prob(sup.actions).sum(-1)
            inner = -(sup.weights * log_prob).sum()
            grads = autograd.grad(inner, per_task, create_graph=create_graph)  # per task: [T, ...]
        adapted = [p - self.setting.inner_lr * g for p, g in zip(per_task, grads)]
        if not create_graph:
            adapted = [a.detach() for a in adapted]
        with torch.set_grad_enabled(create_graph):
            new = self._dist(adapted, qry.observations)
            new_log_prob = new.log_prob(qry.actions).sum(-1)
            if old is None:
                old = (new.loc.detach(), new.scale.detach(), new_log_prob.detach())
            old_loc, old_scale, old_log_prob = old
            ratio = torch.exp(new_log_prob - old_log_prob)
            loss = -(qry.weights * ratio).sum() / T
            kl = (qry.average * kl_divergence(Normal(old_loc, old_scale, validate_args=False), new).sum(-1)).sum() / T
        return loss, kl, old


class Fused:
    """mamlext: MAMLTRPO.step and MetaProducts."""

    name = "fused"

    def __init__(self, spec: PolicySpec, theta: Sequence[Tensor], support: TaskData, query: TaskData,
                 setting: RLSetting):
        policy = GaussianMLPPolicy(spec.widths[0], spec.widths[-1], spec.widths[1:-1], spec.activation).to(
            device=theta[0].device, dtype=theta[0].dtype)
        with torch.no_grad():
            for p, value in zip(policy.param_list(), theta):
                p.copy_(value)
        self.algo = make_algo(policy, setting)
        self.support, self.query = support, query
        self.saved = [p.detach().clone() for p in self.algo.meta_parameters()]

    def products(self):
        m = self.algo.products(self.support, self.query)
        return m.gradient, m.fisher_product, None, None

    def meta_update(self) -> dict:
        return {"step_fraction": self.algo.step(self.support, self.query)["step_fraction"]}

    def current(self) -> Tensor:
        return _flat(self.algo.meta_parameters()).detach()

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.algo.meta_parameters(), self.saved):
                p.copy_(saved)


IMPLS = {"l2l-style": L2LStyle, "bmm": Batched, "fused": Fused}


# --- the run ---------------------------------------------------------------------------------------------------------

def normwise_error(actual: Tensor, expected: Tensor) -> float:
    """||a - b|| / ||b|| (2-norms of the flat vectors; nan when a is not finite or has another shape)."""
    if actual.shape != expected.shape:
        return float("nan")
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-300))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _row(name: str) -> dict:
    return {"impl": name, "label": LABELS.get(name, name), "status": "ok", "reason": None,
            "grad_rel_error": None, "fvp_rel_error": None, "update_rel_error": None, "check_step_fraction": None,
            "fvp": None, "meta_update": None, "step_fraction": None, "float32_fvp_rel_diff": None,
            "float32_update_rel_diff": None, "fvp_speedup_of_fused": None, "meta_update_speedup_of_fused": None,
            "fvp_gflops": None, "fvp_fraction_of_gemm": None, "foreign_cpu_load": None}


def _build(impls, names, rows, spec, theta, support, query, setting):
    built = {}
    for name in names:
        if rows[name]["status"] != "ok":
            continue
        try:
            built[name] = impls[name](spec, theta, support, query, setting)
        except Exception as error:  # a broken implementation is a failed row, not a crashed suite
            rows[name].update(status="failed", reason=f"could not be built: {_first_line(error)}")
    return built


def check(impls, rows: Dict[str, dict], setting: RLSetting, device: torch.device, seed: int) -> dict:
    """The float64 check on a smaller problem: meta-gradient and FVP of a random vector against l2l-style's
    (a mismatch fails the row); the parameters after one meta-update are compared for information."""
    small = setting._replace(tasks=min(setting.tasks, CHECK["tasks"]),
                             episodes=min(setting.episodes, CHECK["episodes"]))
    policy = make_policy(small, seed, CHECK_DTYPE, device)
    algo = make_algo(policy, small)
    env = Navigation2D(horizon=small.horizon, dtype=CHECK_DTYPE, device=device)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    support, query, _ = sample_meta_batch(algo, env, small.tasks, small.episodes, generator)
    theta = algo.policy_params()
    v = torch.randn(sum(p.numel() for p in theta), generator=generator, dtype=CHECK_DTYPE, device=device)
    built = _build(impls, list(rows), rows, policy.spec, theta, support, query, small)
    results = {}
    for name, impl in built.items():
        try:
            gradient, fvp, _, _ = impl.products()
            product = fvp(v)
            impl.meta_update()
            results[name] = (gradient.detach().clone(), product.detach().clone(), impl.current().clone())
        except Exception as error:
            rows[name].update(status="failed", reason=f"raised in the float64 check: {_first_line(error)}")
    reference = results.get(REFERENCE)
    for name, (gradient, product, updated) in results.items():
        if reference is None:
            rows[name].update(status="failed", reason=f"no reference: {REFERENCE} did not run")
            continue
        errors = [normwise_error(gradient, reference[0]), normwise_error(product, reference[1])]
        rows[name].update(grad_rel_error=errors[0], fvp_rel_error=errors[1],
                          update_rel_error=normwise_error(updated - _flat(theta),
                                                          reference[2] - _flat(theta)))
        bad = [what for what, e in zip(("meta-gradient", "Fisher-vector product"), errors) if not e <= RTOL]
        if bad:
            rows[name].update(status="failed", reason=(
                f"float64 {' and '.join(bad)} disagree{'s' if len(bad) == 1 else ''} with {REFERENCE}'s "
                f"(normwise rel. errors {errors[0]:.1e}, {errors[1]:.1e} > {RTOL:.0e})"))
    return {"tasks": small.tasks, "episodes": small.episodes, "samples_per_task": small.samples,
            "dtype": str(CHECK_DTYPE), "rtol": RTOL, "reference": REFERENCE}


def _stats(times: List[float]) -> dict:
    return summary(times)


MAX_ROUNDS = 30


def time_rounds(impls: Dict[str, Callable], device: torch.device, min_run_time: float, repeats: int
                ) -> Dict[str, List[float]]:
    """Seconds per call for calls that take seconds: rounds of one call of each implementation in turn (so a change
    of machine load hits them all alike), at least ``repeats`` rounds and until each has run ``min_run_time``
    seconds in all (at most MAX_ROUNDS). time_impls' blocked_autorange would add an unrecorded call per round."""
    times: Dict[str, List[float]] = {name: [] for name in impls}
    for round_ in range(MAX_ROUNDS):
        if round_ >= repeats and all(sum(t) >= min_run_time for t in times.values()):
            break
        for name, fn in impls.items():
            sync(device)
            begin = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - begin)
    return times


def run(device: torch.device, out_dir: Optional[str], setting: RLSetting = RLSetting(), timing: Timing = Timing(),
        seed: int = 0, progress: bool = True, command: Optional[str] = None, impls=None) -> dict:
    """Runs the rl suite (see the module's docstring), writes out_dir/results.json and results.md (out_dir None:
    nothing written), prints the table; returns the results dict. ``impls`` replaces IMPLS (tests)."""
    from tqdm.auto import tqdm

    impls = IMPLS if impls is None else impls
    names = list(impls)
    start = time.perf_counter()
    json_path = os.path.join(out_dir, "results.json") if out_dir else None
    widths = (2, *setting.hidden, 2)
    results = {
        "schema_version": SCHEMA_VERSION, "title": f"mamlext bench --suite {SUITE} on {device}", "suite": SUITE,
        "device": str(device), "command": command, "complete": False, "machine": machine_info(device),
        "settings": {**setting._asdict(), "hidden": list(setting.hidden), "widths": list(widths),
                     "samples_per_task": setting.samples, "env": "Navigation2D", "policy": "GaussianMLPPolicy",
                     "seed": seed, "dtype": str(DTYPE), "timing": timing._asdict(), "fvp_vector": "randn"},
        "check": None, "rows": [], "sampling": None, "gemm": None, "flops": None, "speedups": None,
        "notes": [], "wall_s": None,
    }
    rows = {name: _row(name) for name in names}
    bar = tqdm(total=7, desc="mamlext bench rl", unit="stage", disable=not progress, file=sys.stderr)

    def stage(text):
        bar.set_postfix_str(text)

    # 1. the float64 check
    stage("float64 check")
    results["check"] = check(impls, rows, setting, device, seed)
    bar.update()

    # 2. the full-size float32 data, sampled once
    stage("sampling the data")
    policy = make_policy(setting, seed, DTYPE, device)
    algo = make_algo(policy, setting)
    env = Navigation2D(horizon=setting.horizon, dtype=DTYPE, device=device)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    support, query, query_return = sample_meta_batch(algo, env, setting.tasks, setting.episodes, generator)
    theta = algo.policy_params()
    results["settings"]["valid_samples_per_task"] = float(
        (support.average > 0).sum(1).to(torch.float64).mean())
    v = torch.randn(sum(p.numel() for p in theta), generator=generator, dtype=DTYPE, device=device)
    bar.update()

    load = ForeignLoad()
    # 3. the FVP, setup excluded
    stage("FVP")
    built = _build(impls, names, rows, policy.spec, theta, support, query, setting)
    products, first = {}, {}
    for name, impl in list(built.items()):
        try:
            _, fvp, _, _ = impl.products()
            first[name] = fvp(v).detach().clone()
            products[name] = (lambda fvp=fvp: fvp(v))
        except Exception as error:
            rows[name].update(status="failed", reason=f"raised: {_first_line(error)}")
            del built[name]
    times = time_impls(products, device, timing.fvp_min_run_time, timing.repeats, warmup=1)
    for name in products:
        rows[name]["fvp"] = _stats(times[name])
        if REFERENCE in first:
            rows[name]["float32_fvp_rel_diff"] = normwise_error(first[name], first[REFERENCE])
    del products
    bar.update()

    # 4. the whole meta-update, from the same parameters each time
    stage("meta-update")
    updates, after = {}, {}
    for name, impl in list(built.items()):
        try:
            rows[name]["step_fraction"] = impl.meta_update()["step_fraction"]
            after[name] = impl.current().clone()
            impl.restore()
        except Exception as error:
            rows[name].update(status="failed", reason=f"raised in the meta-update: {_first_line(error)}")
            del built[name]
            continue
        updates[name] = (lambda impl=impl: (impl.meta_update(), impl.restore()))
    times = time_rounds(updates, device, timing.update_min_run_time, timing.repeats)
    start_flat = _flat(theta)
    for name in updates:
        rows[name]["meta_update"] = _stats(times[name])
        if REFERENCE in after:
            rows[name]["float32_update_rel_diff"] = normwise_error(after[name] - start_flat,
                                                                   after[REFERENCE] - start_flat)
    del updates, built
    foreign = load.cpus()
    for row in rows.values():
        row["foreign_cpu_load"] = foreign
    bar.update()

    # 5. sampling one meta-batch
    stage("sampling")
    load = ForeignLoad()
    sample_times = time_impls({"sampling": lambda: sample_meta_batch(algo, env, setting.tasks, setting.episodes,
                                                                     generator)},
                              device, timing.sampling_min_run_time, timing.repeats, warmup=1)["sampling"]
    results["sampling"] = {"what": "goals, support episodes with the policy, their advantages (GAE on the linear "
                                   "baseline), the adaptation (MAMLTRPO.adapt), query episodes with the adapted "
                                   "policies and their advantages",
                           "tasks": setting.tasks, "episodes": setting.episodes, "horizon": setting.horizon,
                           "mean_query_return": query_return, **_stats(sample_times),
                           "foreign_cpu_load": load.cpus()}
    bar.update()

    # 6. the GEMM rate
    stage("GEMM rate")
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    n = timing.gemm_size
    a = torch.randn(n, n, generator=gen, dtype=DTYPE, device=device)
    b = torch.randn(n, n, generator=gen, dtype=DTYPE, device=device)
    gemm_times = time_impls({"mm": lambda: torch.mm(a, b)}, device, timing.gemm_min_run_time, timing.repeats)["mm"]
    gemm = _stats(gemm_times)
    gemm_flops = 2 * n ** 3
    gemm["gflops"] = gemm_flops / (gemm["median_ms"] * 1e-3) / 1e9
    results["gemm"] = {"what": f"torch.mm of {n} x {n} float32", "size": n, "flops_per_call": gemm_flops, **gemm}
    del a, b
    bar.update()

    # 7. FLOPs of the fused FVP, speedups
    stage("FLOPs")
    flops = fvp_gemm_flops(widths, setting.tasks, setting.samples, setting.first_order)
    counted = None
    if "fused" in rows and rows["fused"]["fvp"] is not None:
        m = make_algo(make_policy(setting, seed, DTYPE, device), setting, "bmm").products(support, query)
        counted = counted_gemm_flops(lambda: m.fisher_product(v))
        del m
    results["flops"] = {"fvp_gemm_flops": flops, "formula": FLOP_FORMULA, "tasks": setting.tasks,
                        "samples_per_task": setting.samples, "widths": list(widths),
                        "counted_by_torch_flop_counter": counted}
    for name, row in rows.items():
        if row["fvp"] is not None:
            row["fvp_gflops"] = flops / (row["fvp"]["median_ms"] * 1e-3) / 1e9
            row["fvp_fraction_of_gemm"] = row["fvp_gflops"] / gemm["gflops"]
    fused = rows.get("fused")
    speedups = {"fvp": {}, "meta_update": {}}
    if fused is not None:
        for name in PLAIN:
            row = rows.get(name)
            if row is None:
                continue
            for what, key in (("fvp", "fvp_speedup_of_fused"), ("meta_update", "meta_update_speedup_of_fused")):
                if row[what] is not None and fused[what] is not None:
                    row[key] = row[what]["median_ms"] / fused[what]["median_ms"]
                    speedups[what][f"fused vs {name}"] = row[key]
    results["speedups"] = speedups
    bar.update()
    bar.close()

    results["rows"] = list(rows.values())
    results["notes"] = notes(results)
    results["complete"] = True
    results["wall_s"] = time.perf_counter() - start
    results["machine"]["loadavg_end"] = load_average()
    table = format_table(results)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_json(results, json_path)
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write("```\n" + table + "\n```\n")
    print(table)
    if out_dir:
        print(f"\nwrote {json_path} and results.md ({results['wall_s']:.0f} s)")
    return results


def notes(results: dict) -> List[str]:
    out = ["fvp: one Fisher-vector product (F + damping I) v, its per-meta-update setup (the plain rows' KL-gradient "
           "graph, fused's MetaProducts) done once beforehand; meta_update: meta-gradient + CG + step scaling + "
           "line search + parameter update, parameters restored after each call",
           "all rows share mamlext.rl.trpo.trpo_full_step (CG, and x^T F x from its residual); the plain rows take "
           "the loss before the step from their graph (as learn2learn), MAMLTRPO as -mean_t sum_k w_tk (ratio 1)"]
    loads = [r["foreign_cpu_load"] for r in results["rows"]] + [(results["sampling"] or {}).get("foreign_cpu_load")]
    if any(noisy(x) for x in loads):
        out.append(f"other processes used more than {FOREIGN_LOAD_WARN} CPUs while timing: the timings are noisy")
    fractions = {r["step_fraction"] for r in results["rows"] if r["step_fraction"] is not None}
    if len(fractions) > 1:
        out.append(f"the float32 line searches accepted different step fractions: {sorted(fractions)}; the meta-"
                   "update times are then not of the same work")
    flops = results.get("flops") or {}
    if flops.get("counted_by_torch_flop_counter") not in (None, flops.get("fvp_gemm_flops")):
        out.append(f"the analytic FVP FLOP count {flops['fvp_gemm_flops']} differs from torch.utils.flop_counter's "
                   f"{flops['counted_by_torch_flop_counter']}")
    return out


# --- the table -------------------------------------------------------------------------------------------------------

def _ms(stats: Optional[dict]) -> str:
    return "" if stats is None else f"{stats['median_ms']:.4g} ({stats['iqr_ms']:.2g})"


def _x(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}x"


def _e(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1e}"


def format_table(results: dict) -> str:
    from mamlext.bench.report import aligned

    s = results["settings"]
    cols = ["impl", "grad err", "FVP err", "FVP ms (IQR)", "fused vs", "upd ms (IQR)", "fused vs", "step",
            "status"]
    table = []
    for r in results["rows"]:
        status = "ok" + noisy_note(r.get("foreign_cpu_load")) if r["status"] == "ok" else \
            f"{r['status'].upper()}: {r['reason']}"
        step = "" if r["step_fraction"] is None else f"{r['step_fraction']:.3g}"
        table.append([r["impl"], _e(r["grad_rel_error"]), _e(r["fvp_rel_error"]), _ms(r["fvp"]),
                      _x(r["fvp_speedup_of_fused"]), _ms(r["meta_update"]), _x(r["meta_update_speedup_of_fused"]),
                      step, status])
    title = [f"{results['title']}: MAML-TRPO, Navigation2D, T = {s['tasks']}, K = {s['samples_per_task']} "
             f"samples/task, widths {s['widths']}, {s['activation']}, {'first' if s['first_order'] else 'second'} "
             f"order, CG {s['cg_iters']}, line search {s['ls_steps']} x {s['ls_backtrack']}; "
             f"ms = median (IQR) in {s['dtype']}; err = float64 normwise rel. error vs {REFERENCE} "
             f"(T = {results['check']['tasks']}, K = {results['check']['samples_per_task']}); "
             "fused vs = this row's median / fused's; step = accepted line-search fraction"]
    lines = aligned(cols, table, title)
    smp, gemm, flops = results["sampling"], results["gemm"], results["flops"]
    lines.append("")
    lines.append(f"sampling one meta-batch (support + adaptation + query): {_ms(smp)} ms"
                 + noisy_note(smp.get("foreign_cpu_load")))
    lines.append(f"GEMM rate: {gemm['what']}: {_ms(gemm)} ms = {gemm['gflops']:.1f} GFLOP/s")
    fused = next((r for r in results["rows"] if r["impl"] == "fused"), None)
    rate = "" if fused is None or fused["fvp_gflops"] is None else (
        f" -> fused FVP {fused['fvp_gflops']:.1f} GFLOP/s = {100 * fused['fvp_fraction_of_gemm']:.1f}% of the GEMM "
        "rate")
    lines.append(f"fused FVP GEMM FLOPs: {flops['fvp_gemm_flops']:.4g} (flop counter: "
                 f"{flops['counted_by_torch_flop_counter']}){rate}")
    if results["notes"]:
        lines.append("")
        lines += [f"note: {n}" for n in results["notes"]]
    return "\n".join(lines)


# --- the command line ------------------------------------------------------------------------------------------------

def main(parser, args) -> int:
    """`python -m mamlext bench --suite rl` (mamlext.bench.suite.main routes here)."""
    from mamlext.bench.common import default_device, pick_device
    from mamlext.train import SEED_RANGE, check_int, set_threads, writable_dir

    for flag, value in (("--workloads", args.workloads), ("--distributed", args.distributed),
                        ("--time-budget", args.time_budget)):
        if value is not None:
            parser.error(f"--suite rl takes no {flag} (it measures MAML-TRPO only, in a few minutes)")
    set_threads(args.threads)
    check_int(args.seed, "--seed", SEED_RANGE[0], SEED_RANGE[1] - 2)  # the data take seed + 1, the GEMM seed + 2
    device = pick_device(parser, args.device or default_device())
    out_dir = args.out or os.path.join("bench-results", f"{SUITE}-{device.type}")
    writable_dir(out_dir, "--out")
    command = "python -m mamlext " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(
        "__main__.py") else None
    results = run(device, out_dir, seed=args.seed, progress=not args.no_progress, command=command)
    return 1 if any(r["status"] == "failed" and r["impl"] == "fused" for r in results["rows"]) else 0
