"""The layerwise implementation of mlp_loss_grad, mlp_hvp and mlp_maml (csrc/layerwise/: layer by layer, GEMMs over
all tasks), run through the private ops torch.ops.mamlext._mlp_*_path, against the reference twins
(mamlext.reference, evaluated in float64) and the per-task CPU kernel; the public ops' choice between the two CPU
paths; edge cases. On CUDA the same implementation is the ops' kernel for wide networks (wider than 64): the value
tests also run there (every activation and loss, first and second order, a network wider than 64), and the CPU runs
exercise its host code and the element-wise arithmetic its CUDA kernels share."""
import math

import pytest
import torch

from conftest import DEVICES
from mamlext import _ext, ops, reference
from mamlext._checks import task_shapes
from mamlext._mlp_codes import ACTIVATIONS, LOSSES

pytestmark = pytest.mark.skipif(_ext._C is None, reason="the compiled extension is not built")

ACTS = list(ACTIVATIONS)
ACT_PARAM = {"leaky_relu": 0.07, "elu": 0.8}
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


# The three ops on a given CPU path (the layerwise one unless told otherwise).
def loss_grad(*args, path="layerwise"):
    return torch.ops.mamlext._mlp_loss_grad_path(*args, path)


def hvp(*args, path="layerwise"):
    return torch.ops.mamlext._mlp_hvp_path(*args, path)


def maml(*args, path="layerwise"):
    return torch.ops.mamlext._mlp_maml_path(*args, path)


def codes(act, loss):
    return ACTIVATIONS[act], ACT_PARAM.get(act, 0.0), LOSSES[loss]


def rand(gen, *shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_params(sizes, tasks, dtype, gen, per_task=()):
    params = []
    for layer in range(len(sizes) - 1):
        for j, shape in enumerate(((sizes[layer + 1], sizes[layer]), (sizes[layer + 1],))):
            lead = (tasks,) if 2 * layer + j in per_task else ()
            params.append(rand(gen, *lead, *shape, dtype=dtype, scale=1.0 / math.sqrt(max(sizes[layer], 1))))
    return params


def make_data(sizes, tasks, rows, loss, dtype, gen):
    x = rand(gen, tasks, rows, sizes[0], dtype=dtype)
    if loss == "mse":
        return x, rand(gen, tasks, rows, sizes[-1], dtype=dtype)
    return x, torch.randint(0, sizes[-1], (tasks, rows), generator=gen)


def make_rates(params, steps, form, dtype, gen):
    rates = []
    for i, p in enumerate(params):
        per_element = form == "per_element" or (form == "mixed" and i % 2 == 0)
        shape = (steps, *p.shape) if per_element else (steps,)
        rates.append((0.05 + 0.3 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype))
    return rates


def f64(ts):
    return [t.double() if t.is_floating_point() else t for t in ts]


def assert_rel(actual, expected, dtype, what):
    """Normwise relative error per tensor: max|a - e| <= rtol * max(max|e|, 1e-6)."""
    actual = [actual] if isinstance(actual, torch.Tensor) else list(actual)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}[{i}]: shape {list(a.shape)} != {list(e.shape)}"
        assert a.dtype == dtype and a.is_contiguous(), f"{what}[{i}]: dtype {a.dtype}, contiguous {a.is_contiguous()}"
        if not e.numel():
            continue
        if e.isnan().any():
            assert torch.equal(a.isnan(), e.isnan()), f"{what}[{i}]: nan pattern"
            a, e = a[~e.isnan()], e[~e.isnan()]
            if not e.numel():
                continue
        err = (a.double() - e.double()).abs().max().item()
        scale = max(e.double().abs().max().item(), 1e-6)
        assert err <= RTOL[dtype] * scale, f"{what}[{i}]: max error {err:.3e}, scale {scale:.3e}"


# (sizes, per-task parameter indices): depths 1-4, shared / per-task / mixed parameters, width-1 layers, and one
# network wider than 64 (what CUDA runs on this path).
ARCHS = [([3, 5, 4], ()), ([2, 7, 6, 3], (0, 3, 5)), ([4, 3], (0, 1)), ([1, 9, 9, 9, 2], (2,)),
         ([1, 1, 1], (0, 1, 2, 3)), ([2, 1, 6, 2], (1,)), ([3, 80, 70, 2], (1,))]


def on(device, tensors):
    return [t.to(device) for t in tensors]


def cpu(tensors):
    return [t.cpu() for t in tensors]


# ----------------------------------------------------------------------------------------------------------------
# Values against the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("act", ACTS)
def test_loss_grad_and_hvp(dtype, loss, act, device):
    gen = torch.Generator().manual_seed(1)
    c = codes(act, loss)
    for sizes, per_task in ARCHS:
        tasks = 3
        params = make_params(sizes, tasks, dtype, gen, per_task)
        x, y = make_data(sizes, tasks, 5, loss, dtype, gen)
        vectors = [rand(gen, *s, dtype=dtype) for s in task_shapes(params, tasks)]
        losses, grads = loss_grad(on(device, params), *on(device, [x, y]), *c)
        e_losses, e_grads = reference.mlp_loss_grad(f64(params), *f64([x, y]), *c)
        assert_rel(losses.cpu(), e_losses, dtype, f"{sizes} losses")
        assert_rel(cpu(grads), e_grads, dtype, f"{sizes} grads")
        hv = hvp(on(device, params), on(device, vectors), *on(device, [x, y]), *c)
        assert_rel(cpu(hv), reference.mlp_hvp(f64(params), f64(vectors), *f64([x, y]), *c), dtype, f"{sizes} hvp")


MAML_CASES = [
    # (sizes, steps, lr form, weights)
    ([1, 12, 12, 1], 1, "per_step", None),
    ([3, 6, 5], 2, "per_element", None),
    ([2, 8, 8, 3], 3, "per_step", [0.2, 0.0, 1.0]),
    ([4, 3], 2, "per_element", [0.5, 0.5]),
    ([3, 5, 4, 6, 2], 2, "mixed", [0.0, 1.0]),
    ([2, 1, 4], 3, "mixed", [1.0, 0.0, 0.3]),
    ([2, 72, 66, 3], 2, "per_step", [0.4, 1.0]),  # wider than 64: CUDA's own case for this path
]


_MAML_EXPECTED = {}


def maml_case(case, loss):
    """Inputs of MAML_CASES[case] in float64 holding float32 values (one float64 reference serves both dtypes)."""
    sizes, steps, form, weights = MAML_CASES[case]
    gen = torch.Generator().manual_seed(10 + case)
    tasks = 1 + case % 3
    rounded = lambda ts: [t.float().double() if t.is_floating_point() else t for t in ts]  # noqa: E731
    params = rounded(make_params(sizes, tasks, torch.float64, gen))
    xs, ys = rounded(make_data(sizes, tasks, 1 + (3 * case) % 7, loss, torch.float64, gen))
    xq, yq = rounded(make_data(sizes, tasks, 2 + case % 5, loss, torch.float64, gen))
    lrs = rounded(make_rates(params, steps, form, torch.float64, gen))
    weights = [0.0] * (steps - 1) + [1.0] if weights is None else weights
    return params, xs, ys, xq, yq, lrs, torch.tensor(weights, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("act", ACTS)
def test_maml(dtype, first_order, loss, act, device):
    c = codes(act, loss)
    for case, (sizes, steps, form, _) in enumerate(MAML_CASES):
        params, xs, ys, xq, yq, lrs, w = maml_case(case, loss)
        key = (act, loss, first_order, case)
        if key not in _MAML_EXPECTED:
            _MAML_EXPECTED[key] = reference.mlp_maml(params, xs, ys, xq, yq, lrs, w, first_order, *c)
        e = _MAML_EXPECTED[key]
        cast = lambda ts: [(t.to(dtype) if t.is_floating_point() else t).to(device) for t in ts]  # noqa: E731
        out = maml(cast(params), *cast([xs, ys, xq, yq]), cast(lrs), w.to(dtype).to(device), first_order, *c)
        what = f"{sizes} N={steps} {form}"
        assert_rel(out[0].cpu(), e[0], dtype, f"{what} query_losses")
        assert_rel(cpu(out[1]), e[1], dtype, f"{what} meta_grads")
        assert_rel(cpu(out[2]), e[2], dtype, f"{what} lr_grads")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["layerwise", "auto"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_maml_step_weights_on_the_cpu_or_the_device(device, path, first_order):
    """step_weights on the CPU whatever the params' device (the layerwise kernels read them on the host and skip the
    query passes of zero weight, without waiting for a GPU) or on the params' device (on a GPU: not read back, every
    query pass run and scaled there) give the reference's values; auto is the per-task kernel for these narrow nets
    (on CUDA the block kernel, which copies CPU weights to the device)."""
    c = codes("tanh", "mse")
    for case in (2, 5, 6):  # zero weights before the last step, after it, and a net wider than 64
        sizes, steps, form, _ = MAML_CASES[case]
        params, xs, ys, xq, yq, lrs, w = maml_case(case, "mse")
        e = reference.mlp_maml(params, xs, ys, xq, yq, lrs, w, first_order, *c)
        for weights in (w, w.to(device)):
            out = maml(on(device, params), *on(device, [xs, ys, xq, yq]), on(device, lrs), weights, first_order, *c,
                       path=path)
            what = f"{sizes} N={steps} weights on {weights.device}"
            assert_rel(out[0].cpu(), e[0], torch.float64, f"{what} query_losses")
            assert_rel(cpu(out[1]), e[1], torch.float64, f"{what} meta_grads")
            assert_rel(cpu(out[2]), e[2], torch.float64, f"{what} lr_grads")


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_maml_agrees_with_per_task_kernel(first_order):
    """The two CPU implementations on a mid-sized float64 problem: the same arithmetic up to summation order."""
    gen = torch.Generator().manual_seed(20)
    sizes = [3, 24, 24, 4]
    params = make_params(sizes, 6, torch.float64, gen)
    xs, ys = make_data(sizes, 6, 7, "ce", torch.float64, gen)
    xq, yq = make_data(sizes, 6, 9, "ce", torch.float64, gen)
    lrs = make_rates(params, 3, "mixed", torch.float64, gen)
    w = torch.tensor([0.3, 0.0, 1.0], dtype=torch.float64)
    outs = {path: maml(params, xs, ys, xq, yq, lrs, w, first_order, *codes("gelu", "ce"), path=path)
            for path in ("per_task", "layerwise")}
    for a, e in zip(outs["layerwise"], outs["per_task"]):
        a, e = ([a], [e]) if isinstance(a, torch.Tensor) else (a, e)
        for x, y in zip(a, e):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_all_zero_weights_and_autograd():
    """Zero step weights skip every query pass; through ops.mlp_maml (the public op) the kernel's outputs carry the
    meta-gradient to the parameters' .grad (the kernel itself builds no graph)."""
    gen = torch.Generator().manual_seed(5)
    sizes = [2, 3, 2]
    params = make_params(sizes, 2, torch.float64, gen)
    xs, ys = make_data(sizes, 2, 3, "mse", torch.float64, gen)
    lrs = make_rates(params, 2, "per_step", torch.float64, gen)
    q, meta, lr_grads = maml(params, xs, ys, xs, ys, lrs, torch.zeros(2, dtype=torch.float64), False,
                             *codes("relu", "mse"))
    assert q.tolist() == [0.0, 0.0]
    assert all(not m.any() for m in meta) and all(not r.any() for r in lr_grads)

    leaves = [p.clone().requires_grad_() for p in params]
    q, meta, _ = ops.mlp_maml(leaves, xs, ys, xs, ys, lrs, [0.5, 1.0], activation="tanh")
    assert all(not m.requires_grad for m in meta)
    q.sum().backward()
    for leaf, m in zip(leaves, meta):
        torch.testing.assert_close(leaf.grad, m.sum(0), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_zero_tasks(loss):
    gen = torch.Generator().manual_seed(6)
    sizes = [3, 4, 2]
    params = make_params(sizes, 0, torch.float64, gen, per_task=(1,))
    x, y = make_data(sizes, 0, 2, loss, torch.float64, gen)
    c = codes("tanh", loss)
    losses, grads = loss_grad(params, x, y, *c)
    assert losses.shape == (0,) and [list(g.shape) for g in grads] == task_shapes(params, 0)
    vectors = [torch.ones(s, dtype=torch.float64) for s in task_shapes(params, 0)]
    assert [o.shape for o in hvp(params, vectors, x, y, *c)] == [v.shape for v in vectors]
    shared = make_params(sizes, 0, torch.float64, gen)
    lrs = [torch.full((2,), 0.1, dtype=torch.float64) for _ in shared[:-1]] + [torch.full((2, 2), 0.1,
                                                                                         dtype=torch.float64)]
    q, meta, lr_grads = maml(shared, x, y, x, y, lrs, torch.tensor([0.0, 1.0],
                                                                                       dtype=torch.float64),
                                                   False, *c)
    assert q.shape == (0,)
    assert [list(m.shape) for m in meta] == [[0, *p.shape] for p in shared]
    assert [list(r.shape) for r in lr_grads] == [[0, *r.shape] for r in lrs]


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_no_rows_and_empty_layer(loss):
    """K = 0: nan losses, zero gradients and H v; an empty hidden layer."""
    gen = torch.Generator().manual_seed(14)
    sizes = [3, 4, 2]
    params = make_params(sizes, 2, torch.float64, gen)
    c = codes("tanh", loss)
    x, y = make_data(sizes, 2, 0, loss, torch.float64, gen)
    xq, yq = make_data(sizes, 2, 3, loss, torch.float64, gen)
    losses, grads = loss_grad(params, x, y, *c)
    assert losses.isnan().all() and all(not g.any() for g in grads)
    vectors = [torch.ones(2, *p.shape, dtype=torch.float64) for p in params]
    assert all(not h.any() for h in hvp(params, vectors, x, y, *c))
    lrs = [torch.full((2,), 0.1, dtype=torch.float64) for _ in params]
    w = torch.tensor([[0.0, 1.0]], dtype=torch.float32)  # any shape and floating dtype
    q, meta, lr_grads = maml(params, x, y, xq, yq, lrs, w, False, *c)
    e = reference.mlp_maml(params, x, y, xq, yq, lrs, torch.tensor([0.0, 1.0]), False, *c)
    assert_rel(q, e[0], torch.float64, "query_losses")
    assert_rel(meta, e[1], torch.float64, "meta_grads")
    assert all(not r.any() for r in lr_grads)
    empty = [torch.randn(0, 3, dtype=torch.float64), torch.randn(0, dtype=torch.float64),
             torch.randn(2, 0, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]
    x, y = make_data([3, 0, 2], 2, 4, loss, torch.float64, gen)
    losses, grads = loss_grad(empty, x, y, *c)
    e_losses, e_grads = reference.mlp_loss_grad(empty, x, y, *c)
    assert_rel(losses, e_losses, torch.float64, "losses")
    assert_rel(grads, e_grads, torch.float64, "grads")


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(15)
    sizes = [4, 6, 3]
    params = make_params(sizes, 3, torch.float64, gen, per_task=(0,))
    params[0] = params[0].transpose(1, 2).contiguous().transpose(1, 2)  # [T, out, in] with swapped strides
    x = rand(gen, 3, 4, 5).transpose(1, 2)  # [3, 5, 4], not contiguous
    y = rand(gen, 3, 5, 3)
    c = codes("elu", "mse")
    losses, grads = loss_grad(params, x, y, *c)
    e_losses, e_grads = reference.mlp_loss_grad(params, x, y, *c)
    assert_rel(losses, e_losses, torch.float64, "losses")
    assert_rel(grads, e_grads, torch.float64, "grads")


def test_bad_input_message_on_layerwise_path():
    params = make_params([3, 4, 2], 2, torch.float64, torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 2, dtype=torch.float64)
    y = torch.randn(2, 5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x must be \[T, K, in\] with in = 3"):
        loss_grad(params, x, y, *codes("relu", "mse"))


# ----------------------------------------------------------------------------------------------------------------
# Path selection


def _maml_args(sizes, tasks, rows, steps):
    gen = torch.Generator().manual_seed(30)
    params = make_params(sizes, tasks, torch.float32, gen)
    xs, ys = make_data(sizes, tasks, rows, "mse", torch.float32, gen)
    lrs = make_rates(params, steps, "per_step", torch.float32, gen)
    return params, xs, ys, xs, ys, lrs, torch.tensor([0.0] * (steps - 1) + [1.0]), False, *codes("relu", "mse")


def test_public_ops_run_the_per_task_kernel_for_narrow_and_wide():
    """The per-task kernel is the faster one on the CPU wherever measured (see csrc/cpu/mlp.cpp): the public ops
    and path auto give its very bits; layerwise only on request."""
    for args in (_maml_args([1, 8, 8, 1], 4, 5, 1), _maml_args([1, 256, 256, 1], 4, 25, 1)):
        loss_grad_args = (args[0], args[1], args[2], *args[-3:])
        for out in (torch.ops.mamlext.mlp_maml(*args), maml(*args, path="auto")):
            assert_same(out, maml(*args, path="per_task"))
        for out in (torch.ops.mamlext.mlp_loss_grad(*loss_grad_args), loss_grad(*loss_grad_args, path="auto")):
            assert_same(out, loss_grad(*loss_grad_args, path="per_task"))


def assert_same(actual, expected):
    flat = lambda out: [t for o in out for t in ([o] if isinstance(o, torch.Tensor) else o)]  # noqa: E731
    assert all(torch.equal(a, e) for a, e in zip(flat(actual), flat(expected), strict=True))


def test_paths_agree_on_a_wide_net():
    args = _maml_args([2, 160, 3], 3, 6, 2)
    outs = {path: maml(*args, path=path) for path in ("per_task", "layerwise", "auto")}
    for path in ("layerwise", "auto"):
        for a, e in zip(outs[path][1] + outs[path][2], outs["per_task"][1] + outs["per_task"][2]):
            assert (a - e).abs().max() <= 1e-4 * e.abs().max()


@pytest.mark.parametrize("path", ["gpu", "batched", ""])
def test_bad_path_value(path):
    with pytest.raises(ValueError, match=f"path must be per_task, layerwise, team or auto on the CPU, got '{path}'"):
        loss_grad(*_maml_args([1, 4, 1], 2, 3, 1)[:3], *codes("relu", "mse"), path=path)


def test_team_threads_only_on_the_team_path():
    with pytest.raises(ValueError, match="team_threads is for path 'team' only and must be 0 on path 'layerwise'"):
        torch.ops.mamlext._mlp_maml_path(*_maml_args([1, 4, 1], 2, 3, 1), "layerwise", 2)
