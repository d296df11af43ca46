"""iMAML: the meta-gradient against a dense solve (H_t built with torch.autograd.functional.hessian at the same
phi_t, (I + H_t / lam) x = grad L_query solved by torch.linalg.solve), the inner solve against a plain per-task
autograd loop, the CG step count, and every bad input."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import mamlext
from mamlext import iMAML, ops

from conftest import DEVICES
from mlp_cases import make_tasks, mlp

LOSS_FNS = {"mse": F.mse_loss, "ce": F.cross_entropy}


def num_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# The oracles


def plain_inner(model, xs, ys, loss, lr, lam, steps):
    """Each task on its own: `steps` steps of gradient descent on L_support(phi) + lam/2 ||phi - theta||^2 with
    autograd on the module. Returns P tensors [T, *S_i]."""
    fn = LOSS_FNS[loss]
    theta = {k: p.detach() for k, p in model.named_parameters()}
    per_task = []
    for t in range(xs.shape[0]):
        phi = {k: p.clone() for k, p in theta.items()}
        for _ in range(steps):
            leaves = {k: p.requires_grad_() for k, p in phi.items()}
            objective = fn(functional_call(model, leaves, (xs[t],)), ys[t])
            objective = objective + lam / 2 * sum(((leaves[k] - theta[k]) ** 2).sum() for k in theta)
            grads = torch.autograd.grad(objective, list(leaves.values()))
            phi = {k: (p - lr * g).detach() for (k, p), g in zip(leaves.items(), grads)}
        per_task.append(list(phi.values()))
    return [torch.stack(ps) for ps in zip(*per_task)]


def dense_meta_gradients(model, phi, xs, ys, xq, yq, loss, lam):
    """Per task: (I + H_t / lam)^{-1} grad L_query(phi_t), H_t the dense Hessian of the support loss at phi_t.
    Returns [T, n] (flat, in model.parameters() order)."""
    fn = LOSS_FNS[loss]
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    n = num_params(model)

    def unflatten(v):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    out = []
    for t in range(xs.shape[0]):
        flat = torch.cat([p[t].reshape(-1) for p in phi]).detach()
        hessian = torch.autograd.functional.hessian(
            lambda v: fn(functional_call(model, unflatten(v), (xs[t],)), ys[t]), flat)
        leaf = flat.clone().requires_grad_()
        query_grad, = torch.autograd.grad(fn(functional_call(model, unflatten(leaf), (xq[t],)), yq[t]), leaf)
        eye = torch.eye(n, dtype=flat.dtype, device=flat.device)
        out.append(torch.linalg.solve(eye + hessian / lam, query_grad))
    return torch.stack(out)


def query_losses(model, phi, xq, yq, loss):
    names = [k for k, _ in model.named_parameters()]
    fn = LOSS_FNS[loss]
    return torch.stack([fn(functional_call(model, {k: p[t] for k, p in zip(names, phi)}, (xq[t],)), yq[t])
                        for t in range(xq.shape[0])])


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def rel_error(actual, expected):
    """Normwise: max|a - e| / max|e|."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# "ops": whatever ops.* routes to (the compiled kernels where built); "reference": the pure-PyTorch twins forced.
@pytest.fixture(params=["ops", "reference"])
def path(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(ops, "_compiled", lambda name, device: False)
    return request.param


# widths, activation, loss, tasks, shots, queries, inner_lr, inner_steps, lam
CASES = {
    "1-3-1-tanh-mse": ([1, 3, 1], "tanh", "mse", 4, 5, 4, 0.1, 5, 0.5),
    "2-4-3-tanh-ce": ([2, 4, 3], "tanh", "ce", 3, 6, 5, 0.2, 4, 0.3),
    "2-3-3-2-gelu-ce": ([2, 3, 3, 2], "gelu", "ce", 2, 7, 3, 0.1, 3, 2.0),
}


def build(case, device, dtype=torch.float64, seed=0, cg_steps=None):
    widths, act, loss, tasks, shots, queries, lr, steps, lam = CASES[case]
    torch.manual_seed(seed)
    model = mlp(widths, act).to(device=device, dtype=dtype)
    imaml = iMAML(model, inner_lr=lr, inner_steps=steps, lam=lam,
                  cg_steps=num_params(model) if cg_steps is None else cg_steps, loss=loss)
    gen = torch.Generator().manual_seed(seed + 1)
    data = make_tasks(widths, tasks, shots, queries, loss, dtype, device, gen)
    return imaml, data


# ----------------------------------------------------------------------------------------------------------------
# Correctness


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_meta_gradient_equals_dense_solve(case, device, path):
    imaml, (xs, ys, xq, yq) = build(case, device)
    model, loss, lam = imaml.model, imaml.loss, imaml.lam
    meta = imaml.meta_loss(xs, ys, xq, yq)
    assert meta.dim() == 0 and meta.dtype == torch.float64 and meta.requires_grad
    meta.backward()

    phi = imaml.adapt(xs, ys)
    expected = dense_meta_gradients(model, phi, xs, ys, xq, yq, loss, lam)
    assert rel_error(flat_grad(model), expected.mean(0)) <= 1e-8
    # the implicit gradient is not the plain query gradient: the Hessian term matters here
    leaves = [p.clone().requires_grad_() for p in phi]
    plain = torch.autograd.grad(query_losses(model, leaves, xq, yq, loss).sum(), leaves)
    plain = torch.cat([g.flatten(1) for g in plain], dim=1).mean(0)  # mean_t grad L_query(phi_t)
    assert rel_error(plain, expected.mean(0)) > 1e-3

    losses = query_losses(model, phi, xq, yq, loss).detach()
    assert imaml.last_task_losses.shape == (xs.shape[0],) and not imaml.last_task_losses.requires_grad
    assert rel_error(imaml.last_task_losses, losses) <= 1e-12
    assert abs(meta.item() - losses.mean().item()) <= 1e-12 * abs(losses.mean().item())
    assert imaml.last_cg_residuals.shape == (xs.shape[0],) and (imaml.last_cg_residuals < 1e-6).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_inner_solve_equals_plain_loop(case, device, path):
    imaml, (xs, ys, _, _) = build(case, device)
    expected = plain_inner(imaml.model, xs, ys, imaml.loss, imaml.inner_lr, imaml.lam, imaml.inner_steps)
    got = imaml.adapt(xs, ys)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and not g.requires_grad
        assert rel_error(g, e) <= 1e-12
    two = imaml.adapt(xs, ys, steps=2)
    for g, e in zip(two, plain_inner(imaml.model, xs, ys, imaml.loss, imaml.inner_lr, imaml.lam, 2)):
        assert rel_error(g, e) <= 1e-12
    for g, p in zip(imaml.adapt(xs, ys, steps=0), imaml.model.parameters()):  # steps=0: theta for every task
        assert torch.equal(g, p.detach().expand_as(g))
    out = imaml.predict(got, xs)
    assert out.shape == (xs.shape[0], xs.shape[1], imaml._layers[-1].out_features)


def test_fewer_cg_steps_give_a_worse_but_finite_answer():
    case = "2-4-3-tanh-ce"
    full, (xs, ys, xq, yq) = build(case, "cpu")
    expected = dense_meta_gradients(full.model, full.adapt(xs, ys), xs, ys, xq, yq, full.loss, full.lam).mean(0)
    errors, residuals = [], []
    for steps in (1, 2, 4, num_params(full.model)):
        imaml, data = build(case, "cpu", cg_steps=steps)
        imaml.meta_loss(*data).backward()
        grad = flat_grad(imaml.model)
        assert torch.isfinite(grad).all()
        errors.append(rel_error(grad, expected))
        residuals.append(imaml.last_cg_residuals.max().item())
    assert errors[-1] <= 1e-8
    assert min(errors[:3]) > 1e-3, errors  # (CG decreases the A-norm of the error, not this norm, monotonically)
    assert residuals[0] > 1e-3 and residuals[-1] < 1e-6, residuals


def test_more_cg_steps_than_parameters_stay_exact():
    """Past convergence the residual is (nearly) 0; the lockstep CG must not divide 0 by 0."""
    imaml, data = build("1-3-1-tanh-mse", "cpu", cg_steps=40)
    imaml.meta_loss(*data).backward()
    grad = flat_grad(imaml.model)
    assert torch.isfinite(grad).all()
    xs, ys, xq, yq = data
    expected = dense_meta_gradients(imaml.model, imaml.adapt(xs, ys), xs, ys, xq, yq, imaml.loss, imaml.lam)
    assert rel_error(grad, expected.mean(0)) <= 1e-8


def test_zero_right_hand_side_task():
    """A task whose right-hand side (query gradient) is exactly 0 gets x_t = 0 and a residual 0, with no 0 / 0 in
    the lockstep CG of the others."""
    imaml, (xs, ys, _, _) = build("1-3-1-tanh-mse", "cpu")
    phi = imaml.adapt(xs, ys)
    gen = torch.Generator().manual_seed(5)
    b = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in phi]
    for bi in b:
        bi[1] = 0
    x, residuals = imaml._solve(phi, b, xs, ys, [True] * len(phi))
    assert all(torch.isfinite(xi).all() and (xi[1] == 0).all() for xi in x)
    assert residuals[1] == 0 and (residuals < 1e-6).all()
    # each other task: (I + H_t / lam) x_t = b_t
    hx = ops.mlp_hvp(phi, x, xs, ys, imaml.activation, imaml.act_param, imaml.loss)
    for xi, hi, bi in zip(x, hx, b):
        assert rel_error(xi + hi / imaml.lam, bi) <= 1e-6


def test_float32_close_to_float64():
    imaml64, data = build("2-4-3-tanh-ce", "cpu")
    imaml32 = copy.deepcopy(imaml64).float()
    imaml64.meta_loss(*data).backward()
    data32 = [d.float() if d.is_floating_point() else d for d in data]
    loss32 = imaml32.meta_loss(*data32)
    assert loss32.dtype == torch.float32
    loss32.backward()
    assert rel_error(flat_grad(imaml32.model), flat_grad(imaml64.model)) <= 1e-4


def test_gradients_accumulate_and_data_gets_none():
    imaml, (xs, ys, xq, yq) = build("1-3-1-tanh-mse", "cpu")
    xs.requires_grad_()
    imaml.meta_loss(xs, ys, xq, yq).backward()
    once = flat_grad(imaml.model).clone()
    imaml.meta_loss(xs, ys, xq, yq).backward()
    assert torch.allclose(flat_grad(imaml.model), 2 * once, rtol=1e-12, atol=0)
    assert xs.grad is None
    # a weighted sum of the per-task losses is served too (the custom Function's backward sums go_t * g_t)
    imaml.model.zero_grad()
    phi = imaml.adapt(xs.detach(), ys)
    per_task = dense_meta_gradients(imaml.model, phi, xs.detach(), ys, xq, yq, imaml.loss, imaml.lam)
    (imaml.meta_loss(xs, ys, xq, yq) * 3.0).backward()
    assert rel_error(flat_grad(imaml.model), 3.0 * per_task.mean(0)) <= 1e-8


def test_public_api():
    assert mamlext.iMAML is mamlext.algorithms.iMAML is iMAML
    assert "iMAML" in mamlext.__all__
    imaml = iMAML(mlp([2, 3, 1], "relu"))
    assert (imaml.inner_lr, imaml.inner_steps, imaml.lam, imaml.cg_steps, imaml.loss) == (0.01, 5, 1.0, 5, "mse")
    assert imaml.engine == "fused_mlp" and "lam=1.0" in repr(imaml)
    x = torch.randn(4, 2)
    assert torch.equal(imaml(x), imaml.model(x))
    assert [id(p) for p in imaml.parameters()] == [id(p) for p in imaml.model.parameters()]


# ----------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(lam=0.0), ValueError, r"iMAML: lam must be a finite float > 0, got 0\.0"),
    (dict(lam=-1.0), ValueError, r"iMAML: lam must be a finite float > 0"),
    (dict(lam=float("nan")), ValueError, r"iMAML: lam must be a finite float > 0"),
    (dict(lam="1"), ValueError, r"iMAML: lam must be a finite float > 0"),
    (dict(inner_lr=float("inf")), ValueError, r"iMAML: inner_lr must be a finite float > 0"),
    (dict(inner_lr=0), ValueError, r"iMAML: inner_lr must be a finite float > 0"),
    (dict(inner_lr=True), ValueError, r"iMAML: inner_lr must be a finite float > 0"),
    (dict(inner_steps=0), ValueError, r"iMAML: inner_steps must be an int >= 1, got 0"),
    (dict(inner_steps=2.0), ValueError, r"iMAML: inner_steps must be an int >= 1"),
    (dict(cg_steps=0), ValueError, r"iMAML: cg_steps must be an int >= 1, got 0"),
    (dict(cg_steps=True), ValueError, r"iMAML: cg_steps must be an int >= 1"),
    (dict(loss="l1"), ValueError, r"iMAML: loss must be one of \['mse', 'ce'\], got 'l1'"),
    (dict(backend="torch"), ValueError, r"iMAML: backend must be one of \['auto', 'fused'\], got 'torch'"),
])
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        iMAML(mlp([2, 3, 1], "relu"), **kwargs)


def test_unsupported_models():
    with pytest.raises(TypeError, match=r"iMAML: model must be an nn.Module, got function"):
        iMAML(lambda x: x)
    conv = nn.Sequential(nn.Linear(2, 3), nn.Softplus(), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"iMAML\(backend='fused'\): the fused_mlp engine cannot serve this model: "
                                         r"layer 1 \(Softplus\): unsupported layer type"):
        iMAML(conv, backend="fused")
    with pytest.raises(ValueError, match=r"iMAML: no engine serves this model \(fused_mlp: layer 1"):
        iMAML(conv)


def _bad(loss):
    gen = torch.Generator().manual_seed(0)
    return make_tasks([3, 4, 2], 2, 3, 3, loss, torch.float64, "cpu", gen)


@pytest.mark.parametrize("loss, change, message", [
    ("mse", lambda d: (d[0][..., :2], *d[1:]), r"xs must be \[T, K, in\] with in = 3"),
    ("mse", lambda d: (d[0][0], *d[1:]), r"xs must be \[T, K, in\] = \[T, K, 3\] \(3 dimensions\)"),
    ("mse", lambda d: (d[0].float(), *d[1:]), r"xs has dtype torch.float32 but the model's parameters are"),
    ("mse", lambda d: (d[0], d[1][:, :2], *d[2:]), r"ys must be \[T, K, out\] = \[2, 3, 2\]"),
    ("mse", lambda d: (*d[:2], d[2][:1], d[3][:1]), r"xs has T = 2 tasks but xq has 1"),
    ("mse", lambda d: (*d[:3], d[3] * float("nan")), r"yq holds non-finite values"),
    ("mse", lambda d: (d[0], d[1].tolist(), *d[2:]), r"ys must be a tensor, got list"),
    ("ce", lambda d: (*d[:3], d[3] + 5), r"yq holds the class index \d+, outside \[0, 2\)"),
    ("ce", lambda d: (d[0], d[1].double(), *d[2:]), r"ys must hold int64 class indices for loss 'ce'"),
])
def test_bad_meta_loss_inputs(loss, change, message):
    imaml = iMAML(mlp([3, 4, 2], "tanh").double(), loss=loss)
    with pytest.raises((ValueError, TypeError), match=r"iMAML\.meta_loss: " + message):
        imaml.meta_loss(*change(_bad(loss)))


def test_bad_adapt_and_predict_inputs():
    imaml = iMAML(mlp([3, 4, 2], "tanh").double())
    xs, ys, _, _ = _bad("mse")
    with pytest.raises(ValueError, match=r"iMAML\.adapt: steps must be an int >= 0, got -1"):
        imaml.adapt(xs, ys, steps=-1)
    with pytest.raises(ValueError, match=r"iMAML\.adapt: ys must be \[T, K, out\]"):
        imaml.adapt(xs, ys[..., :1])
    phi = imaml.adapt(xs, ys)
    with pytest.raises(ValueError, match=r"iMAML\.predict: adapted must hold one tensor per parameter \(4\), got 3"):
        imaml.predict(phi[:3], xs)
