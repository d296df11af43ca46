"""The Gaussian policy's loss of the fused MLP ops (loss "gaussian"): params = [W_1, b_1, ..., W_L, b_L, log_std],
log_std [O] (shared) or [T, O] (per task), actions y [T, K, O] and per task the weighted negative log-likelihood
L_t = -(1/K) sum_k w_k log N(y_k; mu_k, diag exp(2 log_std)) with mu the MLP's output. mlp_loss_grad, mlp_hvp (the
exact Hessian, and with gauss_newton=True the policy's Fisher) and mlp_maml (the inner loop adapts log_std too) on
every kernel path (CPU: per_task, team, layerwise; CUDA: block, block_global, layerwise) against the reference twin
and explicit per-task oracles written here with torch.distributions (the Fisher as the Hessian of the weighted KL
divergence from the current policy, at the current policy); properties (log_std = 0 is mse scaled by O / 2; the
Fisher is label-independent and positive semi-definite, its log_std block 2 mean_k w_k v_s; where the residuals
vanish the Hessian's network block is the Fisher's); autograd, gradcheck, opcheck, fake kernels; bad input refused
by name."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from conftest import DEVICES
from mamlext import _ext, ops, reference
from mamlext._checks import is_per_task, task_shapes
from mamlext._mlp_codes import ACTIVATIONS, LOSSES
from test_ops_mlp_weights import PATHS, assert_loss_grad_autograd, cast, maml_autograd_loop, mlp_maml_on

needs_ext = pytest.mark.skipif(_ext._C is None, reason="the compiled extension is not built")
pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
MAML_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
# (sizes, per-task parameter indices; index 2L is log_std): narrow (the per-task kernels), width-1 layers, wider than
# 64 (the layerwise path on CUDA), and the navigation policy's 2 actions.
ARCHS = [([3, 6, 5], ()), ([2, 7, 1, 4], (0, 3, 6)), ([4, 70, 66, 3], (1,)), ([2, 8, 8, 2], (6,))]
# The CPU paths one at a time (the property tests): the reference twin needs no extension.
CPU_IMPLS = ["reference"] + [pytest.param(path, marks=needs_ext) for path, _ in PATHS["cpu"]]
TEAM = dict(PATHS["cpu"])


def codes(act, loss="gaussian"):
    return ACTIVATIONS[act], 0.0, LOSSES[loss]


# ----------------------------------------------------------------------------------------------------------------
# Cases and oracles


def of_task(params, t):
    return [p[t] if is_per_task(i, p, len(params)) else p for i, p in enumerate(params)]


def tasks_slice(params, t):
    """Task t's parameters as a batch of one task (shared ones as they are)."""
    return [p[t:t + 1] if is_per_task(i, p, len(params)) else p for i, p in enumerate(params)]


def make_case(sizes, per_task=(), tasks=3, rows=5, seed=0):
    """float64 params (log_std last, per task where 2L is in per_task), x, actions y, vectors and weights (negative,
    zero and positive, as advantages are)."""
    gen = torch.Generator().manual_seed(seed)
    layers = len(sizes) - 1
    params = []
    for layer in range(layers):
        for j, shape in enumerate(((sizes[layer + 1], sizes[layer]), (sizes[layer + 1],))):
            lead = (tasks,) if 2 * layer + j in per_task else ()
            params.append(torch.randn(*lead, *shape, generator=gen, dtype=torch.float64) / math.sqrt(sizes[layer]))
    lead = (tasks,) if 2 * layers in per_task else ()
    params.append(0.4 * torch.randn(*lead, sizes[-1], generator=gen, dtype=torch.float64))
    x = torch.randn(tasks, rows, sizes[0], generator=gen, dtype=torch.float64)
    y = torch.randn(tasks, rows, sizes[-1], generator=gen, dtype=torch.float64)
    vectors = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in task_shapes(params, tasks)]
    weights = torch.randn(tasks, rows, generator=gen, dtype=torch.float64)
    weights[0, -1] = 0.0
    return params, x, y, vectors, weights


def assert_rel(actual, expected, rtol, what, dtype=None):
    """Per tensor: the shapes agree and max|a - e| <= rtol * max(max|e|, 1e-6); a kernel's outputs (dtype given)
    are of that dtype and contiguous."""
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert list(a.shape) == list(e.shape), f"{what}[{i}]: shape {list(a.shape)}, expected {list(e.shape)}"
        if dtype is not None:
            assert a.dtype == dtype and a.is_contiguous(), f"{what}[{i}]: {a.dtype}, contiguous {a.is_contiguous()}"
        err = (a.detach().cpu().double() - e.detach().cpu().double()).abs().max().item() if a.numel() else 0.0
        scale = max(e.detach().double().abs().max().item() if e.numel() else 0.0, 1e-6)
        assert err <= rtol * scale, f"{what}[{i}]: max error {err:.3e}, scale {scale:.3e}"


ACT_FNS = {"tanh": torch.tanh, "relu": torch.relu}


def policy_mean(layers, x, act):
    """The MLP's output for x [K, in]: layers = [W_1, b_1, ..., W_L, b_L] of one task."""
    h = x
    count = len(layers) // 2
    for layer in range(count):
        h = h @ layers[2 * layer].T + layers[2 * layer + 1]
        if layer + 1 < count:
            h = ACT_FNS[act](h)
    return h


def surrogate(ps, x, y, w, act):
    """One task's loss, by torch.distributions: -mean_k w_k log N(y_k; mu_k, diag exp(2 log_std))."""
    return -(Normal(policy_mean(ps[:-1], x, act), ps[-1].exp()).log_prob(y).sum(-1) * w).mean()


def dot(a, b):
    return sum((ai * bi).sum() for ai, bi in zip(a, b))


def oracle(params, x, y, vectors, weights, act):
    """One task at a time with torch.autograd: the loss, its gradient, H v by double backward, and the Fisher
    product F v as the Hessian of mean_k w_k KL(pi_old(.|x_k) || pi(.|x_k)) at pi = pi_old (its gradient is 0 there,
    so the network's own curvature drops out), times v."""
    weights = torch.ones(x.shape[:2], dtype=x.dtype) if weights is None else weights
    losses, grads, hvs, fvs = [], [], [], []
    for t in range(x.shape[0]):
        old = [p.detach() for p in of_task(params, t)]
        v = [vi[t] for vi in vectors]
        ps = [p.clone().requires_grad_() for p in old]
        loss = surrogate(ps, x[t], y[t], weights[t], act)
        g = torch.autograd.grad(loss, ps, create_graph=True)
        hvs.append(torch.autograd.grad(dot(g, v), ps))
        losses.append(loss.detach())
        grads.append([gi.detach() for gi in g])

        old_policy = Normal(policy_mean(old[:-1], x[t], act), old[-1].exp())
        ps = [p.clone().requires_grad_() for p in old]
        policy = Normal(policy_mean(ps[:-1], x[t], act), ps[-1].exp())
        kl = (kl_divergence(old_policy, policy).sum(-1) * weights[t]).mean()
        g = torch.autograd.grad(kl, ps, create_graph=True)
        fvs.append(torch.autograd.grad(dot(g, v), ps))
    stack = lambda per_task: [torch.stack(parts) for parts in zip(*per_task)]  # noqa: E731
    return torch.stack(losses), stack(grads), stack(hvs), stack(fvs)


def loss_grad(impl, params, x, y, c, weights):
    """mlp_loss_grad on one CPU implementation: the reference twin or a kernel path."""
    if impl == "reference":
        return reference.mlp_loss_grad(params, x, y, *c, weights)
    return torch.ops.mamlext._mlp_loss_grad_path(params, x, y, *c, impl, TEAM[impl], weights)


def hvp(impl, params, vectors, x, y, c, weights, gauss_newton=False):
    if impl == "reference":
        return reference.mlp_hvp(params, vectors, x, y, *c, weights, gauss_newton)
    return torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *c, impl, TEAM[impl], weights, gauss_newton)


# ----------------------------------------------------------------------------------------------------------------
# mlp_loss_grad and mlp_hvp against the oracle


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_reference_matches_the_oracle(act, weighted):
    c = codes(act)
    for case, (sizes, per_task) in enumerate(ARCHS):
        params, x, y, vectors, weights = make_case(sizes, per_task, seed=case)
        w = weights if weighted else None
        o_losses, o_grads, o_hv, o_fv = oracle(params, x, y, vectors, w, act)
        losses, grads = reference.mlp_loss_grad(params, x, y, *c, w)
        assert_rel([losses, *grads], [o_losses, *o_grads], RTOL[torch.float64], f"loss_grad {sizes}")
        assert_rel(reference.mlp_hvp(params, vectors, x, y, *c, w), o_hv, RTOL[torch.float64], f"hvp {sizes}")
        assert_rel(reference.mlp_hvp(params, vectors, x, y, *c, w, True), o_fv, RTOL[torch.float64],
                   f"fisher {sizes}")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_every_path_matches_the_reference_and_the_oracle(device, dtype, act, weighted):
    """losses, grads (log_std's included), H v and the Fisher product F v, on every path and through the public
    and the registered ops."""
    c = codes(act)
    for case, (sizes, per_task) in enumerate(ARCHS):
        params, x, y, vectors, weights = make_case(sizes, per_task, seed=case)
        w = weights if weighted else None
        e_losses, e_grads = reference.mlp_loss_grad(params, x, y, *c, w)
        expected = [e_losses, *e_grads, *reference.mlp_hvp(params, vectors, x, y, *c, w),
                    *reference.mlp_hvp(params, vectors, x, y, *c, w, True)]
        o_losses, o_grads, o_hv, o_fv = oracle(params, x, y, vectors, w, act)
        o = [o_losses, *o_grads, *o_hv, *o_fv]
        assert_rel(expected, o, RTOL[torch.float64], f"reference {sizes}")
        args = cast([x, y], dtype, device)
        p, v = cast(params, dtype, device), cast(vectors, dtype, device)
        w_dev = None if w is None else cast([w], dtype, device)[0]
        outs = {}
        for path, team in PATHS[device]:
            losses, grads = torch.ops.mamlext._mlp_loss_grad_path(p, *args, *c, path, team, w_dev)
            hv = torch.ops.mamlext._mlp_hvp_path(p, v, *args, *c, path, team, w_dev)
            fv = torch.ops.mamlext._mlp_hvp_path(p, v, *args, *c, path, team, w_dev, True)
            outs[path] = [losses, *grads, *hv, *fv]
        losses, grads = ops.mlp_loss_grad(p, *args, act, loss="gaussian", weights=w_dev)
        outs["public ops"] = [losses, *grads, *ops.mlp_hvp(p, v, *args, act, loss="gaussian", weights=w_dev),
                              *ops.mlp_hvp(p, v, *args, act, loss="gaussian", weights=w_dev, gauss_newton=True)]
        losses, grads = torch.ops.mamlext.mlp_loss_grad(p, *args, *c, w_dev)
        outs["torch.ops"] = [losses, *grads, *torch.ops.mamlext.mlp_hvp(p, v, *args, *c, w_dev),
                             *torch.ops.mamlext.mlp_hvp(p, v, *args, *c, w_dev, True)]
        for name, out in outs.items():
            assert_rel(out, expected, RTOL[dtype], f"{name} {sizes}", dtype)
            assert_rel(out, o, RTOL[dtype], f"{name} {sizes} (oracle)", dtype)


@needs_ext
def test_unit_weights_are_the_unweighted_loss():
    params, x, y, vectors, weights = make_case([3, 8, 4], (1, 4))
    c = codes("tanh")
    ones = torch.ones_like(weights)
    for path, team in PATHS["cpu"]:
        plain = torch.ops.mamlext._mlp_loss_grad_path(params, x, y, *c, path, team)
        unit = torch.ops.mamlext._mlp_loss_grad_path(params, x, y, *c, path, team, ones)
        torch.testing.assert_close(unit, plain, rtol=1e-13, atol=1e-15)
        for gauss_newton in (False, True):
            plain = torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *c, path, team, None, gauss_newton)
            unit = torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *c, path, team, ones, gauss_newton)
            torch.testing.assert_close(unit, plain, rtol=1e-13, atol=1e-15)


@needs_ext
def test_zero_weights_leave_padding_rows_out():
    """Tasks padded to K rows with weight 0 on the padding: K_t / K times the loss (log_std's terms included) of
    the task's own K_t rows, and so its gradient, H v and F v."""
    params, x, y, vectors, _ = make_case([2, 6, 3], (0, 4), tasks=2, rows=7)  # per-task W_1 and log_std
    own_rows = [7, 4]
    weights = torch.zeros(2, 7, dtype=torch.float64)
    for t, k in enumerate(own_rows):
        weights[t, :k] = 1.0
    c = codes("relu")
    losses, grads = ops.mlp_loss_grad(params, x, y, "relu", loss="gaussian", weights=weights)
    hv = ops.mlp_hvp(params, vectors, x, y, "relu", loss="gaussian", weights=weights)
    fv = ops.mlp_hvp(params, vectors, x, y, "relu", loss="gaussian", weights=weights, gauss_newton=True)
    for t, k in enumerate(own_rows):
        task = lambda ts: [u[t:t + 1] for u in ts]  # noqa: E731
        own_params, own = tasks_slice(params, t), [x[t:t + 1, :k], y[t:t + 1, :k]]
        e_losses, e_grads = torch.ops.mamlext.mlp_loss_grad(own_params, *own, *c)
        e_hv = torch.ops.mamlext.mlp_hvp(own_params, task(vectors), *own, *c)
        e_fv = torch.ops.mamlext.mlp_hvp(own_params, task(vectors), *own, *c, None, True)
        scale = k / 7
        torch.testing.assert_close(losses[t:t + 1], scale * e_losses, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(task(grads), [scale * g for g in e_grads], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(task(hv), [scale * h for h in e_hv], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(task(fv), [scale * f for f in e_fv], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_zero_log_std_is_mse_scaled(impl):
    """log_std = 0: L = O/2 mse + O log(2 pi)/2 mean_k w_k, so the network's gradient, its H v (v_s = 0: no cross
    terms) and its Fisher block are O/2 times mse's (gradient, H v, Gauss-Newton product); log_std's gradient is
    mean_k w_k (1 - e_k^2) and its Fisher block 2 mean_k w_k v_s."""
    params, x, y, vectors, weights = make_case([3, 6, 4], (0, 4))  # per-task W_1 and log_std
    params[-1] = torch.zeros_like(params[-1])
    net, half = params[:-1], params[-1].shape[-1] / 2
    c, c_mse = codes("tanh"), codes("tanh", "mse")
    kw = dict(rtol=1e-11, atol=1e-13)
    losses, grads = loss_grad(impl, params, x, y, c, weights)
    m_losses, m_grads = loss_grad(impl, net, x, y, c_mse, weights)
    torch.testing.assert_close(losses, half * m_losses + half * math.log(2 * math.pi) * weights.mean(1), **kw)
    torch.testing.assert_close(grads[:-1], [half * g for g in m_grads], **kw)
    mu = torch.stack([policy_mean(of_task(net, t), x[t], "tanh") for t in range(x.shape[0])])
    torch.testing.assert_close(grads[-1], (weights.unsqueeze(-1) * (1 - (y - mu) ** 2)).mean(1), **kw)
    no_s = vectors[:-1] + [torch.zeros_like(vectors[-1])]
    hv = hvp(impl, params, no_s, x, y, c, weights)
    torch.testing.assert_close(hv[:-1], [half * h for h in hvp(impl, net, vectors[:-1], x, y, c_mse, weights)], **kw)
    fv = hvp(impl, params, vectors, x, y, c, weights, True)
    gn = hvp(impl, net, vectors[:-1], x, y, c_mse, weights, True)
    torch.testing.assert_close(fv[:-1], [half * g for g in gn], **kw)
    torch.testing.assert_close(fv[-1], 2 * weights.mean(1, keepdim=True) * vectors[-1], **kw)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_fisher_product_properties(impl):
    """F v does not depend on the actions; the log_std part of v does not enter the network's block nor the
    network's part the log_std block (no cross terms), which is 2 mean_k w_k v_s whatever log_std; v^T F v >= 0
    for non-negative weights."""
    params, x, y, vectors, weights = make_case([3, 8, 4], (2, 4), tasks=4, rows=6)
    weights = weights.abs()
    c = codes("relu")
    fv = hvp(impl, params, vectors, x, y, c, weights, True)
    other = y + torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    torch.testing.assert_close(hvp(impl, params, vectors, x, other, c, weights, True), fv, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fv[-1], 2 * weights.mean(1, keepdim=True) * vectors[-1], rtol=1e-12, atol=1e-14)
    new_s = vectors[:-1] + [torch.randn_like(vectors[-1])]
    torch.testing.assert_close(hvp(impl, params, new_s, x, y, c, weights, True)[:-1], fv[:-1], rtol=1e-12,
                               atol=1e-14)
    new_net = [3 * v for v in vectors[:-1]] + [vectors[-1]]
    torch.testing.assert_close(hvp(impl, params, new_net, x, y, c, weights, True)[-1], fv[-1], rtol=1e-12,
                               atol=1e-14)
    curvature = sum((f * v).flatten(1).sum(1) for f, v in zip(fv, vectors))
    assert (curvature >= 0).all(), curvature


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_hessian_is_the_fisher_where_the_residuals_vanish(impl):
    """At y = mu (zero residuals) the terms of H with a residual factor vanish: the network's curvature, the cross
    terms with log_std and log_std's own block. So H v's network block is F v's (any depth) and its log_std block is
    0 (F's is 2 mean_k w_k v_s). For one layer (mu linear in W, b) and v_s = 0 the network blocks agree at any y;
    with a hidden layer and residuals they do not."""
    c = codes("tanh")
    for sizes, per_task in [([4, 3], (1, 2)), ([3, 6, 5], (4,)), ([2, 8, 8, 2], (0,))]:
        params, x, _, vectors, weights = make_case(sizes, per_task)
        mu = torch.stack([policy_mean(of_task(params, t)[:-1], x[t], "tanh") for t in range(x.shape[0])])
        hv = hvp(impl, params, vectors, x, mu, c, weights)
        fv = hvp(impl, params, vectors, x, mu, c, weights, True)
        assert_rel(hv[:-1], fv[:-1], 1e-10, f"network block {sizes}")
        assert hv[-1].abs().max().item() <= 1e-12 * fv[-1].abs().max().item(), hv[-1]
    params, x, y, vectors, weights = make_case([4, 3], (1,))
    no_s = vectors[:-1] + [torch.zeros_like(vectors[-1])]
    assert_rel(hvp(impl, params, no_s, x, y, c, weights)[:-1], hvp(impl, params, no_s, x, y, c, weights, True)[:-1],
               1e-10, "one layer")
    params, x, y, vectors, weights = make_case([4, 6, 3], ())
    no_s = vectors[:-1] + [torch.zeros_like(vectors[-1])]
    hv, fv = hvp(impl, params, no_s, x, y, c, weights), hvp(impl, params, no_s, x, y, c, weights, True)
    assert max((a - b).abs().max().item() for a, b in zip(hv[:-1], fv[:-1])) > 1e-6


# ----------------------------------------------------------------------------------------------------------------
# mlp_maml: the inner loop adapts log_std too


def maml_oracle(params, xs, ys, xq, yq, rates, step_weights, sw, qw, act, first_order):
    """One task at a time with torch.autograd: N (weighted) inner steps of every parameter, log_std's included
    (create_graph unless first order), the weighted query losses, their gradients w.r.t. the meta-parameters and
    the rates."""
    sw = torch.ones(xs.shape[:2], dtype=xs.dtype) if sw is None else sw
    qw = torch.ones(xq.shape[:2], dtype=xq.dtype) if qw is None else qw
    return maml_autograd_loop(params, xs, ys, xq, yq, rates, step_weights, sw, qw,
                              lambda ps, x, y, w: surrogate(ps, x, y, w, act), first_order)


def maml_case(sizes, steps, seed, per_element=False, tasks=3):
    """Shared params (log_std [O]), support (K = 5) and query (K = 4) sets with their rows' weights, rates [N] (or
    per element [N, *S_i] for W_1 and log_std), step weights."""
    params, xs, ys, _, sw = make_case(sizes, (), tasks=tasks, rows=5, seed=seed)
    _, xq, yq, _, qw = make_case(sizes, (), tasks=tasks, rows=4, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    rates = []
    for i, p in enumerate(params):
        shape = (steps, *p.shape) if per_element and i in (0, len(params) - 1) else (steps,)
        rates.append(0.03 + 0.1 * torch.rand(shape, generator=gen, dtype=torch.float64))
    step_weights = torch.tensor([0.3] * (steps - 1) + [1.0], dtype=torch.float64)
    return params, xs, ys, xq, yq, rates, step_weights, sw, qw


# (sizes, inner steps, per-element rates)
MAML_CASES = [([3, 6, 5], 2, False), ([2, 7, 1, 4], 1, False), ([4, 70, 66, 3], 2, False), ([2, 8, 8, 2], 2, True)]


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_reference_mlp_maml_matches_the_oracle(first_order, weighted, act):
    c = codes(act)
    for case, (sizes, steps, per_element) in enumerate(MAML_CASES):
        params, xs, ys, xq, yq, rates, step_weights, sw, qw = maml_case(sizes, steps, 10 * case, per_element)
        sw, qw = (sw, qw) if weighted else (None, None)
        out = reference.mlp_maml(params, xs, ys, xq, yq, rates, step_weights, first_order, *c, sw, qw)
        o = maml_oracle(params, xs, ys, xq, yq, rates, step_weights, sw, qw, act, first_order)
        assert_rel([out[0], *out[1], *out[2]], [o[0], *o[1], *o[2]], MAML_RTOL[torch.float64], f"reference {sizes}")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_mlp_maml_on_every_path(device, dtype, first_order, weighted):
    """Query losses, meta-gradients (log_std's included) and rate gradients on every path and through the public
    and the registered op, against the reference twin and the oracle."""
    act = "tanh"
    c = codes(act)
    for case, (sizes, steps, per_element) in enumerate(MAML_CASES):
        params, xs, ys, xq, yq, rates, step_weights, sw, qw = maml_case(sizes, steps, 10 * case, per_element)
        sw, qw = (sw, qw) if weighted else (None, None)
        e = reference.mlp_maml(params, xs, ys, xq, yq, rates, step_weights, first_order, *c, sw, qw)
        expected = [e[0], *e[1], *e[2]]
        o = maml_oracle(params, xs, ys, xq, yq, rates, step_weights, sw, qw, act, first_order)
        o = [o[0], *o[1], *o[2]]
        assert_rel(expected, o, MAML_RTOL[torch.float64], f"reference {sizes}")
        on = lambda ts: cast(ts, dtype, device)  # noqa: E731
        p, r = on(params), on(rates)
        data = on([xs, ys, xq, yq])
        w_dev = [None if w is None else on([w])[0] for w in (sw, qw)]
        outs = {}
        for path, team in PATHS[device]:
            outs[path] = torch.ops.mamlext._mlp_maml_path(p, *data, r, step_weights.to(dtype), first_order, *c,
                                                          path, team, *w_dev)
        outs["public ops"] = ops.mlp_maml(p, *data, r, step_weights.to(dtype), first_order, activation=act,
                                          loss="gaussian", support_weights=w_dev[0], query_weights=w_dev[1])
        outs["torch.ops"] = torch.ops.mamlext.mlp_maml(p, *data, r, step_weights.to(dtype), first_order, *c, *w_dev)
        for name, out in outs.items():
            out = [out[0], *out[1], *out[2]]
            assert_rel(out, expected, MAML_RTOL[dtype], f"{name} {sizes}", dtype)
            assert_rel(out, o, MAML_RTOL[dtype], f"{name} {sizes} (oracle)", dtype)


# ----------------------------------------------------------------------------------------------------------------
# Autograd, opcheck, fake kernels


@pytest.mark.parametrize("log_std", ["shared", "per_task"])
def test_autograd_and_gradcheck(log_std):
    """mlp_loss_grad's losses are differentiable w.r.t. params, log_std included (shared: summed over the tasks);
    the weights get no gradient."""
    params, x, y, _, weights = make_case([3, 4, 3], (1, 4) if log_std == "per_task" else (1,), tasks=2, rows=4)
    assert_loss_grad_autograd(params, x, y, "gaussian", weights)


def test_mlp_maml_autograd_and_gradcheck():
    """mlp_maml's query losses are differentiable w.r.t. params and rates, log_std's included (second order: the
    true derivative, so a gradcheck); mlp_maml_mean's mean too."""
    params, xs, ys, xq, yq, rates, step_weights, sw, qw = maml_case([2, 3, 2], 2, seed=3, per_element=True, tasks=2)
    leaves = [t.clone().requires_grad_() for t in params + rates]
    n = len(params)
    q, meta, lr_grads = ops.mlp_maml(leaves[:n], xs, ys, xq, yq, leaves[n:], step_weights, activation="tanh",
                                     loss="gaussian", support_weights=sw, query_weights=qw)
    q.sum().backward()
    for i, (leaf, m) in enumerate(zip(leaves, meta + lr_grads)):
        torch.testing.assert_close(leaf.grad, m.sum(0), rtol=1e-12, atol=1e-14, msg=f"input {i}")

    def fn(*flat):
        return ops.mlp_maml(list(flat[:n]), xs, ys, xq, yq, list(flat[n:]), step_weights, activation="tanh",
                            loss="gaussian", support_weights=sw, query_weights=qw)[0]

    assert torch.autograd.gradcheck(fn, [t.detach().clone().requires_grad_() for t in params + rates])
    leaves = [t.detach().clone().requires_grad_() for t in params + rates]
    mean, losses = ops.mlp_maml_mean(leaves[:n], xs, ys, xq, yq, leaves[n:], step_weights, False, *codes("tanh"))
    q = ops.mlp_maml(params, xs, ys, xq, yq, rates, step_weights, activation="tanh", loss="gaussian")
    torch.testing.assert_close(losses, q[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mean, q[0].mean(), rtol=1e-12, atol=1e-14)
    mean.backward()
    for i, (leaf, m) in enumerate(zip(leaves, q[1] + q[2])):
        torch.testing.assert_close(leaf.grad, m.mean(0), rtol=1e-12, atol=1e-14, msg=f"mean, input {i}")


@needs_ext
def test_opcheck_and_fake_kernels():
    params, x, y, vectors, weights = make_case([3, 4, 2], (1, 4), tasks=2, rows=3)
    c = codes("tanh")
    leaves = [p.clone().requires_grad_() for p in params]
    torch.library.opcheck(torch.ops.mamlext.mlp_loss_grad.default, (leaves, x, y, *c, weights))
    torch.library.opcheck(torch.ops.mamlext.mlp_hvp.default, (params, vectors, x, y, *c, weights))
    torch.library.opcheck(torch.ops.mamlext.mlp_hvp.default, (params, vectors, x, y, *c, weights, True))
    m_params, xs, ys, xq, yq, rates, step_weights, sw, qw = maml_case([3, 4, 2], 2, seed=7, per_element=True,
                                                                      tasks=2)
    torch.library.opcheck(torch.ops.mamlext.mlp_maml.default,
                          ([p.clone().requires_grad_() for p in m_params], xs, ys, xq, yq,
                           [r.clone().requires_grad_() for r in rates], step_weights, False, *c, sw, qw))

    meta = lambda ts: [t.to("meta") for t in ts]  # noqa: E731
    losses, grads = ops._mlp_loss_grad_fake(meta(params), *meta([x, y]), *c, weights.to("meta"))
    assert list(losses.shape) == [2] and [list(g.shape) for g in grads] == task_shapes(params, 2)
    assert [list(g.shape) for g in grads][-1] == [2, 2]
    out = ops._mlp_hvp_fake(meta(params), meta(vectors), *meta([x, y]), *c, None, True)
    assert [o.shape for o in out] == [v.shape for v in vectors]
    q, meta_grads, lr_grads = ops._mlp_maml_fake(meta(m_params), *meta([xs, ys, xq, yq]), meta(rates),
                                                 step_weights.to("meta"), False, *c, *meta([sw, qw]))
    assert list(q.shape) == [2]
    assert [list(g.shape) for g in meta_grads] == [[2, *p.shape] for p in m_params]
    assert [list(g.shape) for g in lr_grads] == [[2, *r.shape] for r in rates]
    bad = meta(params[:-1]) + [torch.empty(3, dtype=torch.float64, device="meta")]
    with pytest.raises(ValueError, match=r"params\[4\]"):
        ops._mlp_loss_grad_fake(bad, *meta([x, y]), *c, None)
    with pytest.raises(ValueError, match=r"params"):
        ops._mlp_hvp_fake(meta(params[:-1]), meta(vectors[:-1]), *meta([x, y]), *c, None, True)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def _bad_cases():
    """name: (params, vectors, y, loss, pattern of the ValueError) for [3, 4, 2], T = 2, K = 3 (log_std is
    params[4])."""
    params, x, y, vectors, _ = make_case([3, 4, 2], (), tasks=2, rows=3)
    log_std = lambda *shape: params[:-1] + [torch.zeros(*shape, dtype=torch.float64)]  # noqa: E731
    classes = torch.zeros(2, 3, dtype=torch.int64)
    return {
        "even_count": (params[:-1], vectors[:-1], y, "gaussian", r"params"),
        "odd_count_mse": (params, vectors, y, "mse", r"params"),
        "odd_count_ce": (params, vectors, classes, "ce", r"params"),
        "log_std_width": (log_std(3), vectors, y, "gaussian", r"params\[4\]"),
        "log_std_tasks": (log_std(3, 2), vectors, y, "gaussian", r"params\[4\]"),
        "log_std_rank": (log_std(2, 1, 2), vectors, y, "gaussian", r"params\[4\]"),
        "y_width": (params, vectors, y[..., :1].contiguous(), "gaussian", r"\by\b"),
        "y_rank": (params, vectors, y[..., 0].contiguous(), "gaussian", r"\by\b"),
        "y_int": (params, vectors, y.to(torch.int64), "gaussian", r"\by\b"),
        "y_classes": (params, vectors, classes, "gaussian", r"\by\b"),
    }


IMPLS = ["ops", "reference", pytest.param("torch.ops", marks=needs_ext), pytest.param("layerwise", marks=needs_ext)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_refused_by_name(impl, case):
    _, x, _, _, weights = make_case([3, 4, 2], (), tasks=2, rows=3)
    params, vectors, y, loss, message = _bad_cases()[case]
    c = codes("tanh", loss)
    calls = {
        "ops": (lambda: ops.mlp_loss_grad(params, x, y, "tanh", loss=loss, weights=weights),
                lambda: ops.mlp_hvp(params, vectors, x, y, "tanh", loss=loss, weights=weights),
                lambda: ops.mlp_hvp(params, vectors, x, y, "tanh", loss=loss, gauss_newton=True)),
        "reference": (lambda: reference.mlp_loss_grad(params, x, y, *c, weights),
                      lambda: reference.mlp_hvp(params, vectors, x, y, *c, weights),
                      lambda: reference.mlp_hvp(params, vectors, x, y, *c, None, True)),
        "torch.ops": (lambda: torch.ops.mamlext.mlp_loss_grad(params, x, y, *c, weights),
                      lambda: torch.ops.mamlext.mlp_hvp(params, vectors, x, y, *c, weights),
                      lambda: torch.ops.mamlext.mlp_hvp(params, vectors, x, y, *c, None, True)),
        "layerwise": (lambda: torch.ops.mamlext._mlp_loss_grad_path(params, x, y, *c, "layerwise", 0, weights),
                      lambda: torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *c, "layerwise", 0, weights),
                      lambda: torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *c, "layerwise", 0, None,
                                                              True)),
    }[impl]
    for fn in calls:
        with pytest.raises(ValueError, match=message):
            fn()


def _bad_maml_cases():
    """name: (params, lrs, ys, yq, loss, pattern) for [3, 4, 2], T = 3 (log_std is params[4], shared only)."""
    params, xs, ys, xq, yq, rates, step_weights, sw, qw = maml_case([3, 4, 2], 2, seed=4)
    log_std = lambda *shape: params[:-1] + [torch.zeros(*shape, dtype=torch.float64)]  # noqa: E731
    return {
        "even_count": (params[:-1], rates[:-1], ys, yq, "gaussian", r"params"),
        "odd_count_mse": (params, rates, ys, yq, "mse", r"params"),
        "log_std_width": (log_std(3), rates, ys, yq, "gaussian", r"params\[4\]"),
        "log_std_per_task": (log_std(3, 2), rates, ys, yq, "gaussian", r"params\[4\]"),
        "ys_int": (params, rates, ys.to(torch.int64), yq, "gaussian", r"\bys\b"),
        "yq_width": (params, rates, ys, yq[..., :1].contiguous(), "gaussian", r"\byq\b"),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(_bad_maml_cases()))
def test_mlp_maml_bad_input_is_refused_by_name(impl, case):
    _, xs, _, xq, _, _, step_weights, sw, qw = maml_case([3, 4, 2], 2, seed=4)
    params, rates, ys, yq, loss, message = _bad_maml_cases()[case]
    with pytest.raises(ValueError, match=message):
        mlp_maml_on(impl, params, xs, ys, xq, yq, rates, step_weights, loss, sw, qw)
