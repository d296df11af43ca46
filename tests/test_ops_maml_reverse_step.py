"""maml_reverse_step: compiled kernels against an explicit per-task oracle over shapes, dtypes and options; op
registration (opcheck); gradients to second order; every bad input."""
import pytest
import torch

from mamlext import _ext, ops, reference

from conftest import DEVICES

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 2e-2),
       torch.bfloat16: (5e-2, 5e-2)}
SHAPE_SETS = {
    "one": [(1,)],
    "odd": [(3, 5), (7,), (1, 1, 3), (2, 3, 4, 5)],
    "empty_param": [(0, 4), (5,)],
    "many": [(i % 7 + 1, 3) for i in range(130)],  # > 100 tensors: several CUDA launches
    "large": [(300, 257)],  # > one chunk of per-task elements
}

requires_ext = pytest.mark.skipif(_ext._C is None, reason="compiled extension not loaded")


def make_case(shapes, tasks, device, dtype, seed=0, noncontiguous=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(shape):
        if noncontiguous:  # same layout of values, strided storage
            return torch.randn(*reversed(shape), generator=gen, dtype=torch.float64).permute(
                *reversed(range(len(shape)))).to(device=device, dtype=dtype)
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    return [[rand((tasks, *s)) for s in shapes] for _ in range(3)]


def explicit(v, hv, grads, sum_tasks):
    """The definition, task by task in float64."""
    v_next, lr_grads = [], []
    for i in range(len(v)):
        rows = [v[i][t].double() - hv[i][t].double() for t in range(v[i].shape[0])]
        zeros = torch.zeros(v[i].shape[1:], dtype=torch.float64, device=v[i].device)
        v_next.append(sum(rows, zeros) if sum_tasks else torch.stack(rows) if rows else v[i].double().clone())
        if grads:
            lr_grads.append(-sum((grads[i][t].double() * v[i][t].double() for t in range(v[i].shape[0])), zeros))
    return v_next, lr_grads


def assert_close(actual, expected, dtype):
    assert len(actual) == len(expected)
    rtol, atol = TOL[dtype]
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == dtype and a.shape == e.shape, f"output {i}: {a.dtype} {a.shape} vs {e.shape}"
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol, msg=f"output {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
@pytest.mark.parametrize("sum_tasks", [False, True])
@pytest.mark.parametrize("with_grads", [False, True])
def test_matches_definition(device, dtype, shapes, sum_tasks, with_grads):
    v, hv, grads = make_case(SHAPE_SETS[shapes], 3, device, dtype)
    grads = grads if with_grads else []
    v_next, lr_grads = ops.maml_reverse_step(v, hv, grads, sum_tasks)
    expected_v, expected_lr = explicit(v, hv, grads, sum_tasks)
    assert_close(v_next, expected_v, dtype)
    assert_close(lr_grads, expected_lr, dtype)
    ref_v, ref_lr = reference.maml_reverse_step(v, hv, grads, sum_tasks)
    assert_close(ref_v, expected_v, dtype)
    assert_close(ref_lr, expected_lr, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tasks", [0, 1, 5])
@pytest.mark.parametrize("sum_tasks", [False, True])
def test_task_counts_and_noncontiguous(device, tasks, sum_tasks):
    v, hv, grads = make_case(SHAPE_SETS["odd"], tasks, device, torch.float64, seed=tasks, noncontiguous=True)
    assert tasks < 2 or not v[0].is_contiguous()
    v_next, lr_grads = ops.maml_reverse_step(v, hv, grads, sum_tasks)
    expected_v, expected_lr = explicit(v, hv, grads, sum_tasks)
    assert_close(v_next, expected_v, torch.float64)
    assert_close(lr_grads, expected_lr, torch.float64)


def test_empty_lists():
    assert ops.maml_reverse_step([], [], [], True) == ([], [])


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sum_tasks", [False, True])
@pytest.mark.parametrize("with_grads", [False, True])
def test_opcheck(device, sum_tasks, with_grads):
    v, hv, grads = make_case([(3, 2), (4,)], 2, device, torch.float64)
    for t in (*v, *hv, *grads):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.mamlext.maml_reverse_step, (v, hv, grads if with_grads else [], sum_tasks))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sum_tasks", [False, True])
def test_gradcheck_and_gradgradcheck(device, sum_tasks):
    v, hv, grads = make_case([(2, 3), (3,)], 2, device, torch.float64, seed=3)
    inputs = [t.requires_grad_(True) for t in (*v, *hv, *grads)]

    def fn(*flat):
        out_v, out_lr = ops.maml_reverse_step(list(flat[0:2]), list(flat[2:4]), list(flat[4:6]), sum_tasks)
        return (*out_v, *out_lr)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("make_args, message", [
    (lambda v: (v, v[:1], [], False), "v and hv must have the same length"),
    (lambda v: (v, v, v[:1], False), "grads must be empty"),
    (lambda v: (v, [v[0], v[1].float()], [], False), r"hv\[1\] has dtype (torch.float32|Float) but v\[0\] has dtype"),
    (lambda v: (v, [v[0], v[1][:, :1]], [], False), r"hv\[1\] has shape \[2, 1\] but v\[1\] has shape \[2, 3\]"),
    (lambda v: ([v[0], v[1][:1]], [v[0], v[1][:1]], [], False), r"v\[1\] must be \[T, \*S_1\] with T = 2"),
    (lambda v: ([torch.tensor(1.0, dtype=torch.float64)], [torch.tensor(1.0, dtype=torch.float64)], [], False),
     r"v\[0\] must be \[T, \*S_0\]"),
    (lambda v: ([v[0].long()], [v[0].long()], [], False), "floating-point"),
])
def test_bad_input(make_args, message):
    v = [torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)]
    args = make_args(v)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.maml_reverse_step(*args)
    if _ext._C is not None:  # the op called directly checks too, with the same message
        with pytest.raises(ValueError, match=message):
            torch.ops.mamlext.maml_reverse_step(*args)
