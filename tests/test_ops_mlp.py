"""mlp_loss_grad, mlp_hvp, mlp_maml: the ops (compiled where built, else the reference) and the reference twins
against oracles written here with torch.autograd on an nn.Sequential (per task, one at a time); gradients of the
wrappers (gradcheck); fake implementations and op registration; every bad input."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from mamlext import _ext, ops, reference
from mamlext._checks import task_shapes
from mamlext._mlp_codes import ACTIVATIONS, LOSSES

from conftest import DEVICES

ACTS = list(ACTIVATIONS)
ACT_PARAM = {"leaky_relu": 0.07, "elu": 0.8}
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
OPS = ("mlp_loss_grad", "mlp_hvp", "mlp_maml")


def compiled_op(name):
    return _ext._C is not None and hasattr(torch.ops.mamlext, name)


def requires_op(name):
    return pytest.mark.skipif(not compiled_op(name), reason=f"compiled op mamlext::{name} is not built "
                              "(its C++ kernel has not landed in this build): only the reference path is tested")


IMPLS = ["ops", "reference", "torch.ops"]


def call(impl, name, *args):
    """The op `name` through the typed wrapper, the reference twin or the registered op (codes in args)."""
    if impl == "torch.ops":
        if not compiled_op(name):
            pytest.skip(f"compiled op mamlext::{name} is not built")
        return getattr(torch.ops.mamlext, name)(*args)
    return getattr(ops if impl == "ops" else reference, name)(*args)


# ----------------------------------------------------------------------------------------------------------------
# Cases and oracles


def act_module(act):
    return {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(ACT_PARAM["leaky_relu"]), "tanh": nn.Tanh(),
            "sigmoid": nn.Sigmoid(), "gelu": nn.GELU(), "elu": nn.ELU(ACT_PARAM["elu"])}[act]


def torch_mlp(sizes, act):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 2 < len(sizes):
            layers.append(act_module(act))
    return nn.Sequential(*layers)


def loss_fn(loss):
    return F.mse_loss if loss == "mse" else F.cross_entropy


def codes(act, loss):
    return ACTIVATIONS[act], ACT_PARAM.get(act, 0.0), LOSSES[loss]


def rand(gen, *shape, dtype=torch.float64, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def make_params(sizes, tasks, dtype, device, gen, per_task=()):
    """[W_1, b_1, ...], nn.Linear-like scale; indices in per_task get a leading task dimension."""
    params = []
    for layer in range(len(sizes) - 1):
        for j, shape in enumerate(((sizes[layer + 1], sizes[layer]), (sizes[layer + 1],))):
            lead = (tasks,) if 2 * layer + j in per_task else ()
            params.append(rand(gen, *lead, *shape, dtype=dtype, device=device, scale=1.0 / math.sqrt(sizes[layer])))
    return params


def make_data(sizes, tasks, rows, loss, dtype, device, gen):
    x = rand(gen, tasks, rows, sizes[0], dtype=dtype, device=device)
    if loss == "mse":
        y = rand(gen, tasks, rows, sizes[-1], dtype=dtype, device=device)
    else:
        y = torch.randint(0, sizes[-1], (tasks, rows), generator=gen).to(device)
    return x, y


def task_params(params, t):
    return [p[t] if p.dim() == (3 if i % 2 == 0 else 2) else p for i, p in enumerate(params)]


def named(model, params):
    return dict(zip([name for name, _ in model.named_parameters()], params))


def oracle_loss_grad(sizes, act, loss, params, x, y):
    """Per task, in float64: the loss of the nn.Sequential and torch.autograd.grad of it."""
    model = torch_mlp(sizes, act).double().to(x.device)
    losses, grads = [], [[] for _ in params]
    for t in range(x.shape[0]):
        ps = [p.double().clone().requires_grad_() for p in task_params(params, t)]
        value = loss_fn(loss)(functional_call(model, named(model, ps), (x[t].double(),)),
                              y[t] if loss == "ce" else y[t].double())
        for i, g in enumerate(torch.autograd.grad(value, ps)):
            grads[i].append(g)
        losses.append(value.detach())
    return torch.stack(losses), [torch.stack(g) for g in grads]


def oracle_hvp(sizes, act, loss, params, vectors, x, y):
    """Per task, in float64: d/dp <grad L_t(p), v_t> by double backward."""
    model = torch_mlp(sizes, act).double().to(x.device)
    out = [[] for _ in params]
    for t in range(x.shape[0]):
        ps = [p.double().clone().requires_grad_() for p in task_params(params, t)]
        value = loss_fn(loss)(functional_call(model, named(model, ps), (x[t].double(),)),
                              y[t] if loss == "ce" else y[t].double())
        grads = torch.autograd.grad(value, ps, create_graph=True)
        dot = sum((g * v[t].double()).sum() for g, v in zip(grads, vectors))
        for i, h in enumerate(torch.autograd.grad(dot, ps, allow_unused=True)):
            out[i].append(torch.zeros_like(ps[i]) if h is None else h)
    return [torch.stack(o) for o in out]


def oracle_maml(sizes, act, loss, params, xs, ys, xq, yq, lrs, weights, first_order):
    """Plain MAML per task with create_graph autograd on the nn.Sequential, in float64: the weighted query loss and
    its gradients w.r.t. the initial parameters and the rates."""
    model = torch_mlp(sizes, act).double().to(xs.device)
    fn = loss_fn(loss)
    out_losses, meta, lr_grads = [], [[] for _ in params], [[] for _ in params]
    for t in range(xs.shape[0]):
        theta = [p.double().clone().requires_grad_() for p in params]
        alpha = [r.double().clone().requires_grad_() for r in lrs]
        fast = theta
        total = 0.0
        for k, w in enumerate(weights):
            value = fn(functional_call(model, named(model, fast), (xs[t].double(),)),
                       ys[t] if loss == "ce" else ys[t].double())
            grads = torch.autograd.grad(value, fast, create_graph=not first_order, retain_graph=True)
            fast = [p - a[k] * g for p, a, g in zip(fast, alpha, grads)]
            if w != 0:
                total = total + w * fn(functional_call(model, named(model, fast), (xq[t].double(),)),
                                       yq[t] if loss == "ce" else yq[t].double())
        if isinstance(total, float):
            out_losses.append(torch.zeros((), dtype=torch.float64, device=xs.device))
            derivs = [None] * (2 * len(params))
        else:
            out_losses.append(total.detach())
            derivs = torch.autograd.grad(total, theta + alpha, allow_unused=True)
        for i in range(len(params)):
            d, r = derivs[i], derivs[len(params) + i]
            meta[i].append(torch.zeros_like(theta[i]) if d is None else d)
            lr_grads[i].append(torch.zeros_like(alpha[i]) if r is None else r)
    return torch.stack(out_losses), [torch.stack(m) for m in meta], [torch.stack(r) for r in lr_grads]


def assert_rel(actual, expected, dtype, what):
    """Normwise relative error per tensor: max|a - e| <= rtol * max(max|e|, 1e-6)."""
    actual = [actual] if isinstance(actual, torch.Tensor) else list(actual)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}[{i}]: shape {list(a.shape)} != {list(e.shape)}"
        assert a.dtype == dtype, f"{what}[{i}]: dtype {a.dtype}"
        assert a.is_contiguous(), f"{what}[{i}] is not contiguous"
        if not e.numel():
            continue
        err = (a.double() - e.double()).abs().max().item()
        scale = max(e.abs().max().item(), 1e-6)
        assert err <= RTOL[dtype] * scale, f"{what}[{i}]: max error {err:.3e}, scale {scale:.3e}"


# (sizes, per-task parameter indices)
ARCHS = [([3, 5, 4], ()), ([2, 7, 6, 3], (0, 3, 5)), ([4, 3], (0, 1)), ([1, 9, 9, 9, 2], (2,))]


# ----------------------------------------------------------------------------------------------------------------
# Values against the oracles


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("act", ACTS)
def test_mlp_loss_grad_matches_oracle(device, impl, dtype, loss, act):
    gen = torch.Generator().manual_seed(1)
    for sizes, per_task in ARCHS:
        params = make_params(sizes, 4, dtype, device, gen, per_task)
        x, y = make_data(sizes, 4, 6, loss, dtype, device, gen)
        losses, grads = call(impl, "mlp_loss_grad", params, x, y, *codes(act, loss))
        e_losses, e_grads = oracle_loss_grad(sizes, act, loss, params, x, y)
        assert_rel(losses, e_losses, dtype, f"{sizes} losses")
        assert_rel(grads, e_grads, dtype, f"{sizes} grads")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("act", ACTS)
def test_mlp_hvp_matches_oracle(device, impl, dtype, loss, act):
    gen = torch.Generator().manual_seed(2)
    for sizes, per_task in ARCHS:
        params = make_params(sizes, 3, dtype, device, gen, per_task)
        x, y = make_data(sizes, 3, 5, loss, dtype, device, gen)
        vectors = [rand(gen, *s, dtype=dtype, device=device) for s in task_shapes(params, 3)]
        out = call(impl, "mlp_hvp", params, vectors, x, y, *codes(act, loss))
        assert_rel(out, oracle_hvp(sizes, act, loss, params, vectors, x, y), dtype, f"{sizes} hvp")


def test_mlp_hvp_matches_torch_func_hessian():
    """H v against the full Hessian of torch.func.hessian (one task, flattened parameters)."""
    gen = torch.Generator().manual_seed(3)
    sizes = [2, 4, 3]
    params = make_params(sizes, 1, torch.float64, "cpu", gen)
    x, y = make_data(sizes, 1, 5, "ce", torch.float64, "cpu", gen)
    vectors = [rand(gen, 1, *p.shape) for p in params]
    numels = [p.numel() for p in params]

    def flat_loss(flat):
        ps = [c.view(p.shape) for c, p in zip(flat.split(numels), params)]
        return reference.mlp_task_loss(reference.mlp_forward(ps, x[0], ACTIVATIONS["gelu"], 0.0), y[0], 1)

    hessian = torch.func.hessian(flat_loss)(torch.cat([p.reshape(-1) for p in params]))
    expected = hessian @ torch.cat([v.reshape(-1) for v in vectors])
    out = ops.mlp_hvp(params, vectors, x, y, "gelu", loss="ce")
    torch.testing.assert_close(torch.cat([o.reshape(-1) for o in out]), expected, rtol=1e-10, atol=1e-12)


MAML_CASES = [
    # (act, loss, sizes, steps, lr form, weights)
    ("relu", "mse", [1, 40, 40, 1], 1, "per_step", None),
    ("leaky_relu", "ce", [3, 6, 5], 2, "per_element", None),
    ("tanh", "mse", [2, 8, 8, 3], 3, "per_step", [0.2, 0.0, 1.0]),
    ("sigmoid", "ce", [4, 3], 2, "per_element", [0.5, 0.5]),
    ("gelu", "mse", [3, 5, 4, 6, 2], 2, "per_element", [0.0, 1.0]),
    ("elu", "ce", [2, 7, 4], 3, "per_step", [1.0, 0.0, 0.3]),
    ("gelu", "ce", [5, 9, 3], 1, "per_element", [2.0]),
    ("tanh", "ce", [3, 4, 4], 4, "mixed", [0.1, 0.2, 0.3, 0.4]),
    ("relu", "ce", [2, 16, 16, 5], 2, "mixed", None),
    ("leaky_relu", "mse", [6, 5, 1], 5, "per_step", [0.0, 0.0, 1.0, 0.0, 1.0]),
    ("sigmoid", "mse", [1, 12, 12, 1], 2, "mixed", [1.0, 1.0]),
    ("elu", "mse", [3, 1, 2], 1, "per_step", None),
]


def make_rates(params, steps, form, dtype, device, gen):
    rates = []
    for i, p in enumerate(params):
        per_element = form == "per_element" or (form == "mixed" and i % 2 == 0)
        shape = (steps, *p.shape) if per_element else (steps,)
        rates.append((0.05 + 0.3 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(device=device,
                                                                                              dtype=dtype))
    return rates


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("case", range(len(MAML_CASES)))
def test_mlp_maml_matches_oracle(device, impl, dtype, first_order, case):
    act, loss, sizes, steps, form, weights = MAML_CASES[case]
    gen = torch.Generator().manual_seed(10 + case)
    tasks = 1 + case % 4
    params = make_params(sizes, tasks, dtype, device, gen)
    xs, ys = make_data(sizes, tasks, 1 + (3 * case) % 7, loss, dtype, device, gen)
    xq, yq = make_data(sizes, tasks, 2 + case % 5, loss, dtype, device, gen)
    lrs = make_rates(params, steps, form, dtype, device, gen)
    weights = [0.0] * (steps - 1) + [1.0] if weights is None else weights
    w = torch.tensor(weights, dtype=dtype, device=device)
    losses, meta, lr_grads = call(impl, "mlp_maml", params, xs, ys, xq, yq, lrs, w, first_order,
                                  *codes(act, loss))
    e_losses, e_meta, e_lr = oracle_maml(sizes, act, loss, params, xs, ys, xq, yq, lrs, weights, first_order)
    assert_rel(losses, e_losses, dtype, "query_losses")
    assert_rel(meta, e_meta, dtype, "meta_grads")
    assert_rel(lr_grads, e_lr, dtype, "lr_grads")


def test_second_order_differs_from_first_order():
    """Otherwise the tests above could not tell the two apart."""
    gen = torch.Generator().manual_seed(4)
    sizes = [2, 6, 3]
    params = make_params(sizes, 2, torch.float64, "cpu", gen)
    xs, ys = make_data(sizes, 2, 5, "mse", torch.float64, "cpu", gen)
    so = ops.mlp_maml(params, xs, ys, xs, ys, 0.3, [1.0, 1.0], False, "tanh")[1][0]
    fo = ops.mlp_maml(params, xs, ys, xs, ys, 0.3, [1.0, 1.0], True, "tanh")[1][0]
    assert ((so - fo).norm() / so.norm()).item() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mlp_maml_all_zero_weights(device, impl):
    gen = torch.Generator().manual_seed(5)
    sizes = [2, 3, 2]
    params = make_params(sizes, 2, torch.float64, device, gen)
    xs, ys = make_data(sizes, 2, 3, "mse", torch.float64, device, gen)
    lrs = make_rates(params, 2, "per_step", torch.float64, device, gen)
    w = torch.zeros(2, dtype=torch.float64, device=device)
    losses, meta, lr_grads = call(impl, "mlp_maml", params, xs, ys, xs, ys, lrs, w, False, *codes("relu", "mse"))
    assert losses.tolist() == [0.0, 0.0]
    assert all(not m.any() for m in meta) and all(not r.any() for r in lr_grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tasks", [0, 1])
def test_task_counts(device, impl, tasks):
    gen = torch.Generator().manual_seed(6)
    sizes = [3, 4, 2]
    params = make_params(sizes, tasks, torch.float64, device, gen)
    x, y = make_data(sizes, tasks, 2, "ce", torch.float64, device, gen)
    c = codes("tanh", "ce")
    losses, grads = call(impl, "mlp_loss_grad", params, x, y, *c)
    assert losses.shape == (tasks,) and [list(g.shape) for g in grads] == [[tasks, *p.shape] for p in params]
    vectors = [torch.ones(tasks, *p.shape, dtype=torch.float64, device=device) for p in params]
    assert [o.shape for o in call(impl, "mlp_hvp", params, vectors, x, y, *c)] == [v.shape for v in vectors]
    lrs = [torch.full((2,), 0.1, dtype=torch.float64, device=device) for _ in params]
    w = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    losses, meta, lr_grads = call(impl, "mlp_maml", params, x, y, x, y, lrs, w, False, *c)
    assert losses.shape == (tasks,)
    assert [list(m.shape) for m in meta] == [[tasks, *p.shape] for p in params]
    assert [list(r.shape) for r in lr_grads] == [[tasks, 2]] * len(params)
    if tasks:
        e = oracle_maml(sizes, "tanh", "ce", params, x, y, x, y, lrs, [0.0, 1.0], False)
        assert_rel(meta, e[1], torch.float64, "meta_grads")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_degenerate_shapes(impl, loss):
    """No rows (K = 0): nan losses (the mean of nothing, as F.mse_loss), zero gradients, adaptation that does not
    move; an empty hidden layer; step_weights of any shape and floating dtype (its elements in order)."""
    gen = torch.Generator().manual_seed(14)
    sizes = [3, 4, 2]
    params = make_params(sizes, 2, torch.float64, "cpu", gen)
    c = codes("tanh", loss)
    x, y = make_data(sizes, 2, 0, loss, torch.float64, "cpu", gen)
    xq, yq = make_data(sizes, 2, 3, loss, torch.float64, "cpu", gen)
    losses, grads = call(impl, "mlp_loss_grad", params, x, y, *c)
    assert losses.isnan().all() and all(not g.any() for g in grads)
    vectors = [torch.ones(2, *p.shape, dtype=torch.float64) for p in params]
    assert all(not h.any() for h in call(impl, "mlp_hvp", params, vectors, x, y, *c))
    lrs = [torch.full((2,), 0.1, dtype=torch.float64) for _ in params]
    w = torch.tensor([[0.0, 1.0]], dtype=torch.float32)  # [1, 2] float32: N = 2
    q, meta, lr_grads = call(impl, "mlp_maml", params, x, y, xq, yq, lrs, w, False, *c)
    e = oracle_maml(sizes, "tanh", loss, params, x, y, xq, yq, lrs, [0.0, 1.0], False)
    assert_rel(q, e[0], torch.float64, "query_losses")
    assert_rel(meta, e[1], torch.float64, "meta_grads")
    assert all(not r.any() for r in lr_grads)
    empty = [torch.randn(0, 3, dtype=torch.float64), torch.randn(0, dtype=torch.float64),
             torch.randn(2, 0, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]
    x, y = make_data([3, 0, 2], 2, 4, loss, torch.float64, "cpu", gen)
    losses, grads = call(impl, "mlp_loss_grad", empty, x, y, *c)
    e_losses, e_grads = oracle_loss_grad([3, 0, 2], "tanh", loss, empty, x, y)
    assert_rel(losses, e_losses, torch.float64, "losses")
    assert_rel(grads, e_grads, torch.float64, "grads")


# ----------------------------------------------------------------------------------------------------------------
# The typed wrappers: names, defaults, rate forms


def test_wrapper_names_codes_and_default_act_param():
    gen = torch.Generator().manual_seed(7)
    sizes = [2, 5, 3]
    params = make_params(sizes, 2, torch.float64, "cpu", gen)
    x, y = make_data(sizes, 2, 4, "mse", torch.float64, "cpu", gen)
    by_name = ops.mlp_loss_grad(params, x, y, "leaky_relu")
    by_code = ops.mlp_loss_grad(params, x, y, ACTIVATIONS["leaky_relu"], 0.01, LOSSES["mse"])
    torch.testing.assert_close(by_name[0], by_code[0], rtol=0, atol=0)
    model = nn.Sequential(nn.Linear(2, 5), nn.LeakyReLU(), nn.Linear(5, 3)).double()  # default slope 0.01
    expected = [F.mse_loss(functional_call(model, named(model, params), (x[t],)), y[t]) for t in range(2)]
    torch.testing.assert_close(by_name[0], torch.stack(expected), rtol=1e-12, atol=0)
    elu = ops.mlp_loss_grad(params, x, y, "elu")[0]
    model = nn.Sequential(nn.Linear(2, 5), nn.ELU(), nn.Linear(5, 3)).double()  # default alpha 1.0
    expected = [F.mse_loss(functional_call(model, named(model, params), (x[t],)), y[t]) for t in range(2)]
    torch.testing.assert_close(elu, torch.stack(expected), rtol=1e-12, atol=0)


def test_mlp_maml_rate_forms_and_default_weights():
    """A float, a scalar tensor, per-tensor scalars and [N] tensors of the same value give the same result; the
    default step_weights is [0, ..., 0, 1] with N from the rates."""
    gen = torch.Generator().manual_seed(8)
    sizes = [2, 5, 3]
    params = make_params(sizes, 1, torch.float64, "cpu", gen)
    xs, ys = make_data(sizes, 3, 4, "ce", torch.float64, "cpu", gen)
    xq, yq = make_data(sizes, 3, 2, "ce", torch.float64, "cpu", gen)
    base = ops.mlp_maml(params, xs, ys, xq, yq, [torch.full((3,), 0.2, dtype=torch.float64)] * 4, None,
                        False, "sigmoid", loss="ce")
    w = [0.0, 0.0, 1.0]
    for lrs in (0.2, torch.tensor(0.2, dtype=torch.float64), [torch.tensor(0.2, dtype=torch.float64)] * 4):
        out = ops.mlp_maml(params, xs, ys, xq, yq, lrs, w, False, "sigmoid", loss="ce")
        torch.testing.assert_close(out[0], base[0], rtol=1e-13, atol=0)
        for a, b in zip(out[1], base[1]):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_mlp_loss_grad_outputs_and_autograd_contract():
    """losses differentiable w.r.t. params through the returned grads; grads and meta_grads have no graph."""
    gen = torch.Generator().manual_seed(9)
    sizes = [2, 4, 2]
    params = [p.requires_grad_() for p in make_params(sizes, 3, torch.float64, "cpu", gen, per_task=(1,))]
    x, y = make_data(sizes, 3, 4, "mse", torch.float64, "cpu", gen)
    losses, grads = ops.mlp_loss_grad(params, x, y, "tanh")
    assert losses.requires_grad and not any(g.requires_grad for g in grads)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (losses * weights).sum().backward()
    for i, (p, g) in enumerate(zip(params, grads)):
        expected = (weights.view(-1, *[1] * (g.dim() - 1)) * g)
        torch.testing.assert_close(p.grad, expected if i == 1 else expected.sum(0))
    shared = [p.requires_grad_() for p in make_params(sizes, 3, torch.float64, "cpu", gen)]
    q, meta, lr_grads = ops.mlp_maml(shared, x, y, x, y, torch.tensor(0.1, dtype=torch.float64, requires_grad=True))
    assert q.requires_grad and not any(m.requires_grad for m in meta + lr_grads)


def test_mlp_maml_backward_is_not_differentiable():
    """The meta-gradient has no third derivatives: a create_graph backward says so instead of returning a graph
    that silently lacks them (the compiled op's C++ autograd; the reference path is once_differentiable)."""
    if not compiled_op("mlp_maml"):
        pytest.skip("compiled op mamlext::mlp_maml is not built")
    gen = torch.Generator().manual_seed(9)
    sizes = [2, 4, 2]
    params = [p.requires_grad_() for p in make_params(sizes, 3, torch.float64, "cpu", gen)]
    x, y = make_data(sizes, 3, 4, "mse", torch.float64, "cpu", gen)
    q = ops.mlp_maml(params, x, y, x, y, 0.1)[0].sum()
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(q, params, create_graph=True)


def test_mlp_loss_grad_backward_is_not_differentiable():
    """mlp_loss_grad is first order (its grads carry no graph): a create_graph backward of its losses would lack the
    Hessian term, so it is refused, as the reference path's once_differentiable does."""
    gen = torch.Generator().manual_seed(9)
    sizes = [2, 4, 2]
    params = [p.requires_grad_() for p in make_params(sizes, 3, torch.float64, "cpu", gen)]
    x, y = make_data(sizes, 3, 4, "mse", torch.float64, "cpu", gen)
    losses = ops.mlp_loss_grad(params, x, y, "tanh")[0].sum()
    with pytest.raises(RuntimeError, match="not differentiable|once_differentiable"):
        g = torch.autograd.grad(losses, params, create_graph=True)
        torch.autograd.grad(sum(t.sum() for t in g), params)  # once_differentiable raises here


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_task"])
@pytest.mark.parametrize("act", ["tanh", "gelu", "elu", "sigmoid"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_gradcheck_mlp_loss_grad(shared, act, loss):
    gen = torch.Generator().manual_seed(11)
    sizes = [2, 3, 3]
    params = make_params(sizes, 2, torch.float64, "cpu", gen, per_task=() if shared else (0, 1, 2, 3))
    x, y = make_data(sizes, 2, 3, loss, torch.float64, "cpu", gen)
    inputs = [p.requires_grad_() for p in params]
    assert torch.autograd.gradcheck(lambda *ps: ops.mlp_loss_grad(list(ps), x, y, act, loss=loss)[0], inputs)


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("act,loss,form", [("tanh", "mse", "per_step"), ("gelu", "ce", "per_element"),
                                           ("elu", "mse", "mixed"), ("sigmoid", "ce", "per_step")])
def test_gradcheck_mlp_maml(first_order, act, loss, form):
    """Finite differences of the query losses w.r.t. params and rates: the meta-gradient and lr-gradient formulas
    (first order: against the first-order objective, whose inner gradients are constants, so only the
    second-order case is a gradcheck of the true derivative)."""
    gen = torch.Generator().manual_seed(12)
    sizes = [2, 3, 2]
    params = make_params(sizes, 1, torch.float64, "cpu", gen)
    xs, ys = make_data(sizes, 2, 3, loss, torch.float64, "cpu", gen)
    xq, yq = make_data(sizes, 2, 4, loss, torch.float64, "cpu", gen)
    lrs = make_rates(params, 2, form, torch.float64, "cpu", gen)
    w = torch.tensor([0.4, 1.0], dtype=torch.float64)
    inputs = [t.requires_grad_() for t in params + lrs]
    n = len(params)

    def fn(*flat):
        return ops.mlp_maml(list(flat[:n]), xs, ys, xq, yq, list(flat[n:]), w, first_order, act, loss=loss)[0]

    if first_order:  # the true derivative differs from FOMAML's: check the lr and meta-grads against the oracle
        q, meta, lr_grads = ops.mlp_maml(params, xs, ys, xq, yq, lrs, w, True, act, ACT_PARAM.get(act), loss)
        e = oracle_maml(sizes, act, loss, params, xs, ys, xq, yq, lrs, [0.4, 1.0], True)
        assert_rel(meta, e[1], torch.float64, "meta_grads")
        assert_rel(lr_grads, e[2], torch.float64, "lr_grads")
        return
    assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------------------------------------------
# Fake implementations and registration


def test_fake_implementations_shapes():
    """The fake functions (registered for the compiled ops) on meta tensors: output shapes, and the checks run."""
    m = dict(device="meta", dtype=torch.float32)
    params = [torch.empty(8, 3, **m), torch.empty(8, **m), torch.empty(6, 2, 8, **m), torch.empty(2, **m)]
    x, y = torch.empty(6, 5, 3, **m), torch.empty(6, 5, dtype=torch.int64, device="meta")
    losses, grads = ops._mlp_loss_grad_fake(params, x, y, 2, 0.0, 1)
    assert losses.shape == (6,) and [list(g.shape) for g in grads] == [[6, 8, 3], [6, 8], [6, 2, 8], [6, 2]]
    vectors = [g.new_empty(g.shape) for g in grads]
    assert [o.shape for o in ops._mlp_hvp_fake(params, vectors, x, y, 2, 0.0, 1)] == [v.shape for v in vectors]
    shared = [params[0], params[1], torch.empty(2, 8, **m), params[3]]
    lrs = [torch.empty(3, **m), torch.empty(3, 8, **m), torch.empty(3, 2, 8, **m), torch.empty(3, **m)]
    w = torch.empty(3, **m)
    xq, yq = torch.empty(6, 7, 3, **m), torch.empty(6, 7, dtype=torch.int64, device="meta")
    q, meta, lr_grads = ops._mlp_maml_fake(shared, x, y, xq, yq, lrs, w, False, 0, 0.0, 1)
    assert q.shape == (6,)
    assert [list(t.shape) for t in meta] == [[6, 8, 3], [6, 8], [6, 2, 8], [6, 2]]
    assert [list(t.shape) for t in lr_grads] == [[6, 3], [6, 3, 8], [6, 3, 2, 8], [6, 3]]
    with pytest.raises(ValueError, match=r"xs must be \[T, K, in\] with in = 3"):
        ops._mlp_maml_fake(shared, torch.empty(6, 5, 2, **m), y, xq, yq, lrs, w, False, 0, 0.0, 1)


def _opcheck_args(name):
    gen = torch.Generator().manual_seed(13)
    sizes = [3, 4, 2]
    params = make_params(sizes, 2, torch.float64, "cpu", gen, per_task=() if name == "mlp_maml" else (1,))
    x, y = make_data(sizes, 2, 3, "ce", torch.float64, "cpu", gen)
    c = codes("tanh", "ce")
    if name == "mlp_loss_grad":
        return (params, x, y, *c), True
    if name == "mlp_hvp":
        vectors = [rand(gen, *s) for s in task_shapes(params, 2)]
        return (params, vectors, x, y, *c), False  # no autograd formula: no input requires grad
    lrs = make_rates(params, 2, "mixed", torch.float64, "cpu", gen)
    return (params, x, y, x, y, lrs, torch.tensor([0.5, 1.0], dtype=torch.float64), False, *c), True


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    if not compiled_op(name):
        pytest.skip(f"compiled op mamlext::{name} is not built (its C++ kernel has not landed in this build)")
    args, differentiable = _opcheck_args(name)
    if differentiable:
        args = tuple([t.requires_grad_() for t in a] if isinstance(a, list) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.mamlext, name).default, args)


@pytest.mark.parametrize("name", OPS)
def test_registered_op_serves_the_wrapper(name, monkeypatch):
    """ops.<name> reaches the compiled op on CPU when it is built (and the reference otherwise)."""
    args, _ = _opcheck_args(name)
    called = []

    def spy(*a, **k):
        called.append(name)
        raise AssertionError("reference called")

    monkeypatch.setattr(reference, name, spy)
    if compiled_op(name):
        getattr(ops, name)(*args)
        assert not called
    else:
        with pytest.raises(AssertionError, match="reference called"):
            getattr(ops, name)(*args)


@pytest.mark.parametrize("name", OPS)
def test_compiled_op_matches_reference(name):
    if not compiled_op(name):
        pytest.skip(f"compiled op mamlext::{name} is not built (its C++ kernel has not landed in this build)")
    args, _ = _opcheck_args(name)
    out = getattr(torch.ops.mamlext, name)(*args)
    expected = getattr(reference, name)(*args)
    flat = lambda o: [o] if isinstance(o, torch.Tensor) else [t for e in o for t in flat(e)]  # noqa: E731
    for a, e in zip(flat(out), flat(expected)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_torch_compile_mlp_maml():
    if not compiled_op("mlp_maml"):
        pytest.skip("compiled op mamlext::mlp_maml is not built (its C++ kernel has not landed in this build)")
    args, _ = _opcheck_args("mlp_maml")
    params = [p.requires_grad_() for p in args[0]]

    def meta_loss(params):
        return torch.ops.mamlext.mlp_maml(params, *args[1:])[0].mean()

    compiled = torch.compile(meta_loss, fullgraph=True, backend="aot_eager")
    g1 = torch.autograd.grad(compiled(params), params)
    g2 = torch.autograd.grad(meta_loss(params), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def _bad_cases():
    d = torch.float64
    W1, b1 = torch.randn(4, 3, dtype=d), torch.randn(4, dtype=d)
    W2, b2 = torch.randn(2, 4, dtype=d), torch.randn(2, dtype=d)
    P = [W1, b1, W2, b2]
    x, xq = torch.randn(5, 6, 3, dtype=d), torch.randn(5, 7, 3, dtype=d)
    y, yq = torch.randn(5, 6, 2, dtype=d), torch.randn(5, 7, 2, dtype=d)
    yc = torch.randint(0, 2, (5, 6))
    V = [torch.randn(5, *p.shape, dtype=d) for p in P]
    L = [torch.full((2,), 0.1, dtype=d) for _ in P]
    w = torch.tensor([0.0, 1.0], dtype=d)
    relu, mse, ce = 0, 0, 1
    lg = lambda **k: ("mlp_loss_grad", {**dict(params=P, x=x, y=y, activation=relu, act_param=0.0,  # noqa: E731
                                            loss=mse), **k})
    hv = lambda **k: ("mlp_hvp", {**dict(params=P, vectors=V, x=x, y=y, activation=relu, act_param=0.0, loss=mse),
                                  **k})  # noqa: E731
    mm = lambda **k: ("mlp_maml", {**dict(params=P, xs=x, ys=y, xq=xq, yq=yq, lrs=L, step_weights=w,  # noqa: E731
                                          first_order=False, activation=relu, act_param=0.0, loss=mse), **k})
    return {
        "odd_params": (lg(params=[W1, b1, W2]), "an even"),
        "no_params": (lg(params=[]), "an even"),
        "int_params": (lg(params=[p.long() for p in P]), r"params\[0\] (must be float32 or float64|has dtype Long)"),
        "half_params": (lg(params=[p.half() for p in P]), r"params\[0\] (must be float32 or float64|has dtype Half)"),
        "param_dtype": (lg(params=[W1, b1, W2.float(), b2]), r"params\[2\] has dtype"),
        "param_device": (lg(params=[W1, b1, W2.to("meta"), b2]), r"params\[2\] is on meta"),
        "weight_dims": (lg(params=[W1.view(-1), b1, W2, b2]), r"params\[0\] \((W_1|layer 1's weight)\) must be"),
        "bias_dims": (lg(params=[W1, b1.view(2, 2, 1), W2, b2]), r"params\[1\] \((b_1|layer 1's bias)\) must be"),
        "chain": (lg(params=[W1, b1, torch.randn(2, 5, dtype=d), b2]),
                  r"params\[2\] .*(must be \[out, 4\]|must have 4 input features)"),
        "bias_size": (lg(params=[W1, torch.randn(3, dtype=d), W2, b2]), r"params\[1\] .*must be \[4\]"),
        "per_task_count": (lg(params=[W1.expand(4, 4, 3), b1, W2, b2]), r"params\[0\] .*is per task with 4 tasks"),
        "x_features": (lg(x=torch.randn(5, 6, 2, dtype=d)),
                       r"x must be \[T, K, in\] with in = 3 \(params\[0\] is \[4, 3\]\), got \[5, 6, 2\]"),
        "x_dims": (lg(x=torch.randn(6, 3, dtype=d)), r"x must be \[T, K, in\]"),
        "x_dtype": (lg(x=x.float()), "x has dtype"),
        "x_device": (lg(x=x.to("meta")), "x is on meta"),
        "y_shape_mse": (lg(y=torch.randn(5, 6, 3, dtype=d)), r"y must be \[T, K, out\] = \[5, 6, 2\]"),
        "y_tasks_mse": (lg(y=torch.randn(4, 6, 2, dtype=d)), r"y must be \[T, K, out\]"),
        "y_dtype_mse": (lg(y=y.float()), "y has dtype"),
        "y_dtype_ce": (lg(y=yc.int(), loss=ce), "y must hold int64 class indices"),
        "y_float_ce": (lg(y=y, loss=ce), "y must hold int64 class indices"),
        "y_shape_ce": (lg(y=yc[:, :5], loss=ce), r"y must be \[T, K\] = \[5, 6\]"),
        "y_label_high": (lg(y=torch.full((5, 6), 2), loss=ce),
                         r"y (holds the class index 2, outside|must hold class indices in) \[0, 2\)"),
        "y_label_negative": (lg(y=torch.full((5, 6), -1), loss=ce),
                             r"y (holds the class index -1, outside|must hold class indices in) \[0, 2\)"),
        "activation_code": (lg(activation=6), "activation must be"),
        "activation_negative": (lg(activation=-1), "activation must be"),
        "loss_code": (lg(loss=3), "loss must be"),
        "act_param_nan": (lg(act_param=float("nan")), "act_param must be (a )?finite"),
        "hvp_count": (hv(vectors=V[:3]), "vectors must hold one tensor per parameter"),
        "hvp_shape": (hv(vectors=[V[0][:, :2], *V[1:]]), r"vectors\[0\] must be \[T, \*S_0\] = \[5, 4, 3\]"),
        "hvp_shared": (hv(vectors=[V[0][0], *V[1:]]), r"vectors\[0\] must be \[T, \*S_0\]"),
        "hvp_dtype": (hv(vectors=[V[0], V[1].float(), *V[2:]]), r"vectors\[1\] has dtype"),
        "hvp_x": (hv(x=torch.randn(5, 6, 4, dtype=d)), r"mlp_hvp: x must be \[T, K, in\] with in = 3"),
        "maml_per_task_param": (mm(params=[W1.expand(5, 4, 3), b1, W2, b2]),
                                r"params\[0\] .*must be (shared|a shared)"),
        "maml_xs": (mm(xs=torch.randn(5, 6, 2, dtype=d)),
                    r"mlp_maml: xs must be \[T, K, in\] with in = 3 \(params\[0\] is \[4, 3\]\), got \[5, 6, 2\]"),
        "maml_xq": (mm(xq=torch.randn(5, 7, 1, dtype=d)), r"xq must be \[T, K, in\] with (T = 5, )?in = 3"),
        "maml_tasks": (mm(xq=xq[:4], yq=yq[:4]), r"xq (has 4 tasks .* but xs has 5|must be \[T, K, in\] with T = 5)"),
        "maml_ys": (mm(ys=yq), r"ys must be \[T, K, out\] = \[5, 6, 2\]"),
        "maml_yq": (mm(yq=y), r"yq must be \[T, K, out\] = \[5, 7, 2\]"),
        "maml_yq_label": (mm(ys=yc, yq=torch.full((5, 7), 5), loss=ce),
                          r"yq (holds the class index 5|must hold class indices in \[0, 2\).*got 5)"),
        "maml_lrs_count": (mm(lrs=L[:3]), "lrs must hold one tensor per parameter"),
        "maml_lrs_shape": (mm(lrs=[torch.full((3,), 0.1, dtype=d), *L[1:]]), r"lrs\[0\] must be \[N\] = \[2\]"),
        "maml_lrs_elem_shape": (mm(lrs=[torch.full((2, 4, 4), 0.1, dtype=d), *L[1:]]),
                                r"lrs\[0\] must be \[N\] = \[2\] .*or \[N, \*S_0\] = \[2, 4, 3\]"),
        "maml_lrs_dtype": (mm(lrs=[L[0].float(), *L[1:]]), r"lrs\[0\] has dtype"),
        "maml_weights_empty": (mm(step_weights=torch.zeros(0, dtype=d), lrs=[torch.zeros(0, dtype=d)] * 4),
                               r"step_weights must hold one weight per inner step \(N >= 1\)"),
        "maml_weights_int": (mm(step_weights=w.long()), "step_weights must be a floating-point tensor"),
        "too_many_layers": (lg(params=[torch.randn(3, 3, dtype=d), torch.randn(3, dtype=d)] * 17,
                               x=torch.randn(5, 6, 3, dtype=d), y=torch.randn(5, 6, 3, dtype=d)),
                            "at most 16 layers"),
        "maml_weights_device": (mm(step_weights=w.to("meta")),
                                "step_weights must be on the CPU or on params\\[0\\]'s device"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises(impl, case):
    (name, kwargs), message = BAD[case]
    if impl == "torch.ops" and not compiled_op(name):
        pytest.skip(f"compiled op mamlext::{name} is not built")
    args = list(kwargs.values())
    if impl == "ops":  # the wrapper takes names; it accepts codes too
        fn = getattr(ops, name)
    elif impl == "reference":
        fn = getattr(reference, name)
    else:
        fn = getattr(torch.ops.mamlext, name)
    with pytest.raises((ValueError, RuntimeError), match=message):
        fn(*args)


@pytest.mark.parametrize("kwargs,message", [
    (dict(activation="swish"), "activation must be one of"),
    (dict(activation=True), "activation must be one of"),
    (dict(loss="nll"), "loss must be one of"),
    (dict(act_param="0.1"), "act_param must be a float"),
])
def test_wrapper_bad_names(kwargs, message):
    p = [torch.randn(2, 3), torch.randn(2)]
    with pytest.raises(ValueError, match=message):
        ops.mlp_loss_grad(p, torch.randn(1, 2, 3), torch.randn(1, 2, 2), **kwargs)


@pytest.mark.parametrize("lrs,message", [(float("nan"), "lrs must be finite"), (torch.ones(2), "must be a scalar"),
                                         ("0.1", "lrs must be a float"), ([0.1, 0.1], r"lrs\[0\] must be a tensor")])
def test_wrapper_bad_rates(lrs, message):
    p = [torch.randn(2, 3), torch.randn(2)]
    x, y = torch.randn(1, 2, 3), torch.randn(1, 2, 2)
    with pytest.raises((TypeError, ValueError), match=message):
        ops.mlp_maml(p, x, y, x, y, lrs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("frozen", [False, True], ids=["all_learned", "one_frozen"])
def test_mlp_maml_mean_is_the_mean_of_mlp_maml(device, first_order, frozen):
    """BatchedMAML's entry (one autograd node holding the mean's meta-gradient): the same value, per-task losses
    and gradients w.r.t. params and rates as mlp_maml followed by a mean, also scaled by a grad_output."""
    gen = torch.Generator().manual_seed(21)
    sizes = [3, 5, 2]
    params = [p.requires_grad_() for p in make_params(sizes, 4, torch.float64, device, gen)]
    if frozen:
        params[1].requires_grad_(False)
    xs, ys = make_data(sizes, 4, 6, "ce", torch.float64, device, gen)
    xq, yq = make_data(sizes, 4, 3, "ce", torch.float64, device, gen)
    lrs = [r.requires_grad_() for r in make_rates(params, 2, "mixed", torch.float64, device, gen)]
    weights = torch.tensor([0.4, 1.0], dtype=torch.float64, device=device)
    args = (params, xs, ys, xq, yq, lrs, weights, first_order, *codes("tanh", "ce"))
    mean, losses = ops.mlp_maml_mean(*args)
    want_losses = ops.mlp_maml(*args)[0]
    torch.testing.assert_close(losses, want_losses, rtol=0, atol=0)
    torch.testing.assert_close(mean, want_losses.mean(), rtol=1e-15, atol=0)
    assert not losses.requires_grad
    wrt = [t for t in (*params, *lrs) if t.requires_grad]
    got = torch.autograd.grad(2.5 * mean, wrt)
    want = torch.autograd.grad(2.5 * ops.mlp_maml(*args)[0].mean(), wrt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-15)
    with torch.no_grad():
        assert not ops.mlp_maml_mean(*args)[0].requires_grad
    if compiled_op("mlp_maml"):
        with pytest.raises(RuntimeError, match="not differentiable"):
            torch.autograd.grad(ops.mlp_maml_mean(*args)[0], wrt, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_is_refused_by_name(device, dtype):
    """float8 is a floating-point dtype to PyTorch but no kernel computes in it: each op names the argument and the
    dtypes it takes (ValueError), instead of a NotImplementedError from its dispatch."""
    eight = torch.zeros(2, 3, device=device).to(dtype)
    params = [p.to(device) for p in make_params([3, 2], 1, torch.float32, "cpu", torch.Generator().manual_seed(0))]
    x, y = make_data([3, 2], 1, 4, "mse", torch.float32, device, torch.Generator().manual_seed(1))
    calls = {
        "task_sgd": (lambda: ops.task_sgd([eight[0]], [eight], 0.1), r"grads\[0\] must be float64"),
        "sgd_update": (lambda: ops.sgd_update([eight], [eight], 0.1), r"params\[0\] must be a floating-point tensor"),
        "maml_reverse_step": (lambda: ops.maml_reverse_step([eight], [eight]), r"v\[0\] must be a floating-point"),
        "mlp_maml": (lambda: ops.mlp_maml(params, x, y, x, y, [torch.full((1,), 0.1, device=device)] * 2,
                                          torch.ones(1, device=device).to(dtype)),
                     "step_weights must be a floating-point tensor"),
    }
    for name, (call, message) in calls.items():
        with pytest.raises(ValueError, match=message):
            call()


_BAD_LABEL_ON_CUDA = """
import torch
import mamlext
params = [torch.randn(2, 3, device="cuda"), torch.zeros(2, device="cuda")]
x = torch.randn(1, 4, 3, device="cuda")
y = torch.full((1, 4), 5, device="cuda")
model = torch.nn.Sequential(torch.nn.Linear(3, 2)).cuda()
try:
    mamlext.BatchedMAML(model, loss="ce").meta_loss(x, y, x, y)
except ValueError as error:
    print("refused:", error)
torch.cuda.synchronize()
print("context usable:", float(torch.ones(1, device="cuda").sum()))
mamlext.ops.mlp_loss_grad(params, x, y, "relu", None, "ce")
torch.cuda.synchronize()
print("not reached")
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_a_bad_class_index_on_cuda_is_refused_before_the_launch_and_asserts_inside_the_op():
    """In a subprocess (a device-side assert ends the process's CUDA context, as with PyTorch's cross_entropy):
    BatchedMAML checks the labels on the host and says so; the op itself, called directly, asserts in the kernel."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", _BAD_LABEL_ON_CUDA], capture_output=True, text=True, timeout=120)
    assert "refused:" in result.stdout and "checked on the host before the launch" in result.stdout, result.stdout
    assert "context usable: 1.0" in result.stdout, result.stdout + result.stderr
    assert "not reached" not in result.stdout and result.returncode != 0
    assert "device-side assert" in result.stderr, result.stderr[-2000:]
