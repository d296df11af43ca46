"""The private ops that keep each task's passes across products (CPU): _mlp_passes is mlp_loss_grad that also writes
the passes (z, h, dz, dh of every layer) into a [T, 4 K W] buffer, and _mlp_hvp_from_passes, reading them, is mlp_hvp
(H v and the Gauss-Newton product) for every loss, shared and per-task parameters; the last layer's z in the passes is
the network's output (what mamlext.rl.passes.FusedPolicyPasses reads); passes of the wrong shape or dtype, or a
non-contiguous buffer, are refused."""
import pytest
import torch

from mamlext import _ext, reference
from mamlext._checks import task_shapes
from mamlext._mlp_codes import ACTIVATIONS, LOSSES

pytestmark = pytest.mark.skipif(_ext._C is None, reason="the compiled extension is not built")


def make_case(loss, per_task, tasks=3, rows=6, sizes=(3, 7, 5, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for layer in range(len(sizes) - 1):
        for j, shape in enumerate(((sizes[layer + 1], sizes[layer]), (sizes[layer + 1],))):
            lead = (tasks,) if per_task else ()
            params.append(0.5 * torch.randn(*lead, *shape, generator=gen, dtype=torch.float64))
    if loss == "gaussian":
        params.append(0.3 * torch.randn(*((tasks,) if per_task else ()), sizes[-1], generator=gen,
                                        dtype=torch.float64))
    x = torch.randn(tasks, rows, sizes[0], generator=gen, dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (tasks, rows), generator=gen) if loss == "ce" else \
        torch.randn(tasks, rows, sizes[-1], generator=gen, dtype=torch.float64)
    weights = torch.randn(tasks, rows, generator=gen, dtype=torch.float64)
    vectors = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in task_shapes(params, tasks)]
    return params, x, y, weights, vectors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_task", [False, True], ids=["shared", "per_task"])
@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("loss", ["mse", "ce", "gaussian"])
def test_kept_passes_give_the_ops_values(loss, act, per_task, dtype):
    params, x, y, weights, vectors = make_case(loss, per_task)
    cast = lambda ts: [t.to(dtype) for t in ts]  # noqa: E731
    params, vectors, x, weights = cast(params), cast(vectors), x.to(dtype), weights.to(dtype)
    y = y if loss == "ce" else y.to(dtype)
    codes = (ACTIVATIONS[act], 0.0, LOSSES[loss])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for w in (None, weights):
        T, K = x.shape[:2]
        widths = [p.shape[-2] for i, p in enumerate(params[:len(params) // 2 * 2]) if i % 2 == 0]
        passes = torch.empty(T, 4 * K * sum(widths), dtype=dtype)
        losses, grads = torch.ops.mamlext._mlp_passes(params, x, y, *codes, w, passes)
        e_losses, e_grads = torch.ops.mamlext.mlp_loss_grad(params, x, y, *codes, w)
        torch.testing.assert_close([losses, *grads], [e_losses, *e_grads], **tol)
        out = reference.mlp_forward(params, x, *codes[:2])
        last = passes[:, K * (sum(widths) - widths[-1]):K * sum(widths)].reshape(T, K, widths[-1])
        torch.testing.assert_close(last, out, **tol)
        for gauss_newton in (False, True):
            got = torch.ops.mamlext._mlp_hvp_from_passes(params, vectors, x, y, passes, *codes, w, gauss_newton)
            expected = torch.ops.mamlext.mlp_hvp(params, vectors, x, y, *codes, w, gauss_newton)
            torch.testing.assert_close(got, expected, **tol)


def test_bad_passes_are_refused_by_name():
    params, x, y, weights, vectors = make_case("mse", False)
    codes = (ACTIVATIONS["tanh"], 0.0, LOSSES["mse"])
    passes = torch.empty(3, 4 * 6 * (7 + 5 + 4), dtype=torch.float64)
    torch.ops.mamlext._mlp_passes(params, x, y, *codes, weights, passes)
    for bad in (passes[:, 1:], passes[1:], passes.float(), passes.unsqueeze(0)):
        with pytest.raises(ValueError, match="passes"):
            torch.ops.mamlext._mlp_hvp_from_passes(params, vectors, x, y, bad, *codes, weights)
        with pytest.raises(ValueError, match="passes"):
            torch.ops.mamlext._mlp_passes(params, x, y, *codes, weights, bad.clone())
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.mamlext._mlp_passes(params, x, y, *codes, weights, passes.t().contiguous().t())


def normwise_close(actual, expected, rtol, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        err = float((a - e).norm() / e.norm().clamp_min(1e-300))
        assert err <= rtol, f"{what}[{i}]: relative error {err:.3e}"


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("loss", ["mse", "ce", "gaussian"])
def test_more_rows_than_a_tile_match_the_reference(loss, act):
    """600 rows: three R-pass tiles (common/mlp_passes.h kMlpRowTile = 256) and three depth chunks of the weight
    gradients' GEMMs (small_gemm.h kGemmDepthChunk), on a 2-9-7-2 network whose first layer writes its weight gradient
    transposed and whose last is dot products: every product against the autograd reference twins, float64, on the
    per-task and the team path, and through kept passes."""
    params, x, y, weights, vectors = make_case(loss, False, tasks=2, rows=600, sizes=(2, 9, 7, 2))
    codes = (ACTIVATIONS[act], 0.0, LOSSES[loss])
    e_losses, e_grads = reference.mlp_loss_grad(params, x, y, *codes, weights)
    losses, grads = torch.ops.mamlext.mlp_loss_grad(params, x, y, *codes, weights)
    normwise_close([losses, *grads], [e_losses, *e_grads], 1e-10, "mlp_loss_grad")
    T, K = x.shape[:2]
    passes = torch.empty(T, 4 * K * (9 + 7 + 2), dtype=torch.float64)
    torch.ops.mamlext._mlp_passes(params, x, y, *codes, weights, passes)
    for gauss_newton in (False, True):
        expected = reference.mlp_hvp(params, vectors, x, y, *codes, weights, gauss_newton)
        for path, team in (("per_task", 0), ("team", 3)):
            got = torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *codes, path, team, weights, gauss_newton)
            normwise_close(got, expected, 1e-10, f"{path} gauss_newton={gauss_newton}")
        got = torch.ops.mamlext._mlp_hvp_from_passes(params, vectors, x, y, passes, *codes, weights, gauss_newton)
        normwise_close(got, expected, 1e-10, f"kept passes gauss_newton={gauss_newton}")
    lrs = [torch.full((2,), 0.1, dtype=torch.float64) for _ in params]
    step_weights = torch.tensor([0.5, 1.0], dtype=torch.float64)
    expected = reference.mlp_maml(params, x, y, x[:, :300], y[:, :300], lrs, step_weights, False, *codes, weights,
                                  weights[:, :300])
    got = torch.ops.mamlext.mlp_maml(params, x, y, x[:, :300], y[:, :300], lrs, step_weights, False, *codes, weights,
                                     weights[:, :300])
    normwise_close([got[0], *got[1], *got[2]], [expected[0], *expected[1], *expected[2]], 1e-9, "mlp_maml")
