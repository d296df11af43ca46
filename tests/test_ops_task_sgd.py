"""task_sgd: compiled kernels against the reference over shapes, rate forms and dtypes; op registration
(opcheck, torch.compile); gradients to second order; every bad input."""
import pytest
import torch

import mamlext
from mamlext import _ext, ops, reference

from conftest import DEVICES

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# float64 allows the last-bit differences of a fused multiply-add (the CPU's AVX2/AVX-512 clones and CUDA contract
# p - lr * g into one), which show as a larger relative error where p and lr * g nearly cancel.
TOL = {torch.float64: (1e-13, 1e-15), torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3),
       torch.bfloat16: (8e-3, 8e-3)}
LR_FORMS = ["float", "scalar_tensor", "per_param", "per_element"]

requires_ext = pytest.mark.skipif(_ext._C is None, reason="compiled extension not loaded")


def make_case(shapes, tasks, device, dtype, shared, lr_form, seed=0, noncontiguous=False):
    """params (shared: S_i, else [T, *S_i]), grads [T, *S_i] and a rate of the given form."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    params = [rand(*s) if shared else rand(tasks, *s) for s in shapes]
    if noncontiguous:  # same values, strided storage: a transposed copy transposed back
        grads = [rand(*reversed((tasks, *s))).permute(*reversed(range(len(s) + 1))) for s in shapes]
    else:
        grads = [rand(tasks, *s) for s in shapes]
    if lr_form == "float":
        lr = 0.37
    elif lr_form == "scalar_tensor":
        lr = torch.tensor(0.37, dtype=dtype, device=device)
    elif lr_form == "per_param":
        lr = [torch.rand((), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for _ in shapes]
    else:
        lr = [torch.rand(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
    return params, grads, lr


def explicit_update(params, grads, lr):
    """The definition, task by task and in float64: an oracle independent of reference.py's broadcasting."""
    outs = []
    for i, (p, g) in enumerate(zip(params, grads)):
        rate = lr if isinstance(lr, float) else (lr if isinstance(lr, torch.Tensor) else lr[i])
        rate = rate if isinstance(rate, float) else rate.double()
        rows = [(p.double() if p.dim() < g.dim() else p[t].double()) - rate * g[t].double() for t in range(g.shape[0])]
        outs.append(torch.stack(rows) if rows else torch.empty(g.shape, dtype=torch.float64, device=g.device))
    return outs


def assert_outputs_close(actual, expected, dtype):
    assert len(actual) == len(expected)
    rtol, atol = TOL[dtype]
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"output {i}"
        assert a.is_contiguous(), f"output {i}"
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol, msg=lambda m: f"output {i}: {m}")


SHAPE_SETS = {
    "empty": [(0,), (3, 0)],
    "one": [(1,)],
    "odd": [(1023,), (1025,), (7, 13)],
    "chunk_crossing": [(65537,), (33, 31)],
    "mixed_with_empty": [(5, 3), (0,), (3,), (2, 2, 2)],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lr_form", LR_FORMS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_task"])
@pytest.mark.parametrize("shape_set", list(SHAPE_SETS))
def test_matches_reference(device, dtype, lr_form, shared, shape_set):
    params, grads, lr = make_case(SHAPE_SETS[shape_set], 3, device, dtype, shared, lr_form)
    out = ops.task_sgd(params, grads, lr)
    assert_outputs_close(out, reference.task_sgd(params, grads, lr), dtype)
    assert_outputs_close(out, explicit_update(params, grads, lr), dtype)
    assert all(o.device == g.device and o.dtype == dtype for o, g in zip(out, grads))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_form", LR_FORMS)
def test_many_tensors(device, lr_form):
    """More tensors than one CUDA launch holds, of uneven sizes, some empty: several launches, carried chunks."""
    shapes = [((i * 37) % 300 + (i % 3) * 70000 * (i % 17 == 0), ) if i % 11 else (0,) for i in range(130)]
    params, grads, lr = make_case(shapes, 2, device, torch.float32, False, lr_form, seed=1)
    assert_outputs_close(ops.task_sgd(params, grads, lr), explicit_update(params, grads, lr), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tasks", [0, 1, 32])
def test_task_counts(device, tasks):
    params, grads, lr = make_case([(4, 5), (5,)], tasks, device, torch.float64, True, "per_element")
    out = ops.task_sgd(params, grads, lr)
    assert [o.shape for o in out] == [g.shape for g in grads]
    assert_outputs_close(out, explicit_update(params, grads, lr), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_task"])
def test_noncontiguous_and_unaligned(device, dtype, shared):
    """Strided grads and tensors starting at an odd element offset (no aligned vector access possible)."""
    params, grads, lr = make_case([(6, 10), (129,)], 5, device, dtype, shared, "per_element", noncontiguous=True)
    assert not grads[0].is_contiguous()
    assert_outputs_close(ops.task_sgd(params, grads, lr), explicit_update(params, grads, lr), dtype)
    offset = [torch.randn(p.numel() + 1, dtype=dtype, device=device)[1:].view(p.shape) for p in params]
    assert_outputs_close(ops.task_sgd(offset, grads, lr), explicit_update(offset, grads, lr), dtype)


def test_empty_lists():
    assert ops.task_sgd([], [], 0.1) == []
    assert ops.task_sgd([], [], []) == []


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_registered_op_is_served_by_compiled_kernel(device):
    """mamlext.ops.task_sgd reaches the compiled op and both give the same result."""
    params, grads, lr = make_case([(3, 4)], 2, device, torch.float32, True, "float")
    direct = torch.ops.mamlext.task_sgd(params, grads, lr)
    assert_outputs_close(ops.task_sgd(params, grads, lr), direct, torch.float32)
    assert _ext.backend_for(device) == "compiled"


# --- registration -------------------------------------------------------------------------------------------------

@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_form", ["float", "per_param", "per_element"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_task"])
def test_opcheck(device, lr_form, shared):
    params, grads, lr = make_case([(3, 4), (4,), (0,)], 2, device, torch.float64, shared, lr_form)
    params = [p.requires_grad_() for p in params]
    grads = [g.requires_grad_() for g in grads]
    if lr_form == "float":
        op = torch.ops.mamlext.task_sgd.default
    else:
        op = torch.ops.mamlext.task_sgd.tensor_lr
        lr = [r.requires_grad_() for r in lr]
    torch.library.opcheck(op, (params, grads, lr))


@requires_ext
@pytest.mark.slow
def test_torch_compile_fullgraph():
    params, grads, lr = make_case([(8, 3), (3,)], 4, "cpu", torch.float32, True, "per_param")

    def two_steps(params, grads, lr):
        once = ops.task_sgd(params, grads, lr)
        return ops.task_sgd(once, grads, lr)

    compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager")
    assert_outputs_close(compiled(params, grads, lr), two_steps(params, grads, lr), torch.float32)


# --- gradients ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_form", LR_FORMS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_task"])
def test_gradcheck_and_gradgradcheck(device, lr_form, shared):
    params, grads, lr = make_case([(3, 2), (2,)], 3, device, torch.float64, shared, lr_form)
    rates = [] if lr_form == "float" else ([lr] if isinstance(lr, torch.Tensor) else lr)
    inputs = [t.detach().requires_grad_() for t in (*params, *grads, *rates)]
    n = len(params)

    def fn(*flat):
        rate = 0.37 if lr_form == "float" else (flat[2 * n] if lr_form == "scalar_tensor" else list(flat[2 * n:]))
        return tuple(ops.task_sgd(list(flat[:n]), list(flat[n:2 * n]), rate))

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_shared_param_gradient_sums_over_tasks():
    p = torch.randn(4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, dtype=torch.float64)
    ops.task_sgd([p], [g], 0.5)[0].sum().backward()
    torch.testing.assert_close(p.grad, torch.full((4,), 3.0, dtype=torch.float64))


# --- bad input ----------------------------------------------------------------------------------------------------

def _bad_cases():
    f = torch.float32
    p, g = torch.randn(3, 4), torch.randn(2, 3, 4)
    return {
        "lengths": (([p, p], [g], 0.1), "same length"),
        "grad_no_task_dim": (([torch.randn(())], [torch.randn(())], 0.1), r"grads\[0\]"),
        "param_shape": (([p, torch.randn(5)], [g, torch.randn(2, 6)], 0.1), r"params\[1\] has shape"),
        "task_count": (([p, torch.randn(5)], [g, torch.randn(3, 5)], 0.1), r"grads\[1\] has 3 tasks"),
        "dtype": (([p, torch.randn(5, dtype=torch.float64)], [g, torch.randn(2, 5, dtype=torch.float64)], 0.1),
                  r"grads\[1\] has dtype"),
        "param_dtype": (([p.double()], [g], 0.1), r"params\[0\] has dtype"),
        "int_dtype": (([p.int()], [g.int()], 0.1), r"grads\[0\] must be float"),
        "lr_nan": (([p], [g], float("nan")), "lr must be finite"),
        "lr_inf": (([p], [g], float("inf")), "lr must be finite"),
        "lr_count": (([p], [g], [torch.tensor(0.1), torch.tensor(0.1)]), "one tensor per parameter"),
        "lr_shape": (([p], [g], [torch.ones(4)]), r"lr\[0\] must be a scalar or have shape"),
        "lr_shape_task_dim": (([p], [g], [torch.ones(2, 3, 4)]), r"lr\[0\] must be a scalar or have shape"),
        "lr_dtype": (([p], [g], [torch.tensor(0.1, dtype=torch.float64)]), r"lr\[0\] has dtype"),
        "lr_tensor_nan": (([p], [g], [torch.tensor(float("nan"), dtype=f)]), r"lr\[0\] must be finite"),
        "param_device": (([torch.randn(3, 4, device="meta")], [g], 0.1), r"params\[0\] is on meta"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("implementation", ["ops", "reference", "torch.ops"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises(implementation, case):
    (params, grads, lr), message = BAD[case]
    if implementation == "torch.ops":
        if _ext._C is None:
            pytest.skip("compiled extension not loaded")
        overload = torch.ops.mamlext.task_sgd.default if isinstance(lr, float) else torch.ops.mamlext.task_sgd.tensor_lr
        call = lambda: overload(params, grads, lr)  # noqa: E731
    else:
        call = lambda: getattr(mamlext, implementation).task_sgd(params, grads, lr)  # noqa: E731
    with pytest.raises((ValueError, RuntimeError), match=message):
        call()


@pytest.mark.parametrize("lr", [True, "0.1", None, torch.ones(3)])
def test_bad_lr_type_raises(lr):
    with pytest.raises((TypeError, ValueError), match="lr"):
        ops.task_sgd([torch.randn(3)], [torch.randn(2, 3)], lr)
