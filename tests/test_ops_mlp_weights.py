"""Per-row weights of the fused MLP losses (mlp_loss_grad and mlp_hvp's `weights` [T, K]): each row's term of the
loss times its weight before the same mean. Every kernel path (CPU: per_task, team, layerwise; CUDA: block,
block_global, layerwise) against the reference twin and an explicit per-task autograd oracle written here; the
categorical policy-gradient surrogate; zero weights leave rows out; autograd, opcheck, fake kernels, bad weights."""
import math

import pytest
import torch
from torch.nn import functional as F

from conftest import DEVICES
from mamlext import _ext, ops, reference
from mamlext._checks import task_shapes
from mamlext._mlp_codes import ACTIVATIONS, LOSSES

pytestmark = pytest.mark.skipif(_ext._C is None, reason="the compiled extension is not built")

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
# (sizes, per-task parameter indices): narrow (the per-task kernels), width-1 layers, and wider than 64 (the
# layerwise path on CUDA).
ARCHS = [([3, 6, 5], ()), ([2, 7, 1, 4], (0, 3)), ([4, 70, 66, 3], (1,))]
PATHS = {"cpu": [("per_task", 0), ("team", 3), ("layerwise", 0)],
         "cuda": [("block", 0), ("block_global", 0), ("layerwise", 0)]}


def codes(act, loss):
    return ACTIVATIONS[act], {"leaky_relu": 0.07}.get(act, 0.0), LOSSES[loss]


def make_case(sizes, per_task, loss, tasks=3, rows=5, seed=0):
    """float64 params, x, y, vectors and weights (negative, zero and positive, as advantages are)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for layer in range(len(sizes) - 1):
        for j, shape in enumerate(((sizes[layer + 1], sizes[layer]), (sizes[layer + 1],))):
            lead = (tasks,) if 2 * layer + j in per_task else ()
            params.append(torch.randn(*lead, *shape, generator=gen, dtype=torch.float64) / math.sqrt(sizes[layer]))
    x = torch.randn(tasks, rows, sizes[0], generator=gen, dtype=torch.float64)
    if loss == "mse":
        y = torch.randn(tasks, rows, sizes[-1], generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(0, sizes[-1], (tasks, rows), generator=gen)
    vectors = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in task_shapes(params, tasks)]
    weights = torch.randn(tasks, rows, generator=gen, dtype=torch.float64)
    weights[0, -1] = 0.0
    return params, x, y, vectors, weights


def cast(tensors, dtype, device):
    return [(t.to(dtype) if t.is_floating_point() else t).to(device) for t in tensors]


def assert_rel(actual, expected, dtype, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        err = (a.detach().cpu().double() - e.double()).abs().max().item()
        scale = max(e.double().abs().max().item(), 1e-6)
        assert err <= RTOL[dtype] * scale, f"{what}[{i}]: max error {err:.3e}, scale {scale:.3e}"


def oracle(params, x, y, vectors, weights, act, loss):
    """One task at a time with torch.autograd: the weighted loss written out, its gradient, and H v by double
    backward."""
    act_fn = {"tanh": torch.tanh, "relu": torch.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.07)}[act]
    losses, grads, hvs = [], [], []
    for t in range(x.shape[0]):
        ps = [(p[t] if p.dim() == (3 if i % 2 == 0 else 2) else p).detach().clone().requires_grad_()
              for i, p in enumerate(params)]
        h = x[t]
        for layer in range(len(ps) // 2):
            h = h @ ps[2 * layer].T + ps[2 * layer + 1]
            if layer + 1 < len(ps) // 2:
                h = act_fn(h)
        if loss == "mse":
            task_loss = (weights[t].unsqueeze(-1) * (h - y[t]) ** 2).sum() / h.numel()
        else:  # the categorical policy-gradient surrogate: -mean_k A_k log pi(a_k | s_k)
            task_loss = -(weights[t] * torch.log_softmax(h, -1).gather(-1, y[t].unsqueeze(-1)).squeeze(-1)).mean()
        g = torch.autograd.grad(task_loss, ps, create_graph=True)
        hv = torch.autograd.grad(sum((gi * vi[t]).sum() for gi, vi in zip(g, vectors)), ps)
        losses.append(task_loss.detach())
        grads.append([gi.detach() for gi in g])
        hvs.append(hv)
    return torch.stack(losses), [torch.stack(gs) for gs in zip(*grads)], [torch.stack(hs) for hs in zip(*hvs)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_every_path_matches_the_reference_and_the_oracle(device, dtype, loss, act):
    c = codes(act, loss)
    for sizes, per_task in ARCHS:
        params, x, y, vectors, weights = make_case(sizes, per_task, loss)
        e_losses, e_grads = reference.mlp_loss_grad(params, x, y, *c, weights)
        e_hv = reference.mlp_hvp(params, vectors, x, y, *c, weights)
        o_losses, o_grads, o_hv = oracle(params, x, y, vectors, weights, act, loss)
        assert_rel([e_losses, *e_grads, *e_hv], [o_losses, *o_grads, *o_hv], torch.float64, f"reference {sizes}")
        args = cast([x, y], dtype, device)
        p, v, w = cast(params, dtype, device), cast(vectors, dtype, device), cast([weights], dtype, device)[0]
        for path, team in PATHS[device]:
            losses, grads = torch.ops.mamlext._mlp_loss_grad_path(p, *args, *c, path, team, w)
            hv = torch.ops.mamlext._mlp_hvp_path(p, v, *args, *c, path, team, w)
            assert_rel([losses, *grads, *hv], [e_losses, *e_grads, *e_hv], dtype, f"{path} {sizes}")
        losses, grads = ops.mlp_loss_grad(p, *args, act, loss=loss, weights=w)
        hv = ops.mlp_hvp(p, v, *args, act, loss=loss, weights=w)
        assert_rel([losses, *grads, *hv], [e_losses, *e_grads, *e_hv], dtype, f"public ops {sizes}")


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_unit_weights_are_the_unweighted_loss(loss):
    params, x, y, vectors, weights = make_case([3, 8, 4], (1,), loss)
    c = codes("tanh", loss)
    for path in ("per_task", "layerwise"):
        plain = torch.ops.mamlext._mlp_loss_grad_path(params, x, y, *c, path)
        ones = torch.ops.mamlext._mlp_loss_grad_path(params, x, y, *c, path, 0, torch.ones_like(weights))
        torch.testing.assert_close(ones, plain, rtol=1e-14, atol=0)
        plain_hv = torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *c, path)
        ones_hv = torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *c, path, 0, torch.ones_like(weights))
        torch.testing.assert_close(ones_hv, plain_hv, rtol=1e-14, atol=0)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_zero_weights_leave_padding_rows_out(loss):
    """Tasks padded to K rows with weight 0 on the padding: K / K_t times the loss of the task's own K_t rows."""
    params, x, y, vectors, _ = make_case([2, 6, 3], (), loss, tasks=2, rows=7)
    own_rows = [7, 4]
    weights = torch.zeros(2, 7, dtype=torch.float64)
    for t, k in enumerate(own_rows):
        weights[t, :k] = 1.0
    c = codes("relu", loss)
    losses, grads = ops.mlp_loss_grad(params, x, y, "relu", loss=loss, weights=weights)
    hv = ops.mlp_hvp(params, vectors, x, y, "relu", loss=loss, weights=weights)
    for t, k in enumerate(own_rows):
        task = lambda ts: [u[t:t + 1] for u in ts]  # noqa: E731
        own = [x[t:t + 1, :k], y[t:t + 1, :k]]
        e_losses, e_grads = torch.ops.mamlext.mlp_loss_grad(params, *own, *c)
        e_hv = torch.ops.mamlext.mlp_hvp(params, task(vectors), *own, *c)
        scale = k / 7
        torch.testing.assert_close(losses[t:t + 1], scale * e_losses, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(task(grads), [scale * g for g in e_grads], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(task(hv), [scale * h for h in e_hv], rtol=1e-12, atol=1e-14)


def assert_loss_grad_autograd(params, x, y, loss, weights):
    """mlp_loss_grad's losses differentiable w.r.t. params (first order, a shared one's gradient summed over the
    tasks) with the weights in them; a float64 gradcheck."""
    leaves = [p.clone().requires_grad_() for p in params]
    losses, grads = ops.mlp_loss_grad(leaves, x, y, "tanh", loss=loss, weights=weights)
    losses.sum().backward()
    for i, (leaf, g) in enumerate(zip(leaves, grads)):
        expected = g if leaf.dim() == g.dim() else g.sum(0)
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-14, msg=f"params[{i}]")
    assert torch.autograd.gradcheck(
        lambda *ps: ops.mlp_loss_grad(list(ps), x, y, "tanh", loss=loss, weights=weights)[0],
        [p.clone().requires_grad_() for p in params])


def test_autograd_and_gradcheck_with_weights():
    """losses is differentiable w.r.t. params (first order) with the weights in it; the weights get no gradient."""
    params, x, y, _, weights = make_case([3, 4, 3], (1,), "ce", tasks=2, rows=4)
    assert_loss_grad_autograd(params, x, y, "ce", weights)


def test_opcheck_and_fake_kernels_with_weights():
    params, x, y, vectors, weights = make_case([3, 4, 2], (1,), "ce", tasks=2, rows=3)
    c = codes("tanh", "ce")
    leaves = [p.clone().requires_grad_() for p in params]
    torch.library.opcheck(torch.ops.mamlext.mlp_loss_grad.default, (leaves, x, y, *c, weights))
    torch.library.opcheck(torch.ops.mamlext.mlp_hvp.default, (params, vectors, x, y, *c, weights))
    meta = lambda ts: [t.to("meta") for t in ts]  # noqa: E731
    losses, grads = ops._mlp_loss_grad_fake(meta(params), *meta([x, y]), *c, weights.to("meta"))
    assert losses.shape == (2,) and [g.shape for g in grads] == [g.shape for g in vectors]
    with pytest.raises(ValueError, match=r"weights \(one weight per row\) must be \[T, K\] = \[2, 3\]"):
        ops._mlp_hvp_fake(meta(params), meta(vectors), *meta([x, y]), *c, weights[:, :2].to("meta"))


def _bad_weights():
    _, x, _, _, weights = make_case([3, 4, 2], (), "ce", tasks=2, rows=3)
    return {
        "shape": (weights[:, :2], r"weights \(one weight per row\) must be \[T, K\] = \[2, 3\]"),
        "rank": (weights.reshape(-1), r"weights \(one weight per row\) must be \[T, K\]"),
        "dtype": (weights.float(), "weights"),
        "nan": (weights.clone().fill_(math.nan), "weights must be finite"),
        "inf": (torch.full_like(weights, math.inf), "weights must be finite"),
    }


@pytest.mark.parametrize("impl", ["ops", "reference", "torch.ops", "layerwise"])
@pytest.mark.parametrize("case", list(_bad_weights()))
def test_bad_weights_are_refused_by_name(impl, case):
    params, x, y, vectors, _ = make_case([3, 4, 2], (), "ce", tasks=2, rows=3)
    bad, message = _bad_weights()[case]
    c = codes("tanh", "ce")
    calls = {
        "ops": (lambda: ops.mlp_loss_grad(params, x, y, "tanh", loss="ce", weights=bad),
                lambda: ops.mlp_hvp(params, vectors, x, y, "tanh", loss="ce", weights=bad)),
        "reference": (lambda: reference.mlp_loss_grad(params, x, y, *c, bad),
                      lambda: reference.mlp_hvp(params, vectors, x, y, *c, bad)),
        "torch.ops": (lambda: torch.ops.mamlext.mlp_loss_grad(params, x, y, *c, bad),
                      lambda: torch.ops.mamlext.mlp_hvp(params, vectors, x, y, *c, bad)),
        "layerwise": (lambda: torch.ops.mamlext._mlp_loss_grad_path(params, x, y, *c, "layerwise", 0, bad),
                      lambda: torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *c, "layerwise", 0, bad)),
    }[impl]
    for fn in calls:
        with pytest.raises(ValueError, match=message):
            fn()


# ----------------------------------------------------------------------------------------------------------------
# mlp_maml: support_weights and query_weights


def maml_oracle(params, xs, ys, xq, yq, rates, step_weights, sw, qw, act, loss, first_order):
    """One task at a time with torch.autograd: N weighted inner steps (create_graph unless first order), the weighted
    query losses, their gradients w.r.t. the meta-parameters and the per-step rates."""
    def weighted_loss(ps, x, y, w):
        h = x
        for layer in range(len(ps) // 2):
            h = h @ ps[2 * layer].T + ps[2 * layer + 1]
            if layer + 1 < len(ps) // 2:
                h = torch.tanh(h) if act == "tanh" else torch.relu(h)
        if loss == "mse":
            return (w.unsqueeze(-1) * (h - y) ** 2).sum() / h.numel()
        return -(w * torch.log_softmax(h, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)).mean()

    return maml_autograd_loop(params, xs, ys, xq, yq, rates, step_weights, sw, qw, weighted_loss, first_order)


def maml_autograd_loop(params, xs, ys, xq, yq, rates, step_weights, sw, qw, task_loss, first_order):
    """Per task: N inner steps theta_{k+1} = theta_k - rates[:, k] * grad task_loss(support) (create_graph unless
    first order), sum_k w_k task_loss(query, theta_{k+1}), and its gradients w.r.t. params and rates. task_loss(ps,
    x, y, w) is one task's weighted loss; sw, qw the support's and query's row weights [T, K]."""
    losses, metas, lr_grads = [], [], []
    for t in range(xs.shape[0]):
        theta = [p.detach().clone().requires_grad_() for p in params]
        alpha = [r.detach().clone().requires_grad_() for r in rates]
        current, total = theta, 0
        for k, w_k in enumerate(step_weights.tolist()):
            g = torch.autograd.grad(task_loss(current, xs[t], ys[t], sw[t]), current, create_graph=not first_order)
            current = [c - a[k] * (gi.detach() if first_order else gi) for c, a, gi in zip(current, alpha, g)]
            total = total + w_k * task_loss(current, xq[t], yq[t], qw[t])
        d = torch.autograd.grad(total, theta + alpha)
        losses.append(total.detach())
        metas.append(d[:len(params)])
        lr_grads.append(d[len(params):])
    return torch.stack(losses), [torch.stack(m) for m in zip(*metas)], [torch.stack(r) for r in zip(*lr_grads)]


def maml_case(sizes, loss, steps, seed):
    params, xs, ys, _, sw = make_case(sizes, (), loss, tasks=3, rows=5, seed=seed)
    _, xq, yq, _, qw = make_case(sizes, (), loss, tasks=3, rows=4, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    rates = [0.05 + 0.2 * torch.rand(steps, generator=gen, dtype=torch.float64) for _ in params]
    step_weights = torch.tensor([0.3] * (steps - 1) + [1.0], dtype=torch.float64)
    return params, xs, ys, xq, yq, rates, step_weights, sw, qw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_mlp_maml_with_row_weights_on_every_path(device, dtype, first_order, loss):
    act = "tanh"
    c = codes(act, loss)
    for case, (sizes, steps) in enumerate([([3, 6, 5], 2), ([2, 7, 1, 4], 1), ([4, 70, 66, 3], 2)]):
        params, xs, ys, xq, yq, rates, step_weights, sw, qw = maml_case(sizes, loss, steps, seed=10 * case)
        expected = reference.mlp_maml(params, xs, ys, xq, yq, rates, step_weights, first_order, *c, sw, qw)
        o = maml_oracle(params, xs, ys, xq, yq, rates, step_weights, sw, qw, act, loss, first_order)
        assert_rel([expected[0], *expected[1], *expected[2]], [o[0], *o[1], *o[2]], torch.float64, f"ref {sizes}")
        on = lambda ts: cast(ts, dtype, device)  # noqa: E731
        args = (on(params), *on([xs, ys, xq, yq]), on(rates), step_weights.to(dtype), first_order, *c)
        for path, team in PATHS[device]:
            out = torch.ops.mamlext._mlp_maml_path(*args, path, team, *on([sw, qw]))
            assert_rel([out[0], *out[1], *out[2]], [expected[0], *expected[1], *expected[2]], dtype,
                       f"{path} {sizes}")


def test_mlp_maml_weights_autograd_and_opcheck():
    params, xs, ys, xq, yq, rates, step_weights, sw, qw = maml_case([3, 4, 2], "ce", 2, seed=3)
    leaves = [p.clone().requires_grad_() for p in params]
    q, meta, lr_grads = ops.mlp_maml(leaves, xs, ys, xq, yq, rates, step_weights, activation="tanh", loss="ce",
                                     support_weights=sw, query_weights=qw)
    q.sum().backward()
    for i, (leaf, m) in enumerate(zip(leaves, meta)):
        torch.testing.assert_close(leaf.grad, m.sum(0), rtol=1e-12, atol=1e-14, msg=f"params[{i}]")
    c = codes("tanh", "ce")
    torch.library.opcheck(torch.ops.mamlext.mlp_maml.default,
                          ([p.clone().requires_grad_() for p in params], xs, ys, xq, yq, rates, step_weights, False,
                           *c, sw, qw))
    meta_args = [t.to("meta") for t in (xs, ys, xq, yq)]
    with pytest.raises(ValueError, match=r"query_weights \(one weight per row\) must be \[T, K\] = \[3, 4\]"):
        ops._mlp_maml_fake([p.to("meta") for p in params], *meta_args, [r.to("meta") for r in rates],
                           step_weights.to("meta"), False, *c, sw.to("meta"), sw.to("meta"))


def mlp_maml_on(impl, params, xs, ys, xq, yq, rates, step_weights, loss, support, query):
    """mlp_maml (second order, tanh) through one entry point: ops, reference, torch.ops or the layerwise path."""
    c = codes("tanh", loss)
    if impl == "ops":
        return ops.mlp_maml(params, xs, ys, xq, yq, rates, step_weights, activation="tanh", loss=loss,
                            support_weights=support, query_weights=query)
    if impl == "reference":
        return reference.mlp_maml(params, xs, ys, xq, yq, rates, step_weights, False, *c, support, query)
    if impl == "torch.ops":
        return torch.ops.mamlext.mlp_maml(params, xs, ys, xq, yq, rates, step_weights, False, *c, support, query)
    return torch.ops.mamlext._mlp_maml_path(params, xs, ys, xq, yq, rates, step_weights, False, *c, "layerwise", 0,
                                            support, query)


@pytest.mark.parametrize("impl", ["ops", "reference", "torch.ops", "layerwise"])
def test_mlp_maml_bad_weights_are_refused_by_name(impl):
    params, xs, ys, xq, yq, rates, step_weights, sw, qw = maml_case([3, 4, 2], "ce", 2, seed=4)
    cases = [((qw, qw), r"support_weights \(one weight per row\) must be \[T, K\] = \[3, 5\]"),
             ((sw, sw), r"query_weights \(one weight per row\) must be \[T, K\] = \[3, 4\]"),
             ((sw.clone().fill_(math.inf), qw), "support_weights must be finite"),
             ((sw, qw.float()), "query_weights")]
    for (support, query), message in cases:
        with pytest.raises(ValueError, match=message):
            mlp_maml_on(impl, params, xs, ys, xq, yq, rates, step_weights, "ce", support, query)
