"""mamlext.rl (MAML-TRPO): PolicyPasses and MetaProducts against plain autograd oracles written here (float64, the
meta-Fisher by third-order autograd through the adaptation), surrogate/KL at the start, conjugate gradient, a TRPO
step on Navigation2D, returns/GAE/baseline/normalisation against per-episode loops, the environment, the sampler
and the bad arguments."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Normal, kl_divergence
from torch.nn import functional as F

from conftest import DEVICES
from mamlext.rl.advantages import advantages, discounted_returns, gae, linear_baseline, normalize
from mamlext.rl.envs import Navigation2D
from mamlext.rl.passes import FusedPolicyPasses, PolicyPasses, fused_products_available, policy_gradient
from mamlext.rl.policy import CategoricalMLPPolicy, GaussianMLPPolicy, PolicySpec
from mamlext.rl.sampling import Episodes, check_policy_fits, sample_episodes
from mamlext.rl.trpo import MAMLTRPO, TaskData, conjugate_gradient

F64 = torch.float64
DISTS = ["gaussian", "categorical"]
ACTS = ["relu", "tanh"]
# The passes behind MAML-TRPO's products: PolicyPasses (batched GEMMs) and FusedPolicyPasses (the fused MLP kernels,
# which need the compiled extension).
needs_fused = pytest.mark.skipif(not fused_products_available(torch.zeros(1, dtype=F64)),
                                 reason="the compiled extension is not built")
PASSES = {"bmm": PolicyPasses, "fused": FusedPolicyPasses}
IMPLS = ["bmm", pytest.param("fused", marks=needs_fused)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_rel(actual, expected, rtol, what):
    """Normwise relative error per tensor: max|a - e| <= rtol * max|e| (scale floored at 1e-12)."""
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}[{i}]: {list(a.shape)} != {list(e.shape)}"
        err = (a.double() - e.double()).abs().max().item()
        scale = max(e.double().abs().max().item(), 1e-12)
        assert err <= rtol * scale, f"{what}[{i}]: max error {err:.3e} > {rtol:.0e} * {scale:.3e}"


# ----------------------------------------------------------------------------------------------------------------
# The oracle: a plain functional MLP policy with torch.distributions


def oracle_dist(spec, params, x):
    h = x
    for l in range(spec.layers):
        h = F.linear(h, params[2 * l], params[2 * l + 1])
        if l < spec.layers - 1:
            h = torch.relu(h) if spec.activation == "relu" else torch.tanh(h)
    if spec.distribution == "gaussian":
        return Normal(h, params[-1].exp())
    return Categorical(logits=h)


def detached(spec, dist):
    if spec.distribution == "gaussian":
        return Normal(dist.loc.detach(), dist.scale.detach())
    return Categorical(logits=dist.logits.detach())


def oracle_log_prob(spec, dist, a):
    lp = dist.log_prob(a)
    return lp.sum(-1) if spec.distribution == "gaussian" else lp


def oracle_kl(spec, old, new):
    kl = kl_divergence(old, new)
    return kl.sum(-1) if spec.distribution == "gaussian" else kl


def make_spec(dist, act):
    return PolicySpec((3, 5, 4, 2 if dist == "gaussian" else 4), act, dist)


def random_params(spec, g, tasks=None, scale=0.6):
    lead = () if tasks is None else (tasks,)
    return [scale * torch.randn(*lead, *s, generator=g, dtype=F64) for s in spec.shapes()]


def random_actions(spec, g, T, K):
    if spec.distribution == "gaussian":
        return torch.randn(T, K, spec.action_dim, generator=g, dtype=F64)
    return torch.randint(0, spec.action_dim, (T, K), generator=g)


def at_task(params, t, per_task):
    return [p[t] if per_task else p for p in params]


def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def passes_case(dist, act, per_task, g, T=3, K=7):
    """(spec, params shared or per task, observations, actions, weights with padding rows) in float64."""
    spec = make_spec(dist, act)
    params = random_params(spec, g, T if per_task else None)
    x = torch.randn(T, K, 3, generator=g, dtype=F64)
    a = random_actions(spec, g, T, K)
    w = torch.randn(T, K, generator=g, dtype=F64)
    w[0, -2:] = 0.0                          # padding rows
    return spec, params, x, a, w


# ----------------------------------------------------------------------------------------------------------------
# 1. PolicyPasses


def test_policy_param_list_matches_spec_and_forward():
    for policy, dist in ((GaussianMLPPolicy(3, 2, (5, 4), "tanh", init_std=0.5), "gaussian"),
                         (CategoricalMLPPolicy(3, 4, (5, 4), "relu"), "categorical")):
        policy = policy.double()
        spec = policy.spec
        assert spec.distribution == dist and spec.widths == (3, 5, 4, policy.spec.action_dim)
        params = policy.param_list()
        assert [tuple(p.shape) for p in params] == spec.shapes()
        assert params[0] is policy.layers[0].weight and params[1] is policy.layers[0].bias
        if dist == "gaussian":
            assert params[-1] is policy.log_std
            assert torch.allclose(policy.log_std, torch.full((2,), math.log(0.5), dtype=F64))
        x = torch.randn(6, 3, generator=gen(1), dtype=F64)
        ours, theirs = policy(x), oracle_dist(spec, [p.detach() for p in params], x)
        if dist == "gaussian":
            assert torch.allclose(ours.loc, theirs.loc, rtol=1e-12) and torch.allclose(ours.scale, theirs.scale)
        else:
            assert torch.allclose(ours.logits, theirs.logits, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduce", [False, True], ids=["per_task", "reduce"])
@pytest.mark.parametrize("params_mode", ["shared", "per_task"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dist", DISTS)
def test_policy_passes_against_autograd(dist, act, params_mode, reduce, impl):
    T, K = 3, 7
    g = gen(10)
    per_task = params_mode == "per_task"
    spec, params, x, a, w = passes_case(dist, act, per_task, g, T, K)
    w[2, 0] = 0.0
    c = torch.rand(T, K, generator=g, dtype=F64)
    c[0, -2:] = 0.0
    vec = {"shared": random_params(spec, g), "per_task": random_params(spec, g, T)}

    passes = PASSES[impl](spec, params, x)
    losses, grads = passes.loss_grad(a, w, reduce=reduce)

    exp_loss, exp_grad = [], []
    exp_hvp = {m: [] for m in vec}
    exp_gn = {m: [] for m in vec}
    for t in range(T):
        leaves = [p.clone().requires_grad_() for p in at_task(params, t, per_task)]
        dist_t = oracle_dist(spec, leaves, x[t])
        nll = -(w[t] * oracle_log_prob(spec, dist_t, a[t])).sum()
        gr = torch.autograd.grad(nll, leaves, create_graph=True)
        kl = (c[t] * oracle_kl(spec, detached(spec, dist_t), dist_t)).sum()
        gk = torch.autograd.grad(kl, leaves, create_graph=True)
        assert max(gi.abs().max().item() for gi in gk) < 1e-12      # the KL is stationary at new == old
        for m, v in vec.items():
            v_t = at_task(v, t, m == "per_task")
            exp_hvp[m].append(torch.autograd.grad(dot(gr, v_t), leaves, retain_graph=True))
            exp_gn[m].append(torch.autograd.grad(dot(gk, v_t), leaves, retain_graph=True))
        exp_loss.append(nll.detach())
        exp_grad.append([gi.detach() for gi in gr])

    def stack(per_t):
        out = [torch.stack([row[i] for row in per_t]) for i in range(len(per_t[0]))]
        return [o.sum(0) for o in out] if reduce else out

    assert_rel([losses], [torch.stack(exp_loss)], 1e-10, "loss")
    assert_rel(grads, stack(exp_grad), 1e-10, "grad")
    for m, v in vec.items():
        assert_rel(passes.hvp(v, reduce=reduce), stack(exp_hvp[m]), 1e-10, f"hvp[{m} vectors]")
        assert_rel(passes.gauss_newton(v, c, reduce=reduce), stack(exp_gn[m]), 1e-10, f"gauss_newton[{m} vectors]")

    # log_prob and kl_from (against another policy's outputs)
    lp = torch.stack([oracle_log_prob(spec, oracle_dist(spec, at_task(params, t, per_task), x[t]), a[t])
                      for t in range(T)])
    assert_rel([passes.log_prob(a)], [lp], 1e-10, "log_prob")
    other = [p + 0.3 * torch.randn(p.shape, generator=g, dtype=F64) for p in params]
    old = PolicyPasses(spec, other, x).outputs()
    kl = torch.stack([oracle_kl(spec, oracle_dist(spec, at_task(other, t, per_task), x[t]),
                                oracle_dist(spec, at_task(params, t, per_task), x[t])) for t in range(T)])
    assert kl.min() > 0
    assert_rel([passes.kl_from(old)], [kl], 1e-10, "kl_from")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params_mode", ["shared", "per_task"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dist", DISTS)
def test_policy_gradient_on_the_fused_op(dist, act, params_mode, device):
    """policy_gradient (the fused MLP op, loss "gaussian" or "ce") is loss_grad's gradient and the autograd oracle's,
    padding rows included; it refuses what check_samples refuses."""
    T = 3
    per_task = params_mode == "per_task"
    spec, params, x, a, w = passes_case(dist, act, per_task, gen(11), T)
    fused = policy_gradient(spec, [p.to(device) for p in params], x.to(device), a.to(device), w.to(device))
    assert_rel([f.cpu() for f in fused], PolicyPasses(spec, params, x).loss_grad(a, w)[1], 1e-12, "loss_grad")
    for t in range(T):
        theta = [p.clone().requires_grad_() for p in at_task(params, t, per_task)]
        loss = -(w[t] * oracle_log_prob(spec, oracle_dist(spec, theta, x[t]), a[t])).sum()
        assert_rel([f[t].cpu() for f in fused], torch.autograd.grad(loss, theta), 1e-12, f"oracle task {t}")
    with pytest.raises(ValueError, match="weights"):
        policy_gradient(spec, params, x, a, w[:, 1:])
    with pytest.raises(ValueError, match="actions"):
        policy_gradient(spec, params, x, a[:, 1:], w)


@needs_fused
@pytest.mark.parametrize("dist", DISTS)
def test_fused_fisher_product_without_loss_grad(dist):
    """The Fisher reads the forward passes only: FusedPolicyPasses.gauss_newton before any loss_grad is
    PolicyPasses'; a float16 batch is refused by name."""
    T, K = 2, 6
    g = gen(12)
    spec = make_spec(dist, "tanh")
    params = random_params(spec, g, T)
    x = torch.randn(T, K, 3, generator=g, dtype=F64)
    c = torch.rand(T, K, generator=g, dtype=F64)
    v = random_params(spec, g)
    expected = PolicyPasses(spec, params, x).gauss_newton(v, c)
    assert_rel(FusedPolicyPasses(spec, params, x).gauss_newton(v, c), expected, 1e-12, "gauss_newton")
    with pytest.raises(ValueError, match="FusedPolicyPasses"):
        FusedPolicyPasses(spec, [p.half() for p in params], x.half())


@pytest.mark.parametrize("impl", IMPLS)
def test_hvp_before_loss_grad_refused(impl):
    """The Hessian is loss_grad's loss: before it, also after a Fisher product (which needs no loss), hvp refuses."""
    spec = make_spec("gaussian", "relu")
    passes = PASSES[impl](spec, random_params(spec, gen(0)), torch.zeros(2, 3, 3, dtype=F64))
    with pytest.raises(RuntimeError, match="loss_grad"):
        passes.hvp(random_params(spec, gen(1)))
    passes.gauss_newton(random_params(spec, gen(2)), torch.ones(2, 3, dtype=F64))
    with pytest.raises(RuntimeError, match="loss_grad"):
        passes.hvp(random_params(spec, gen(1)))


# ----------------------------------------------------------------------------------------------------------------
# 2./3. MetaProducts against a per-task autograd loop


def make_policy(dist, act, seed):
    policy = (GaussianMLPPolicy(3, 2, (5, 4), act) if dist == "gaussian" else CategoricalMLPPolicy(3, 4, (5, 4), act))
    policy = policy.double()
    g = gen(seed)
    with torch.no_grad():
        for p in policy.param_list():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=F64))
    return policy


def make_taskdata(spec, g, T=3, K=10):
    obs = torch.randn(T, K, 3, generator=g, dtype=F64)
    actions = random_actions(spec, g, T, K)
    mask = torch.ones(T, K, dtype=F64)
    mask[0, 7:] = 0.0
    mask[1, 4:6] = 0.0
    mask[2, 9] = 0.0
    average = mask / mask.sum(1, keepdim=True)
    weights = torch.randn(T, K, generator=g, dtype=F64) * average
    return TaskData(obs, actions, weights, average)


def build_algo(dist, act, first_order, lr_mode, seed=0, damping=1e-3, products="auto"):
    policy = make_policy(dist, act, seed)
    algo = MAMLTRPO(policy, inner_lr=0.3, first_order=first_order, lr_mode=lr_mode, cg_damping=damping,
                    products=products)
    if lr_mode == "per_param":
        g = gen(seed + 100)
        with torch.no_grad():
            for lr in algo.lrs:
                lr.copy_(0.1 + 0.4 * torch.rand(lr.shape, generator=g, dtype=F64))
    g = gen(seed + 200)
    support, query = make_taskdata(policy.spec, g), make_taskdata(policy.spec, g)
    return algo, support, query


class Oracle:
    """theta'_t = theta - alpha * grad L^S_t(theta) per task with autograd (create_graph unless first order)."""

    def __init__(self, algo, support, query):
        self.spec, self.S, self.Q = algo.spec, support, query
        self.first_order = algo.first_order
        self.theta = [p.detach().clone().requires_grad_() for p in algo.policy.param_list()]
        if algo.lr_mode == "per_param":
            self.rates = [lr.detach().clone().requires_grad_() for lr in algo.lrs]
            self.leaves = self.theta + self.rates
        else:
            self.rates = [algo.inner_lr] * len(self.theta)
            self.leaves = list(self.theta)
        self.T = support.observations.shape[0]
        adapted0 = self.adapted(self.theta, self.rates, graph=False)
        self.old = [detached(self.spec, oracle_dist(self.spec, ad, query.observations[t]))
                    for t, ad in enumerate(adapted0)]
        self.old_lp = [oracle_log_prob(self.spec, d, query.actions[t]) for t, d in enumerate(self.old)]

    def adapted(self, theta, rates, graph):
        out = []
        for t in range(self.T):
            d = oracle_dist(self.spec, theta, self.S.observations[t])
            nll = -(self.S.weights[t] * oracle_log_prob(self.spec, d, self.S.actions[t])).sum()
            g = torch.autograd.grad(nll, theta, create_graph=graph and not self.first_order)
            if not graph or self.first_order:
                g = [gi.detach() for gi in g]
            out.append([p - r * gi for p, r, gi in zip(theta, rates, g)])
        return out

    def surrogate_kl(self, theta, rates, graph):
        surr, kl = 0.0, 0.0
        for t, ad in enumerate(self.adapted(theta, rates, graph)):
            d = oracle_dist(self.spec, ad, self.Q.observations[t])
            ratio = torch.exp(oracle_log_prob(self.spec, d, self.Q.actions[t]) - self.old_lp[t])
            surr = surr - (self.Q.weights[t] * ratio).sum()
            kl = kl + (self.Q.average[t] * oracle_kl(self.spec, self.old[t], d)).sum()
        return surr / self.T, kl / self.T


def flat(parts):
    return torch.cat([p.reshape(-1) for p in parts])


CONFIGS = [(False, "fixed"), (True, "fixed"), (False, "per_param"), (True, "per_param")]
CONFIG_IDS = ["second_order", "first_order", "per_param", "first_order-per_param"]


@pytest.mark.parametrize("products", IMPLS)
@pytest.mark.parametrize("first_order,lr_mode", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dist", DISTS)
def test_meta_products_against_autograd(dist, act, first_order, lr_mode, products):
    algo, support, query = build_algo(dist, act, first_order, lr_mode, products=products)
    m = algo.products(support, query)
    assert type(m.at_theta) is PASSES[products] and type(m.at_adapted) is PASSES[products]
    o = Oracle(algo, support, query)
    surr, kl = o.surrogate_kl(o.theta, o.rates, graph=True)

    # (a) the meta-gradient
    grad = torch.autograd.grad(surr, o.leaves, retain_graph=True)
    assert m.gradient.shape == (sum(p.numel() for p in o.leaves),)
    assert_rel([m.gradient], [flat(grad)], 1e-9, "meta-gradient")
    assert flat(grad).abs().max() > 1e-3

    # (b) the Fisher: third-order autograd through the adaptation
    gk = torch.autograd.grad(kl, o.leaves, create_graph=True)
    assert flat(gk).abs().max() < 1e-12
    for seed in (1, 2):
        v = torch.randn(m.gradient.shape, generator=gen(seed), dtype=F64)
        v_parts = list(torch.split(v, [p.numel() for p in o.leaves]))
        v_parts = [vp.view(p.shape) for vp, p in zip(v_parts, o.leaves)]
        hv = torch.autograd.grad(dot(gk, v_parts), o.leaves, retain_graph=True)
        expected = flat(hv)
        got = m.fisher_product(v) - algo.cg_damping * v
        assert expected.abs().max() > 1e-4
        assert_rel([got], [expected], 1e-9, f"fisher_product (v seed {seed})")
    # and the split order: policy params, then rates
    parts = m.split(m.start)
    assert [p.shape for p in parts] == [p.shape for p in o.leaves]
    assert all(torch.equal(a, b.detach()) for a, b in zip(parts, o.leaves))


@pytest.mark.parametrize("lr_mode", ["fixed", "per_param"])
@pytest.mark.parametrize("dist", DISTS)
def test_surrogate_and_kl(dist, lr_mode):
    algo, support, query = build_algo(dist, "tanh", False, lr_mode, seed=3)
    m = algo.products(support, query)
    value = m.surrogate_and_kl(m.start)
    assert value.dtype == F64 and value.shape == (2,)
    expected_loss = -query.weights.sum(1).mean().item()
    assert abs(value[0].item() - expected_loss) <= 1e-12 * max(1.0, abs(expected_loss))
    assert abs(value[1].item()) <= 1e-13
    # a moved candidate: re-adapted (first order, no graph) against the oracle
    o = Oracle(algo, support, query)
    candidate = m.start + 0.05 * torch.randn(m.start.shape, generator=gen(4), dtype=F64)
    pieces = [c.view(p.shape) for c, p in zip(torch.split(candidate, [p.numel() for p in o.leaves]), o.leaves)]
    n = len(o.theta)
    theta = [p.clone().requires_grad_() for p in pieces[:n]]
    rates = pieces[n:] if lr_mode == "per_param" else o.rates
    surr, kl = o.surrogate_kl(theta, rates, graph=False)
    got = m.surrogate_and_kl(candidate)
    assert kl.item() > 1e-6
    assert_rel([got], [torch.stack([surr.detach(), kl.detach()])], 1e-10, "surrogate_and_kl(candidate)")


# ----------------------------------------------------------------------------------------------------------------
# 4. conjugate gradient


@pytest.mark.parametrize("n", [1, 6, 12])
def test_conjugate_gradient_solves_spd(n):
    g = gen(n)
    M = torch.randn(n, n, generator=g, dtype=F64)
    A = M @ M.t() + 0.5 * torch.eye(n, dtype=F64)
    b = torch.randn(n, generator=g, dtype=F64)
    calls = []

    def product(p):
        calls.append(1)
        return A @ p

    x = conjugate_gradient(product, b, iterations=n, tolerance=1e-30)
    exact = torch.linalg.solve(A, b)
    assert (x - exact).norm() <= 1e-8 * exact.norm()
    assert len(calls) == n
    # fewer iterations than n leave a visible error (n > 2), zero b gives zero without a product
    if n > 2:
        x_short = conjugate_gradient(lambda p: A @ p, b, iterations=1)
        assert (x_short - exact).norm() > 1e-6 * exact.norm()
    calls.clear()
    assert torch.equal(conjugate_gradient(product, torch.zeros(n, dtype=F64), iterations=n), torch.zeros(n, dtype=F64))
    assert not calls


# ----------------------------------------------------------------------------------------------------------------
# 5. a TRPO step on Navigation2D


def nav_meta_batch(algo, seed, tasks=4, episodes=4, horizon=20):
    env = Navigation2D(horizon=horizon, dtype=F64)
    g = gen(seed)
    goals = env.sample_tasks(tasks, g)
    before = sample_episodes(env, goals, algo.spec, algo.policy_params(), episodes, g)
    support = TaskData.from_episodes(before, advantages(before))
    after = sample_episodes(env, goals, algo.spec, algo.adapt(support), episodes, g)
    query = TaskData.from_episodes(after, advantages(after))
    return support, query


@pytest.mark.parametrize("lr_mode", ["fixed", "per_param"])
def test_trpo_step_on_navigation(lr_mode):
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, (16, 16)).double()
    algo = MAMLTRPO(policy, inner_lr=0.1, lr_mode=lr_mode, max_kl=0.01)
    support, query = nav_meta_batch(algo, seed=5)
    assert torch.allclose(support.average.sum(1), torch.ones(4, dtype=F64))
    o = Oracle(algo, support, query)
    start = [p.detach().clone() for p in algo.meta_parameters()]
    info = algo.step(support, query)
    new = [p.detach().clone() for p in algo.meta_parameters()]
    assert info["loss_before"] == pytest.approx(-query.weights.sum(1).mean().item(), abs=1e-12)
    changed = any(not torch.equal(a, b) for a, b in zip(start, new))
    if info["step_fraction"] == 0:
        assert not changed and info["kl"] == 0 and info["loss_after"] == info["loss_before"]
    else:
        assert changed
        assert 0 < info["kl"] < algo.max_kl
        assert info["loss_after"] < info["loss_before"]
        assert any(abs(info["step_fraction"] - 0.8 ** k) < 1e-12 for k in range(algo.ls_steps))
        # the oracle's surrogate and KL at the new parameters agree with what step reports
        n = len(o.theta)
        theta = [p.clone().requires_grad_() for p in new[:n]]
        rates = new[n:] if lr_mode == "per_param" else o.rates
        surr, kl = o.surrogate_kl(theta, rates, graph=False)
        assert surr.item() == pytest.approx(info["loss_after"], rel=1e-9, abs=1e-12)
        assert kl.item() == pytest.approx(info["kl"], rel=1e-9, abs=1e-14)
        assert kl.item() < algo.max_kl and surr.item() < info["loss_before"]
    assert info["step_fraction"] > 0, "expected an accepted step on this seed"


@needs_fused
def test_search_reuses_its_passes_buffers_without_stale_values():
    """MAMLTRPO.search keeps the fused passes in buffers reused by every meta-update: a second search (other data,
    other parameters) gives bit for bit what a fresh MAMLTRPO gives, and what the batched GEMMs give to rounding
    (amplified by conjugate gradient on the damped Fisher: 2e-8 relative here in float64)."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, (16, 16)).double()
    algo = MAMLTRPO(policy, inner_lr=0.1)
    algo.step(*nav_meta_batch(algo, seed=5))
    buffers = dict(algo._passes_buffers)
    assert set(buffers) == {"support", "query"}
    support, query = nav_meta_batch(algo, seed=6)
    values, info = algo.search(support, query)
    assert all(algo._passes_buffers[k] is b for k, b in buffers.items())  # the same buffers, reused
    fresh = MAMLTRPO(copy.deepcopy(policy), inner_lr=0.1)
    fresh_values, fresh_info = fresh.search(support, query)
    assert info == fresh_info and all(torch.equal(a, b) for a, b in zip(values, fresh_values))
    bmm_values, _ = MAMLTRPO(copy.deepcopy(policy), inner_lr=0.1, products="bmm").search(support, query)
    assert_rel(values, bmm_values, 1e-6, "fused vs bmm step")


def test_trpo_step_without_signal_keeps_parameters():
    torch.manual_seed(1)
    algo = MAMLTRPO(GaussianMLPPolicy(2, 2, (8,)).double(), inner_lr=0.1)
    support, query = nav_meta_batch(algo, seed=6, tasks=2, episodes=2, horizon=5)
    query = query._replace(weights=torch.zeros_like(query.weights))
    start = [p.detach().clone() for p in algo.meta_parameters()]
    info = algo.step(support, query)
    assert info["step_fraction"] == 0.0 and info["loss_after"] == info["loss_before"] == 0.0
    assert all(torch.equal(a, b.detach()) for a, b in zip(start, algo.meta_parameters()))


# ----------------------------------------------------------------------------------------------------------------
# 6. advantages


def episodes_with_lengths(T=2, B=3, H=7, seed=0):
    g = gen(seed)
    lengths = torch.randint(1, H + 1, (T, B), generator=g)
    lengths[0, 0], lengths[1, 2] = H, 2
    mask = (torch.arange(H).view(1, 1, H) < lengths.unsqueeze(-1)).to(F64)
    rewards = torch.randn(T, B, H, generator=g, dtype=F64) * mask
    obs = 4 * torch.randn(T, B, H, 2, generator=g, dtype=F64)
    obs[0, 1, 0, 0] = 25.0            # clipped to 10 in the features
    obs = obs * mask.unsqueeze(-1)
    actions = torch.randn(T, B, H, 2, generator=g, dtype=F64) * mask.unsqueeze(-1)
    return Episodes(obs, actions, rewards, mask), lengths


def test_discounted_returns_and_gae_against_loops():
    ep, lengths = episodes_with_lengths()
    T, B, H = ep.rewards.shape
    gamma, lam = 0.9, 0.8
    values = torch.randn(T, B, H, generator=gen(7), dtype=F64)    # garbage on padding: must be ignored
    R = discounted_returns(ep.rewards, ep.mask, gamma)
    A = gae(ep.rewards, values, ep.mask, gamma, lam)
    A1 = gae(ep.rewards, values, ep.mask, gamma, 1.0)
    for t in range(T):
        for b in range(B):
            n = int(lengths[t, b])
            r, v = ep.rewards[t, b].tolist(), values[t, b].tolist()
            for k in range(H):
                if k >= n:
                    assert R[t, b, k] == 0 and A[t, b, k] == 0 and A1[t, b, k] == 0
                    continue
                ret = sum(gamma ** l * r[k + l] for l in range(n - k))
                adv = 0.0
                for l in range(n - k):
                    nxt = v[k + l + 1] if k + l + 1 < n else 0.0
                    adv += (gamma * lam) ** l * (r[k + l] + gamma * nxt - v[k + l])
                assert R[t, b, k].item() == pytest.approx(ret, rel=1e-12, abs=1e-12)
                assert A[t, b, k].item() == pytest.approx(adv, rel=1e-12, abs=1e-12)
                assert A1[t, b, k].item() == pytest.approx(ret - v[k], rel=1e-12, abs=1e-12)


def test_normalize_per_task():
    ep, _ = episodes_with_lengths(seed=2)
    adv = 3 + 5 * torch.randn(ep.mask.shape, generator=gen(8), dtype=F64)   # nonzero on padding too
    out = normalize(adv, ep.mask)
    assert torch.all(out[ep.mask == 0] == 0)
    for t in range(ep.mask.shape[0]):
        valid = out[t][ep.mask[t] == 1]
        assert abs(valid.mean().item()) < 1e-12
        assert valid.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
        raw = adv[t][ep.mask[t] == 1].numpy()
        assert np.allclose(valid.numpy(), (raw - raw.mean()) / (raw.std() + 1e-8), rtol=1e-12, atol=1e-12)


def test_linear_baseline_against_least_squares():
    ep, lengths = episodes_with_lengths(T=2, B=4, H=9, seed=3)
    returns = discounted_returns(ep.rewards, ep.mask, 0.99)
    reg = 1e-5
    values = linear_baseline(ep, returns, reg=reg)
    assert torch.all(values[ep.mask == 0] == 0)
    T, B, H = ep.mask.shape
    for t in range(T):
        rows, targets, where = [], [], []
        for b in range(B):
            for k in range(int(lengths[t, b])):
                o = np.clip(ep.observations[t, b, k].numpy(), -10, 10)
                s = k / 100.0
                rows.append(np.concatenate([o, o * o, [s, s ** 2, s ** 3, 1.0]]))
                targets.append(returns[t, b, k].item())
                where.append((b, k))
        Fm, Rv = np.array(rows), np.array(targets)
        coef = np.linalg.solve(Fm.T @ Fm + reg * np.eye(Fm.shape[1]), Fm.T @ Rv)
        fitted = Fm @ coef
        got = np.array([values[t, b, k].item() for b, k in where])
        assert np.allclose(got, fitted, rtol=1e-8, atol=1e-9)
        assert np.abs(fitted).max() > 1e-3
    full = advantages(ep, gamma=0.99, lam=1.0, normalize_advantages=False)
    assert torch.allclose(full, (returns - values) * ep.mask, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# 7. Navigation2D


def test_navigation_dynamics():
    env = Navigation2D(horizon=10, dtype=F64)
    goals = torch.tensor([[0.3, -0.2], [0.05, 0.0]], dtype=F64)
    obs = env.reset(goals, 3)
    assert obs.shape == (2, 3, 2) and torch.all(obs == 0)
    actions = torch.tensor([[[3.0, -7.0], [0.2, 0.4], [-1.5, 0.5]],
                            [[0.5, 0.0], [0.5, 0.095], [0.5, 0.15]]], dtype=F64)
    pos, reward, done = env.step(actions)
    expected = 0.1 * actions.clamp(-1, 1)
    assert torch.allclose(pos, expected, rtol=0, atol=1e-15)
    assert torch.allclose(reward, -(expected - goals.unsqueeze(1)).norm(dim=-1), rtol=0, atol=1e-15)
    assert done.tolist() == [[False, False, False], [True, True, False]]
    # done episodes stay done and frozen; the others move on
    pos2, reward2, done2 = env.step(torch.full((2, 3, 2), 0.7, dtype=F64))
    assert torch.equal(pos2[1, :2], pos[1, :2])
    assert torch.allclose(pos2[0], pos[0] + 0.07) and torch.allclose(pos2[1, 2], pos[1, 2] + 0.07)
    assert done2[1, :2].all() and not done2[0].any() and not done2[1, 2]
    assert torch.allclose(reward2, -(pos2 - goals.unsqueeze(1)).norm(dim=-1), atol=1e-15)
    # bad action shapes
    for bad in (torch.zeros(2, 3), torch.zeros(2, 3, 3), torch.zeros(3, 3, 2)):
        with pytest.raises(ValueError, match="actions must have shape"):
            env.step(bad)
    with pytest.raises(RuntimeError, match="reset"):
        Navigation2D().step(torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="horizon"):
        Navigation2D(horizon=0)


def test_navigation_goals():
    env = Navigation2D()
    goals = env.sample_tasks(2000, gen(3))
    assert goals.shape == (2000, 2) and goals.dtype == torch.float32
    assert goals.min() >= -0.5 and goals.max() <= 0.5
    assert goals.min() < -0.49 and goals.max() > 0.49
    assert torch.equal(goals, env.sample_tasks(2000, gen(3)))
    assert not torch.equal(goals, env.sample_tasks(2000, gen(4)))
    narrow = Navigation2D(goal_low=0.2, goal_high=0.3).sample_tasks(100, gen(3))
    assert narrow.min() >= 0.2 and narrow.max() <= 0.3


# ----------------------------------------------------------------------------------------------------------------
# 8. sampling


def constant_gaussian(biases, log_std=math.log(1e-6)):
    """A (2, 4, 2) policy whose mean action is the last bias (per task when ``biases`` is [T, 2])."""
    spec = PolicySpec((2, 4, 2), "relu", "gaussian")
    biases = torch.as_tensor(biases, dtype=F64)
    lead = biases.shape[:-1]
    params = [torch.zeros(*lead, 4, 2, dtype=F64), torch.zeros(*lead, 4, dtype=F64),
              torch.zeros(*lead, 2, 4, dtype=F64), biases, torch.full((*lead, 2), log_std, dtype=F64)]
    return spec, params


def test_sample_episodes_termination_and_padding():
    env = Navigation2D(horizon=6, dtype=F64)
    goals = torch.tensor([[0.05, 0.0], [0.1, 0.0], [0.4, 0.4]], dtype=F64)
    spec, params = constant_gaussian([0.5, 0.0])
    ep = sample_episodes(env, goals, spec, params, 2, gen(0))
    assert ep.observations.shape == (3, 2, 6, 2) and ep.actions.shape == (3, 2, 6, 2)
    assert ep.rewards.shape == ep.mask.shape == (3, 2, 6)
    assert ep.mask[0].tolist() == [[1, 0, 0, 0, 0, 0]] * 2
    assert ep.mask[1].tolist() == [[1, 1, 0, 0, 0, 0]] * 2
    assert torch.all(ep.mask[2] == 1)
    assert torch.all(ep.rewards[ep.mask == 0] == 0)
    assert torch.all(ep.rewards[ep.mask == 1] < 0)
    assert torch.allclose(ep.observations[2, :, 3], torch.tensor([0.15, 0.0], dtype=F64), atol=1e-5)
    assert torch.allclose(ep.rewards[2, 0, 0], -(torch.tensor([0.05, 0.0], dtype=F64) - goals[2]).norm(), atol=1e-5)
    assert ep.returns().shape == (3, 2)
    obs, actions, mask = ep.flat()
    assert obs.shape == (3, 12, 2) and actions.shape == (3, 12, 2) and mask.shape == (3, 12)


def test_sample_episodes_reproducible_and_per_task():
    env = Navigation2D(horizon=15, dtype=F64)
    policy = GaussianMLPPolicy(2, 2, (8,)).double()
    params = [p.detach() for p in policy.param_list()]
    goals = env.sample_tasks(3, gen(1))
    a = sample_episodes(env, goals, policy.spec, params, 4, gen(11))
    b = sample_episodes(env, goals, policy.spec, params, 4, gen(11))
    c = sample_episodes(env, goals, policy.spec, params, 4, gen(12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.actions, c.actions)
    assert torch.all(a.mask[..., 0] == 1) and torch.all(a.mask[..., 1:] <= a.mask[..., :-1])
    assert torch.all(a.rewards[a.mask == 0] == 0)
    # per-task parameters: each task's own policy
    same = torch.tensor([[0.3, 0.3]] * 2, dtype=F64)
    spec, per_task = constant_gaussian([[0.5, 0.0], [-0.5, 0.0]])
    ep = sample_episodes(env, same, spec, per_task, 2, gen(0), deterministic=True)
    assert torch.allclose(ep.actions[0], torch.tensor([0.5, 0.0], dtype=F64).expand(2, 15, 2))
    assert torch.allclose(ep.actions[1], torch.tensor([-0.5, 0.0], dtype=F64).expand(2, 15, 2))
    assert not torch.equal(ep.observations[0], ep.observations[1])
    spec, shared = constant_gaussian([0.5, 0.0])
    ep = sample_episodes(env, same, spec, shared, 2, gen(0), deterministic=True)
    assert torch.equal(ep.observations[0], ep.observations[1]) and torch.equal(ep.actions[0], ep.actions[1])


class StopEnv:
    """A discrete test environment: 3 actions, action 0 ends the episode; reward = action + 1."""
    observation_dim, action_dim, discrete, horizon = 3, 3, True, 6

    def reset(self, tasks, episodes, generator=None):
        self.n = torch.zeros(tasks.shape[0], episodes, 3, dtype=F64)
        self.done = torch.zeros(tasks.shape[0], episodes, dtype=torch.bool)
        return self.n.clone()

    def step(self, actions):
        assert actions.dtype == torch.int64
        self.n = self.n + F.one_hot(actions, 3).to(F64)
        self.done = self.done | (actions == 0)
        return self.n.clone(), actions.to(F64) + 1, self.done.clone()


def test_sample_episodes_categorical():
    env = StopEnv()
    policy = CategoricalMLPPolicy(3, 3, (6,)).double()
    params = [p.detach() for p in policy.param_list()]
    ep = sample_episodes(env, torch.zeros(4, 1), policy.spec, params, 5, gen(2))
    assert ep.actions.shape == (4, 5, 6) and ep.actions.dtype == torch.int64
    assert ep.actions.min() >= 0 and ep.actions.max() <= 2
    assert torch.all(ep.mask[..., 0] == 1)
    stopped = (ep.actions[..., :-1] == 0) | (ep.mask[..., :-1] == 0)
    assert torch.equal(ep.mask[..., 1:] == 0, stopped)
    assert 0 < (ep.mask == 0).sum() and torch.all(ep.rewards[ep.mask == 0] == 0)
    assert torch.equal(ep.rewards[ep.mask == 1], ep.actions[ep.mask == 1].to(F64) + 1)
    # deterministic: the most likely action per task
    spec = policy.spec
    per_task = [torch.zeros(2, *s, dtype=F64) for s in spec.shapes()]
    per_task[-1][0] = torch.tensor([5.0, 0, 0])
    per_task[-1][1] = torch.tensor([0, 0, 5.0])
    ep = sample_episodes(env, torch.zeros(2, 1), spec, per_task, 1, gen(0), deterministic=True)
    assert ep.mask[0, 0].tolist() == [1, 0, 0, 0, 0, 0] and torch.all(ep.mask[1] == 1)
    assert torch.all(ep.actions[1] == 2)


def test_check_policy_fits():
    env = Navigation2D()
    check_policy_fits(PolicySpec((2, 4, 2), "relu", "gaussian"), env)
    with pytest.raises(ValueError, match=r"width 3.*2 wide"):
        check_policy_fits(PolicySpec((3, 4, 2), "relu", "gaussian"), env)
    with pytest.raises(ValueError, match=r"3 wide.*takes 2"):
        check_policy_fits(PolicySpec((2, 4, 3), "relu", "gaussian"), env)
    with pytest.raises(ValueError, match="gaussian policy, got a categorical"):
        check_policy_fits(PolicySpec((2, 4, 2), "relu", "categorical"), env)
    with pytest.raises(ValueError, match="categorical policy, got a gaussian"):
        check_policy_fits(PolicySpec((3, 4, 3), "relu", "gaussian"), StopEnv())
    spec, params = constant_gaussian([0.5, 0.0])
    with pytest.raises(ValueError, match="width 2.*3 wide"):
        sample_episodes(StopEnv(), torch.zeros(1, 1), spec, params, 1, gen(0))


# ----------------------------------------------------------------------------------------------------------------
# 9. bad arguments


@pytest.mark.parametrize("kwargs,match", [
    (dict(inner_lr=0), "inner_lr"), (dict(inner_lr=float("nan")), "inner_lr"), (dict(inner_lr=True), "inner_lr"),
    (dict(max_kl=-1.0), "max_kl"), (dict(lr_mode="bad"), "lr_mode"), (dict(cg_iters=0), "cg_iters"),
    (dict(ls_steps=1.5), "ls_steps"), (dict(ls_backtrack=1.0), "ls_backtrack"), (dict(cg_damping=-1), "cg_damping"),
    (dict(products="gpu"), "products"),
])
def test_mamltrpo_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAMLTRPO(GaussianMLPPolicy(2, 2, (4,)), **kwargs)


def test_bad_policies():
    with pytest.raises(TypeError, match="policy"):
        MAMLTRPO(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="init_std"):
        GaussianMLPPolicy(2, 2, init_std=-1)
    with pytest.raises(ValueError, match="init_std"):
        GaussianMLPPolicy(2, 2, init_std=float("inf"))
    with pytest.raises(ValueError, match="activation"):
        GaussianMLPPolicy(2, 2, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        CategoricalMLPPolicy(2, 3, activation="gelu")
    with pytest.raises(ValueError, match="hidden"):
        CategoricalMLPPolicy(2, 3, hidden=(0,))
    with pytest.raises(ValueError, match="action_dim"):
        GaussianMLPPolicy(2, 0)


def test_meta_products_of_task_shards_sum_to_the_whole():
    """What torchrun ranks compute: each share's gradient and Fisher-vector products, summed over the shares (the
    all_reduce), are the whole meta-batch's."""
    torch.manual_seed(3)
    env = Navigation2D(horizon=10, dtype=torch.float64)
    algo = MAMLTRPO(GaussianMLPPolicy(2, 2, (8, 8)).double(), inner_lr=0.5)
    generator = torch.Generator().manual_seed(0)
    goals = env.sample_tasks(5, generator)
    support = sample_episodes(env, goals, algo.spec, algo.policy_params(), 2, generator)
    support = TaskData.from_episodes(support, advantages(support))
    query = sample_episodes(env, goals, algo.spec, algo.adapt(support), 2, generator)
    query = TaskData.from_episodes(query, advantages(query))
    whole = algo.products(support, query)
    shards = [slice(0, 3), slice(3, 5)]
    parts = [algo.products(TaskData(*(x[s] for x in support)), TaskData(*(x[s] for x in query)),
                           all_reduce=lambda t: t) for s in shards]
    # with the identity as all_reduce a share divides by its own task count: undo that, as the sum over ranks would
    sizes = [3.0, 2.0]
    gradient = sum(n * p.gradient for n, p in zip(sizes, parts)) / 5
    assert torch.allclose(gradient, whole.gradient, rtol=1e-12, atol=1e-15)
    v = torch.randn_like(gradient)
    damping = algo.cg_damping * v
    product = sum(n * (p.fisher_product(v) - damping) for n, p in zip(sizes, parts)) / 5 + damping
    assert torch.allclose(product, whole.fisher_product(v), rtol=1e-12, atol=1e-15)


def _small_meta_batch(distribution="gaussian", tasks=3, samples=6):
    torch.manual_seed(5)
    policy = (GaussianMLPPolicy(2, 2, (4,)) if distribution == "gaussian" else CategoricalMLPPolicy(2, 3, (4,)))
    policy = policy.double()
    algo = MAMLTRPO(policy, inner_lr=0.1)
    obs = torch.randn(tasks, samples, 2, dtype=torch.float64)
    actions = torch.randn(tasks, samples, 2, dtype=torch.float64) if distribution == "gaussian" \
        else torch.randint(0, 3, (tasks, samples))
    average = torch.full((tasks, samples), 1.0 / samples, dtype=torch.float64)
    data = TaskData(obs, actions, torch.randn(tasks, samples, dtype=torch.float64) * average, average)
    return algo, data


@pytest.mark.parametrize("field, value, message", [
    ("observations", lambda d: d.observations[..., :1], r"support.observations: expected a floating-point tensor "
                                                         r"\[tasks, samples, 2\]"),
    ("actions", lambda d: d.actions[..., :1], r"support.actions: the gaussian policy with 2 actions expects"),
    ("weights", lambda d: d.weights[:, :-1], r"support.weights: expected \[3, 6\]"),
    ("weights", lambda d: d.weights.float(), r"support.weights: expected \[3, 6\] torch.float64"),
    ("weights", lambda d: d.weights.clone().fill_(float("nan")), r"support.weights: has non-finite values"),
    ("average", lambda d: -d.average, r"support.average: the averaging weights must be >= 0"),
    ("actions", lambda d: d.actions.clone().fill_(float("inf")), r"support.actions: has non-finite values"),
])
def test_bad_meta_batches_are_refused_naming_the_field(field, value, message):
    algo, data = _small_meta_batch()
    bad = data._replace(**{field: value(data)})
    with pytest.raises(ValueError, match=message):
        algo.adapt(bad)
    with pytest.raises(ValueError, match=message):
        algo.step(bad, data)


def test_bad_categorical_actions_and_mismatched_batches_are_refused():
    algo, data = _small_meta_batch("categorical")
    with pytest.raises(ValueError, match=r"query.actions: class indices must lie in \[0, 3\)"):
        algo.step(data, data._replace(actions=data.actions + 3))
    with pytest.raises(ValueError, match=r"query.actions: the categorical policy with 3 actions expects int64"):
        algo.step(data, data._replace(actions=data.actions.double()))
    with pytest.raises(ValueError, match="support and query must hold the same tasks: 3 and 2"):
        algo.step(data, TaskData(*(x[:2] for x in data)))
    with pytest.raises(TypeError, match="support: expected a mamlext.rl.trpo.TaskData"):
        algo.adapt(tuple(data))


def test_policy_passes_check_params_and_vectors():
    spec = PolicySpec((2, 4, 2), "relu", "gaussian")
    obs = torch.randn(3, 5, 2, dtype=torch.float64)
    params = [torch.randn(s, dtype=torch.float64) for s in spec.shapes()]
    with pytest.raises(ValueError, match="params: the gaussian policy with widths \\[2, 4, 2\\] has 5 parameter"):
        PolicyPasses(spec, params[:-1], obs)
    with pytest.raises(ValueError, match=r"params\[2\]: expected shape \[2, 4\] \(shared by the tasks\) or "
                                         r"\[3, 2, 4\] \(per task\), got \[4, 2\]"):
        PolicyPasses(spec, params[:2] + [params[2].t()] + params[3:], obs)
    with pytest.raises(ValueError, match=r"params\[0\]: expected torch.float64 on cpu"):
        PolicyPasses(spec, [params[0].float()] + params[1:], obs)
    passes = PolicyPasses(spec, params, obs)
    passes.loss_grad(torch.randn(3, 5, 2, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"vectors\[4\]: expected shape \[2\]"):
        passes.hvp(params[:4] + [torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"weights: expected \[3, 5\]"):
        passes.gauss_newton(params, torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_meta_products_and_sampling_on_each_device(device):
    """The products on ``device`` equal the CPU's (float64), and sampling there is reproducible."""
    algo, data = _small_meta_batch()
    v = torch.randn(sum(p.numel() for p in algo.policy_params()), dtype=torch.float64)
    on_cpu = algo.products(data, data)
    expected = (on_cpu.gradient, on_cpu.fisher_product(v))
    algo = algo.to(device)
    moved = TaskData(*(x.to(device) for x in data))
    products = algo.products(moved, moved)
    assert torch.allclose(products.gradient.cpu(), expected[0], rtol=1e-10, atol=1e-14)
    assert torch.allclose(products.fisher_product(v.to(device)).cpu(), expected[1], rtol=1e-10, atol=1e-14)
    env = Navigation2D(horizon=5, dtype=torch.float64, device=device)
    runs = []
    for _ in range(2):
        generator = torch.Generator(device=device).manual_seed(7)
        goals = env.sample_tasks(3, generator)
        runs.append(sample_episodes(env, goals, algo.spec, algo.policy_params(), 2, generator))
    assert runs[0].observations.device.type == torch.device(device).type
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))


def test_conjugate_gradient_returns_the_product_of_its_solution():
    torch.manual_seed(11)
    m = torch.randn(8, 8, dtype=torch.float64)
    a = m @ m.t() + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    for iterations in (3, 8):
        x, ax = conjugate_gradient(lambda v: a @ v, b, iterations, with_product=True)
        assert torch.allclose(ax, a @ x, rtol=1e-10, atol=1e-12)


def test_meta_products_against_central_finite_differences():
    """The meta-gradient and v^T F v against central differences of the meta-objective itself (the mean surrogate
    and KL after re-adapting at perturbed meta-parameters), float64."""
    algo, data = _small_meta_batch()
    m = algo.products(data, data)
    at_start = m.surrogate_and_kl(m.start)  # the KL of equal policies, 0 up to rounding
    assert torch.allclose(m.before, at_start, rtol=1e-12, atol=1e-14)
    v = torch.randn_like(m.start)
    v = v / v.norm()
    eps = 1e-4
    plus, minus = m.surrogate_and_kl(m.start + eps * v), m.surrogate_and_kl(m.start - eps * v)
    directional = (plus[0] - minus[0]) / (2 * eps)
    assert torch.allclose(m.gradient @ v, directional, rtol=1e-6, atol=1e-10)
    # the KL is 0 with zero gradient at the start: its second difference is v^T F v
    curvature = (plus[1] + minus[1] - 2 * at_start[1]) / eps ** 2
    vfv = v @ (m.fisher_product(v) - algo.cg_damping * v)
    assert torch.allclose(vfv, curvature, rtol=1e-5)


def test_sampling_a_share_of_the_tasks_draws_what_all_would():
    """What a torchrun rank samples (task_slice) equals the slice of one process's sampling, and the generator ends
    in the same state."""
    env = Navigation2D(horizon=6, dtype=torch.float64)
    policy = GaussianMLPPolicy(2, 2, (4,)).double()
    params = [p.detach() for p in policy.param_list()]
    goals = env.sample_tasks(5, torch.Generator().manual_seed(1))
    whole_gen, share_gen = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    whole = sample_episodes(env, goals, policy.spec, params, 3, whole_gen)
    share = sample_episodes(env, goals, policy.spec, params, 3, share_gen, task_slice=slice(3, 5))
    for a, b in zip(whole, share):
        assert torch.equal(a[3:5], b)
    assert torch.equal(whole_gen.get_state(), share_gen.get_state())


def test_sampling_and_samples_refuse_bad_arguments():
    env = Navigation2D(horizon=4, dtype=torch.float64)
    policy = GaussianMLPPolicy(2, 2, (4,)).double()
    params = [p.detach() for p in policy.param_list()]
    goals = env.sample_tasks(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="episodes must be an integer >= 1"):
        sample_episodes(env, goals, policy.spec, params, 0, torch.Generator())
    with pytest.raises(ValueError, match="tasks must be a tensor with one row per task"):
        sample_episodes(env, goals[:0], policy.spec, params, 1, torch.Generator())
    algo, data = _small_meta_batch()
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"support.weights: expected on cpu"):
            algo.adapt(data._replace(weights=data.weights.cuda()))
