"""BatchedMAML's per-row loss weights (support_weights, query_weights) on the fused MLP engine: the meta-gradient
equals a per-task autograd loop whose rows' losses are weighted (float64), adapt takes the weighted step, bad weights
are refused by name, and the generic engine refuses weights instead of ignoring them."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import mamlext

T, K, KQ, LR = 3, 5, 4, 0.3


def make_model(loss: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1 if loss == "mse" else 3)).double()


def make_data(loss: str):
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(T, K, 2, generator=g, dtype=torch.float64)
    xq = torch.randn(T, KQ, 2, generator=g, dtype=torch.float64)
    if loss == "mse":
        ys = torch.randn(T, K, 1, generator=g, dtype=torch.float64)
        yq = torch.randn(T, KQ, 1, generator=g, dtype=torch.float64)
    else:
        ys = torch.randint(0, 3, (T, K), generator=g)
        yq = torch.randint(0, 3, (T, KQ), generator=g)
    support_weights = torch.randn(T, K, generator=g, dtype=torch.float64)  # advantages: either sign
    query_weights = torch.rand(T, KQ, generator=g, dtype=torch.float64)
    return xs, ys, xq, yq, support_weights, query_weights


def weighted_loss(loss: str, out, y, w):
    """mlp_maml's weighted loss: each row's loss times its weight, then the unweighted mean's divisor."""
    if loss == "mse":
        per_element = F.mse_loss(out, y, reduction="none")
        return (per_element if w is None else per_element * w.unsqueeze(-1)).mean()
    per_row = F.cross_entropy(out, y, reduction="none")
    return (per_row if w is None else per_row * w).mean()


def loop_meta_gradient(model, loss, steps, first_order, xs, ys, xq, yq, ws, wq):
    """The per-task autograd loop: the mean over tasks of the weighted query loss after `steps` weighted steps."""
    names, params = zip(*model.named_parameters())
    total = 0.0
    for t in range(T):
        fast = list(params)
        for _ in range(steps):
            out = functional_call(model, dict(zip(names, fast)), (xs[t],))
            inner = weighted_loss(loss, out, ys[t], None if ws is None else ws[t])
            grads = torch.autograd.grad(inner, fast, create_graph=not first_order)
            fast = [p - LR * g for p, g in zip(fast, grads)]
        out = functional_call(model, dict(zip(names, fast)), (xq[t],))
        total = total + weighted_loss(loss, out, yq[t], None if wq is None else wq[t])
    return torch.autograd.grad(total / T, list(params))


def assert_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        err = (a - e).norm() / e.norm().clamp_min(1e-300)
        assert err <= 1e-9, f"{what}[{i}]: relative error {err:.3e}"


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("weighted", ["both", "support", "query"])
def test_meta_gradient_matches_the_weighted_per_task_loop(loss, first_order, weighted):
    model = make_model(loss)
    xs, ys, xq, yq, ws, wq = make_data(loss)
    ws = ws if weighted in ("both", "support") else None
    wq = wq if weighted in ("both", "query") else None
    maml = mamlext.BatchedMAML(model, inner_lr=LR, inner_steps=2, first_order=first_order, loss=loss)
    assert maml.engine == "fused_mlp"
    mean = maml.meta_loss(xs, ys, xq, yq, support_weights=ws, query_weights=wq)
    got = torch.autograd.grad(mean, list(model.parameters()))
    expected = loop_meta_gradient(model, loss, 2, first_order, xs, ys, xq, yq, ws, wq)
    assert_close(got, expected, f"{loss} first_order={first_order} weighted={weighted}")
    unweighted = maml.meta_loss(xs, ys, xq, yq)
    assert not torch.allclose(mean, unweighted), "the weights must change the meta-loss"


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_adapt_takes_the_weighted_step(loss):
    model = make_model(loss)
    xs, ys, _, _, ws, _ = make_data(loss)
    maml = mamlext.BatchedMAML(model, inner_lr=LR, loss=loss)
    adapted = maml.adapt(xs, ys, steps=1, support_weights=ws)
    names, params = zip(*model.named_parameters())
    for t in range(T):
        out = functional_call(model, dict(zip(names, params)), (xs[t],))
        grads = torch.autograd.grad(weighted_loss(loss, out, ys[t], ws[t]), params)
        assert_close([a[t] for a in adapted], [p - LR * g for p, g in zip(params, grads)], f"adapt task {t}")


@pytest.mark.parametrize("bad, error, match", [
    (torch.ones(T, K + 1, dtype=torch.float64), ValueError, r"support_weights must be \[T, K\] = \[3, 5\]"),
    (torch.ones(T, K, dtype=torch.float32), ValueError, r"support_weights must have the model's dtype"),
    (torch.full((T, K), float("nan"), dtype=torch.float64), ValueError, r"support_weights holds non-finite"),
    ([[1.0] * K] * T, TypeError, r"support_weights must be a tensor or None"),
])
def test_bad_weights_are_refused_by_name(bad, error, match):
    model = make_model("mse")
    xs, ys, xq, yq, _, wq = make_data("mse")
    maml = mamlext.BatchedMAML(model, inner_lr=LR)
    with pytest.raises(error, match=r"BatchedMAML\.meta_loss: " + match):
        maml.meta_loss(xs, ys, xq, yq, support_weights=bad, query_weights=wq)
    with pytest.raises(error, match=r"BatchedMAML\.adapt: " + match):
        maml.adapt(xs, ys, support_weights=bad)


def test_the_generic_engine_refuses_weights():
    model = make_model("mse")
    xs, ys, xq, yq, ws, wq = make_data("mse")
    maml = mamlext.BatchedMAML(model, inner_lr=LR, backend="generic")
    assert maml.engine == "generic"
    with pytest.raises(ValueError, match=r"BatchedMAML\.meta_loss: support_weights and query_weights .* fused MLP "
                                         r"engine only"):
        maml.meta_loss(xs, ys, xq, yq, query_weights=wq)
    with pytest.raises(ValueError, match=r"BatchedMAML\.adapt: support_weights and query_weights .* fused MLP"):
        maml.adapt(xs, ys, support_weights=ws)
    maml.meta_loss(xs, ys, xq, yq).backward()  # without weights it runs as before


@pytest.mark.parametrize("lr_mode", ["per_layer_step", "per_param"])
def test_unit_weights_give_the_unweighted_gradients_of_learned_rates(lr_mode):
    """Weights of 1 run the weighted path (ops.mlp_maml) and must give the unweighted path's meta-gradient, the
    learned inner rates' included."""
    model = make_model("ce")
    xs, ys, xq, yq, _, _ = make_data("ce")
    maml = mamlext.BatchedMAML(model, inner_lr=LR, inner_steps=2, loss="ce", lr_mode=lr_mode)
    leaves = list(model.parameters()) + list(maml.inner_lrs)
    unweighted = torch.autograd.grad(maml.meta_loss(xs, ys, xq, yq), leaves)
    ones = maml.meta_loss(xs, ys, xq, yq, support_weights=torch.ones(T, K, dtype=torch.float64),
                          query_weights=torch.ones(T, KQ, dtype=torch.float64))
    assert_close(torch.autograd.grad(ones, leaves), unweighted, f"unit weights, {lr_mode}")


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_meta_gradient_matches_central_differences(loss):
    """The weighted meta-loss's derivative along a random direction of the parameters, by central differences."""
    model = make_model(loss)
    xs, ys, xq, yq, ws, wq = make_data(loss)
    maml = mamlext.BatchedMAML(model, inner_lr=LR, inner_steps=2, loss=loss)
    params = list(model.parameters())
    grads = torch.autograd.grad(maml.meta_loss(xs, ys, xq, yq, support_weights=ws, query_weights=wq), params)
    direction = [torch.randn_like(p) for p in params]
    eps = 1e-5

    def shifted(sign):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            value = maml.meta_loss(xs, ys, xq, yq, support_weights=ws, query_weights=wq)
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return value

    finite_difference = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    assert abs(float(finite_difference - analytic)) <= 1e-7 * max(1.0, abs(float(analytic)))
