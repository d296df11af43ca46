"""The fused MLP layers (ops.mlp, mamlext.nn.FusedMLP) and mamlext.MAML running its learners through them: exact
first and second derivatives against the module's own layers."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mamlext
from mamlext import ops

from mlp_cases import ACT_MODULES, mlp

ACTS = list(ACT_MODULES)
compiled = pytest.mark.skipif(not mamlext._ext.has_kernels("cpu"), reason="compiled extension not loaded")


def params_of(model):
    return [p for p in model.parameters()]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("widths", [[3, 2], [3, 5, 2], [2, 4, 6, 3]])
def test_forward_and_derivatives_match_the_module(act, widths):
    torch.manual_seed(0)
    model = mlp(widths, act).double()
    fused = mamlext.nn.FusedMLP.from_sequential(model)
    x = torch.randn(7, widths[0], dtype=torch.float64, requires_grad=True)
    out, want = fused(x), model(x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if ops._compiled("mlp_forward", x.device):
        assert "MlpForwardFunction" in out.grad_fn.name()  # one node for the whole network
    # first and second derivatives, through an inner step as MAML builds them
    params = params_of(model)
    y = torch.randn_like(want)
    for run in (fused, model):
        loss = F.mse_loss(run(x), y)
        grads = torch.autograd.grad(loss, params + [x], create_graph=True)
        second = torch.autograd.grad(sum((g * g.detach().sin()).sum() for g in grads), params + [x])
        if run is fused:
            got = [g.detach() for g in grads] + list(second)
        else:
            expected = [g.detach() for g in grads] + list(second)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@compiled
@pytest.mark.parametrize("act", ["tanh", "gelu", "elu", "leaky_relu"])
@pytest.mark.parametrize("input_grad", [False, True])
def test_gradcheck_and_gradgradcheck(act, input_grad):
    torch.manual_seed(1)
    model = mlp([3, 4, 2], act).double()
    code = mamlext.nn.FusedMLP.from_sequential(model).activation
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=input_grad)

    def fn(x, *ps):
        return ops.mlp(list(ps), x, code)
    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


@compiled
def test_opcheck():
    model = mlp([3, 4, 2], "tanh").double()
    params = [p.detach() for p in model.parameters()]
    x = torch.randn(5, 3, dtype=torch.float64)
    out, acts = torch.ops.mamlext.mlp_forward(params, x, 2, 0.0)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.mamlext.mlp_forward, (params, x, 2, 0.0),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.mamlext.mlp_backward, (params, x, acts, g, 2, 0.0, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.mamlext.mlp_backward_backward,
                          (params, x, acts, g, [torch.randn_like(p) for p in params], torch.randn_like(x), 2, 0.0,
                           True), test_utils=("test_schema", "test_faketensor"))


@compiled
def test_third_derivatives_raise():
    model = mlp([2, 3, 1], "tanh").double()
    x = torch.randn(4, 2, dtype=torch.float64)
    params = params_of(model)
    g = torch.autograd.grad(ops.mlp(params, x, "tanh").sum(), params, create_graph=True)
    torch.autograd.grad(sum(gi.sum() for gi in g), params, retain_graph=True)  # second derivatives: fine
    with pytest.raises(RuntimeError, match="no third derivatives"):  # a graph of them: refused
        torch.autograd.grad(sum(gi.sum() for gi in g), params, create_graph=True)


def test_leading_dimensions_and_functorch_fallback():
    model = mlp([3, 4, 2], "relu").double()
    fused = mamlext.nn.FusedMLP.from_sequential(model)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    # torch.func transforms see plain PyTorch layers
    names = dict(fused.named_parameters())
    out = torch.func.vmap(lambda xi: torch.func.functional_call(fused, names, (xi,)))(x)
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)
    g = torch.func.grad(lambda p: torch.func.functional_call(fused, p, (x,)).square().sum())(names)
    want = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    for a, b in zip(g.values(), want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_from_sequential_shares_parameters_and_refuses_other_models():
    model = mlp([3, 4, 2], "tanh")
    fused = mamlext.nn.FusedMLP.from_sequential(model)
    assert [id(p) for p in fused.parameters()] == [id(p) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"FusedMLP.from_sequential: layer 1 \(Dropout\): unsupported layer type"):
        mamlext.nn.FusedMLP.from_sequential(nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="FusedMLP: activation must be one of"):
        mamlext.nn.FusedMLP([nn.Linear(2, 2)], activation="swish")
    with pytest.raises(ValueError, match=r"FusedMLP: layers\[1\] has in_features = 4 but layers\[0\] has "
                                         "out_features = 3"):
        mamlext.nn.FusedMLP([nn.Linear(2, 3), nn.Linear(4, 1)])
    with pytest.raises(ValueError, match=r"FusedMLP: layers\[0\] must be an nn.Linear with bias"):
        mamlext.nn.FusedMLP([nn.Linear(2, 3, bias=False)])


def test_mlp_input_errors_name_the_argument():
    """From the kernel's checks (mlp_forward) where it runs, from the Python ones (mlp) on the reference layers."""
    params = [torch.randn(4, 3), torch.randn(4), torch.randn(2, 4), torch.randn(2)]
    with pytest.raises(ValueError, match=r"mlp(_forward)?: x must be \[(K|...), in\] with in = 3"):
        ops.mlp(params, torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"mlp(_forward)?: params\[3\] (\(b_2\) )?must be \[2\]"):
        ops.mlp(params[:3] + [torch.randn(3)], torch.randn(5, 3))
    with pytest.raises(ValueError, match="mlp: x is torch.float64 on cpu but params.0. is torch.float32|"
                                         "mlp_forward: params.0. has dtype Float but x has dtype Double"):
        ops.mlp(params, torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mlp: x must be a tensor \[..., in\]"):
        ops.mlp(params, torch.tensor(1.0))
    with pytest.raises(ValueError, match="mlp: activation must be one of"):
        ops.mlp(params, torch.randn(5, 3), "swish")


@compiled
def test_kernel_input_errors_name_the_argument():
    params = [torch.randn(4, 3), torch.randn(4), torch.randn(2, 4), torch.randn(2)]
    with pytest.raises(ValueError, match=r"mlp_forward: x must be \[K, in\] with in = 3"):
        torch.ops.mamlext.mlp_forward(params, torch.randn(5, 2), 0, 0.0)
    with pytest.raises(ValueError, match=r"mlp_forward: params\[2\] is \[2, 5\] but must have 4 input features"):
        torch.ops.mamlext.mlp_forward([params[0], params[1], torch.randn(2, 5), params[3]], torch.randn(5, 3), 0,
                                      0.0)
    with pytest.raises(ValueError, match="mlp_forward: params.0. has dtype Float but x has dtype Double"):
        torch.ops.mamlext.mlp_forward(params, torch.randn(5, 3, dtype=torch.float64), 0, 0.0)
    out, acts = torch.ops.mamlext.mlp_forward(params, torch.randn(5, 3), 0, 0.0)
    with pytest.raises(ValueError, match=r"mlp_backward: grad_out must have shape \[5, 2\]"):
        torch.ops.mamlext.mlp_backward(params, torch.randn(5, 3), acts, torch.randn(5, 3), 0, 0.0, False)


def learn2learn_loop(model, tasks, steps, lr, first_order, loss_fn, allow_nograd=False):
    """The loop with the module's own layers (mamlext.MAML with the fused layers switched off)."""
    maml = mamlext.MAML(model, lr=lr, first_order=first_order, allow_nograd=allow_nograd)
    maml._fused = None
    return run_loop(maml, tasks, steps, loss_fn)


def run_loop(maml, tasks, steps, loss_fn):
    for xs, ys, xq, yq in tasks:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(xs), ys))
        (loss_fn(learner(xq), yq) / len(tasks)).backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in maml.parameters()]
    maml.zero_grad(set_to_none=True)
    return grads


def sine_tasks(count, shots=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(shots, 1, generator=gen, dtype=torch.float64) for _ in range(4)) for _ in range(count)]


@compiled
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_maml_meta_gradient_through_the_fused_layers(steps, first_order, act):
    torch.manual_seed(2)
    model = mlp([1, 40, 40, 1], act).double()
    tasks = sine_tasks(4)
    calls = []
    real = ops.mlp

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    want = learn2learn_loop(model, tasks, steps, 0.05, first_order, F.mse_loss)
    maml = mamlext.MAML(model, lr=0.05, first_order=first_order)
    assert maml._fused is not None
    mamlext.nn.ops.mlp = counting
    try:
        got = run_loop(maml, tasks, steps, F.mse_loss)
    finally:
        mamlext.nn.ops.mlp = real
    assert len(calls) == len(tasks) * (steps + 1)  # every forward of every learner ran fused
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


@compiled
def test_maml_tensor_rate_frozen_and_cross_entropy():
    torch.manual_seed(3)
    model = mlp([3, 8, 4], "gelu").double()
    model[0].bias.requires_grad_(False)
    gen = torch.Generator().manual_seed(4)
    tasks = [(torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randint(0, 4, (6,), generator=gen),
              torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randint(0, 4, (5,), generator=gen))
             for _ in range(3)]
    for lr in (0.3, torch.tensor(0.3, dtype=torch.float64, requires_grad=True)):
        results = []
        for fused in (False, True):
            maml = mamlext.MAML(model, lr=lr, allow_nograd=True)
            if not fused:
                maml._fused = None
            grads = run_loop(maml, tasks, 2, F.cross_entropy)
            if isinstance(lr, torch.Tensor):  # the learned rate's meta-gradient too
                grads.append(lr.grad.clone())
                lr.grad = None
            results.append(grads)
        want, got = results
        assert got[1] is None and want[1] is None  # the frozen bias
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


def test_maml_runs_the_module_when_it_has_hooks_or_is_not_an_mlp():
    model = mlp([2, 3, 1], "relu").double()
    seen = []
    handle = model[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    learner = mamlext.MAML(model, lr=0.1).clone()
    learner(torch.randn(4, 2, dtype=torch.float64))
    assert seen == [torch.Size([4, 3])]
    handle.remove()
    assert mamlext.MAML(nn.Sequential(nn.Linear(2, 2), nn.Dropout()), lr=0.1)._fused is None


@compiled
@pytest.mark.slow
def test_torch_compile_traces_the_fused_op():
    torch.manual_seed(5)
    model = mlp([3, 4, 2], "tanh")
    fused = mamlext.nn.FusedMLP.from_sequential(model)
    x = torch.randn(5, 3)
    out = torch.compile(lambda x: fused(x).square().sum(), fullgraph=True)(x)
    out.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(x).square().sum()
    want.backward()
    torch.testing.assert_close(out, want)
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.grad)
