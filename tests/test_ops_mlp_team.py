"""The per-task MLP math run by a team of threads per task, as the CUDA block kernel (csrc/cuda/mlp_block.cu) runs it
on a thread block: on the CPU on path "team" of the private ops torch.ops.mamlext._mlp_*_path, k std::threads
sharing a barrier, so that these tests exercise how the work is split and synchronised without a GPU; on CUDA, the
block kernels themselves (scratch in shared memory and in the global workspace) against the reference twins."""
import pytest
import torch

from mamlext import _ext, reference
from mamlext._checks import task_shapes
from mamlext._mlp_codes import ACTIVATIONS, LOSSES

from conftest import GPU
from mlp_cases import make_tasks, mlp

pytestmark = pytest.mark.skipif(_ext._C is None, reason="the compiled extension is not built")

ACT_PARAM = {"leaky_relu": 0.1, "elu": 0.7}  # as mlp_cases.ACT_MODULES
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
TEAM_SIZES = [1, 3, 4, 7]  # odd sizes leave partial turns everywhere

# (widths, support rows, query rows, steps, activation, loss, lr form, step weights, tasks)
MAML_CASES = [
    ([1, 40, 40, 1], 10, 10, 3, "relu", "mse", "per_step", None, 2),
    ([1, 64, 64, 1], 10, 3, 1, "tanh", "mse", "per_element", None, 2),
    ([3, 5, 4], 3, 1, 3, "gelu", "ce", "mixed", [0.2, 0.0, 1.0], 3),
    ([1, 1, 1], 1, 3, 1, "sigmoid", "mse", "per_step", None, 2),
    ([2, 40, 5], 3, 10, 3, "elu", "ce", "per_element", [0.5, 0.0, 1.0], 2),
    ([5, 64, 3], 10, 1, 1, "leaky_relu", "ce", "mixed", None, 3),
]


def codes(act, loss):
    return ACTIVATIONS[act], ACT_PARAM.get(act, 0.0), LOSSES[loss]


def make_rates(params, steps, form, gen):
    rates = []
    for i, p in enumerate(params):
        per_element = form == "per_element" or (form == "mixed" and i % 2 == 0)
        shape = (steps, *p.shape) if per_element else (steps,)
        rates.append(0.05 + 0.3 * torch.rand(shape, generator=gen, dtype=torch.float64))
    return rates


_MAML_INPUTS = {}


def maml_inputs(case, first_order):
    """Case `case`'s inputs in float64 holding float32 values, and the reference's outputs on them (cached)."""
    key = (case, first_order)
    if key not in _MAML_INPUTS:
        widths, shots, queries, steps, act, loss, form, weights, tasks = MAML_CASES[case]
        gen = torch.Generator().manual_seed(100 + case)
        torch.manual_seed(100 + case)
        params = [p.detach().double() for p in mlp(widths, act).parameters()]
        data = list(make_tasks(widths, tasks, shots, queries, loss, torch.float64, "cpu", gen))
        lrs = make_rates(params, steps, form, gen)
        weights = [0.0] * (steps - 1) + [1.0] if weights is None else weights
        rounded = [[t.float().double() if t.is_floating_point() else t for t in ts] for ts in (params, data, lrs)]
        args = (rounded[0], *rounded[1], rounded[2], torch.tensor(weights, dtype=torch.float64), first_order,
                *codes(act, loss))
        _MAML_INPUTS[key] = args, reference.mlp_maml(*args)
    return _MAML_INPUTS[key]


def cast(args, dtype, device):
    def one(t):
        if isinstance(t, (list, tuple)):
            return [one(x) for x in t]
        if isinstance(t, torch.Tensor):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return t
    return [one(a) for a in args]


def assert_rel(actual, expected, dtype, what):
    """Normwise relative error per tensor: max|a - e| <= rtol * max(max|e|, 1e-6)."""
    actual = [actual] if isinstance(actual, torch.Tensor) else list(actual)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == dtype, f"{what}[{i}]: {a.shape} {a.dtype} vs {e.shape}"
        err = (a.double().cpu() - e.double()).abs().max().item()
        scale = max(e.double().abs().max().item(), 1e-6)
        assert err <= RTOL[dtype] * scale, f"{what}[{i}]: max error {err:.3e}, scale {scale:.3e}"


def assert_maml_matches_reference(out, expected, dtype, case):
    what = "case {}: {}".format(case, MAML_CASES[case][:4])
    assert_rel(out[0], expected[0], dtype, f"{what} query_losses")
    assert_rel(out[1], expected[1], dtype, f"{what} meta_grads")
    assert_rel(out[2], expected[2], dtype, f"{what} lr_grads")


# ----------------------------------------------------------------------------------------------------------------
# CPU: a team of std::threads per task


@pytest.mark.parametrize("team", TEAM_SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_team_maml_matches_reference(team, dtype, first_order):
    for case in range(len(MAML_CASES)):
        args, expected = maml_inputs(case, first_order)
        out = torch.ops.mamlext._mlp_maml_path(*cast(args, dtype, "cpu"), "team", team)
        assert_maml_matches_reference(out, expected, dtype, case)


def check_loss_grad_and_hvp(loss, device, path, team_threads=0):
    """mlp_loss_grad and mlp_hvp on `device` and `path` against the reference, in float64."""
    gen = torch.Generator().manual_seed(7)
    c = codes("gelu", loss)
    for widths in ([1, 40, 40, 1], [3, 5, 4], [2, 64, 6]):
        torch.manual_seed(len(widths))
        params = [p.detach().double() for p in mlp(widths, "gelu").parameters()]
        params[0] = params[0].expand(3, *params[0].shape).contiguous()  # one per-task tensor
        x, y = make_tasks(widths, 3, 10, 0, loss, torch.float64, "cpu", gen)[:2]
        vectors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in task_shapes(params, 3)]
        on_device = cast([params, vectors, x, y], torch.float64, device)
        losses, grads = torch.ops.mamlext._mlp_loss_grad_path(on_device[0], *on_device[2:], *c, path, team_threads)
        hv = torch.ops.mamlext._mlp_hvp_path(*on_device, *c, path, team_threads)
        e_losses, e_grads = reference.mlp_loss_grad(params, x, y, *c)
        assert_rel(losses, e_losses, torch.float64, f"{widths} losses")
        assert_rel(grads, e_grads, torch.float64, f"{widths} grads")
        assert_rel(hv, reference.mlp_hvp(params, vectors, x, y, *c), torch.float64, f"{widths} hvp")


@pytest.mark.parametrize("team", [3, 7])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_team_loss_grad_and_hvp_match_reference(team, loss):
    check_loss_grad_and_hvp(loss, "cpu", "team", team)


@pytest.mark.parametrize("threads", [0, 65, -1])
def test_bad_team_threads(threads):
    args, _ = maml_inputs(3, True)
    with pytest.raises(ValueError, match=rf"team_threads must be in \[1, 64\] on path 'team', got {threads}"):
        torch.ops.mamlext._mlp_maml_path(*args, "team", threads)


# ----------------------------------------------------------------------------------------------------------------
# CUDA: the block kernel

@pytest.mark.parametrize("path", ["block", "block_global", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="no GPU visible")
def test_block_kernel_matches_reference(path, dtype, first_order):
    for case in range(len(MAML_CASES)):
        args, expected = maml_inputs(case, first_order)
        out = torch.ops.mamlext._mlp_maml_path(*cast(args, dtype, "cuda"), path)
        assert_maml_matches_reference(out, expected, dtype, case)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="no GPU visible")
def test_block_kernel_shared_and_global_scratch_agree(dtype):
    """The same kernel with another base pointer for the scratch: the same bits. 2000 tasks are more than the
    global workspace's grid, so its blocks also take several tasks each. The widths are chosen so that a task's
    scratch fits in shared memory in both dtypes (by mlp_maml_scratch_numel, 1-40-40-1 with 10 + 10 rows and 2
    steps takes 247 KB in float64, more than an H100 block's 227 KB, so path block would fall back to global
    scratch and compare nothing; 1-24-24-1 takes 115 KB)."""
    gen = torch.Generator().manual_seed(3)
    widths, tasks = [1, 24, 24, 1], 2000
    torch.manual_seed(3)
    params = [p.detach().to(dtype) for p in mlp(widths, "relu").parameters()]
    xs, ys, xq, yq = make_tasks(widths, tasks, 10, 10, "mse", dtype, "cpu", gen)
    lrs = [torch.full((2,), 0.01, dtype=dtype) for _ in params]
    args = cast([params, xs, ys, xq, yq, lrs, torch.tensor([0.0, 1.0]), False, *codes("relu", "mse")], dtype, "cuda")
    outs = {path: torch.ops.mamlext._mlp_maml_path(*args, path) for path in ("block", "block_global")}
    for a, b in zip([outs["block"][0], *outs["block"][1], *outs["block"][2]],
                    [outs["block_global"][0], *outs["block_global"][1], *outs["block_global"][2]]):
        assert torch.equal(a, b)
    layerwise = torch.ops.mamlext._mlp_maml_path(*args, "layerwise")
    assert_rel(outs["block"][1], layerwise[1], dtype, "meta_grads vs the layerwise kernel")


@pytest.mark.parametrize("path", ["block", "block_global", "auto"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="no GPU visible")
def test_block_kernel_loss_grad_and_hvp_match_reference(path, loss):
    check_loss_grad_and_hvp(loss, "cuda", path)


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="no GPU visible")
def test_bad_cuda_path():
    args = cast(maml_inputs(3, True)[0], torch.float64, "cuda")
    with pytest.raises(ValueError, match="path must be block, block_global, layerwise or auto on CUDA, got 'team'"):
        torch.ops.mamlext._mlp_maml_path(*args, "team")
    with pytest.raises(ValueError, match=r"team_threads must be 0 on CUDA \(path 'team' is CPU only\), got 4"):
        torch.ops.mamlext._mlp_maml_path(*args, "block", 4)
