"""mlp_hvp's Gauss-Newton product (gauss_newton=True): J_t^T H_loss J_t v_t per task, on every kernel path (CPU:
per_task, team, layerwise; CUDA: block, block_global, layerwise) against the reference twin and an oracle that
builds the Jacobian and the loss's Hessian explicitly; equal to H v where the network is linear; positive
semi-definite; for cross-entropy the categorical policy's Fisher product (the labels do not enter)."""
import pytest
import torch
from torch.autograd.functional import hessian, jacobian
from torch.nn import functional as F

from conftest import DEVICES
from mamlext import _ext, ops, reference
from mamlext._mlp_codes import LOSSES
from test_ops_mlp_weights import ARCHS, PATHS, assert_rel, cast, codes
from test_ops_mlp_weights import make_case as weighted_case

pytestmark = pytest.mark.skipif(_ext._C is None, reason="the compiled extension is not built")


def make_case(sizes, per_task, loss, tasks=3, rows=5, seed=0):
    """The weighted tests' case with non-negative weights (a Fisher's sample weights)."""
    params, x, y, vectors, weights = weighted_case(sizes, per_task, loss, tasks, rows, seed)
    return params, x, y, vectors, weights.abs()


def oracle(params, x, y, vectors, weights, act, loss):
    """Per task: the output's Jacobian J [K*O, P] and the loss's Hessian w.r.t. the output [K*O, K*O], built by
    torch.autograd.functional, then J^T H J v."""
    act_fn = {"tanh": torch.tanh, "relu": torch.relu}[act]
    out = []
    for t in range(x.shape[0]):
        ps = [p[t] if p.dim() == (3 if i % 2 == 0 else 2) else p for i, p in enumerate(params)]
        shapes, sizes = [p.shape for p in ps], [p.numel() for p in ps]

        def net(flat):
            h = x[t]
            parts = [part.view(s) for part, s in zip(flat.split(sizes), shapes)]
            for layer in range(len(parts) // 2):
                h = h @ parts[2 * layer].T + parts[2 * layer + 1]
                if layer + 1 < len(parts) // 2:
                    h = act_fn(h)
            return h.reshape(-1)

        def task_loss(z):
            z = z.view(x.shape[1], -1)
            if loss == "mse":
                return (weights[t].unsqueeze(-1) * (z - y[t]) ** 2).sum() / z.numel()
            return (weights[t] * F.cross_entropy(z, y[t], reduction="none")).mean()

        flat = torch.cat([p.reshape(-1) for p in ps])
        J = jacobian(net, flat)
        H = hessian(task_loss, net(flat))
        v = torch.cat([vi[t].reshape(-1) for vi in vectors])
        gv = J.T @ (H @ (J @ v))
        out.append([part.view(s) for part, s in zip(gv.split(sizes), shapes)])
    return [torch.stack(parts) for parts in zip(*out)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_every_path_matches_the_reference_and_the_oracle(device, dtype, loss, act, weighted):
    c = codes(act, loss)
    for sizes, per_task in ARCHS:
        params, x, y, vectors, weights = make_case(sizes, per_task, loss)
        w = weights if weighted else None
        expected = reference.mlp_hvp(params, vectors, x, y, *c, w, True)
        if sizes[1] < 64:  # the explicit Jacobian of the wide net is slow
            o = oracle(params, x, y, vectors, weights if weighted else torch.ones_like(weights), act, loss)
            assert_rel(expected, o, torch.float64, f"reference {sizes}")
        p, v, args = cast(params, dtype, device), cast(vectors, dtype, device), cast([x, y], dtype, device)
        w_dev = None if w is None else cast([w], dtype, device)[0]
        for path, team in PATHS[device]:
            out = torch.ops.mamlext._mlp_hvp_path(p, v, *args, *c, path, team, w_dev, True)
            assert_rel(out, expected, dtype, f"{path} {sizes}")
        out = ops.mlp_hvp(p, v, *args, act, loss=loss, weights=w_dev, gauss_newton=True)
        assert_rel(out, expected, dtype, f"public op {sizes}")


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_equal_to_the_hessian_where_the_network_is_linear(loss):
    """One layer: the output is linear in the parameters, so H = J^T H_loss J."""
    params, x, y, vectors, weights = make_case([4, 3], (1,), loss)
    c = codes("tanh", loss)
    for path in ("per_task", "layerwise"):
        gn = torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *c, path, 0, weights, True)
        hv = torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *c, path, 0, weights)
        torch.testing.assert_close(gn, hv, rtol=1e-12, atol=1e-14)
    # and it is not H v once there is a hidden layer
    params, x, y, vectors, weights = make_case([4, 6, 3], (), loss)
    gn = ops.mlp_hvp(params, vectors, x, y, "tanh", loss=loss, weights=weights, gauss_newton=True)
    hv = ops.mlp_hvp(params, vectors, x, y, "tanh", loss=loss, weights=weights)
    assert max((a - b).abs().max().item() for a, b in zip(gn, hv)) > 1e-6


def test_cross_entropy_gives_the_categorical_fisher_product():
    """For cross-entropy H_loss is diag(p) - p p^T per row: the labels do not enter, and v^T G v >= 0."""
    params, x, y, vectors, weights = make_case([3, 8, 4], (2,), "ce", tasks=4, rows=6)
    other = (y + 1) % 4
    for path in ("per_task", "team", "layerwise"):
        team = 3 if path == "team" else 0
        c = codes("relu", "ce")
        gn = torch.ops.mamlext._mlp_hvp_path(params, vectors, x, y, *c, path, team, weights, True)
        gn_other = torch.ops.mamlext._mlp_hvp_path(params, vectors, x, other, *c, path, team, weights, True)
        torch.testing.assert_close(gn, gn_other, rtol=1e-12, atol=1e-14)
        curvature = sum((g * v).flatten(1).sum(1) for g, v in zip(gn, vectors))
        assert (curvature >= 0).all(), curvature


def test_opcheck_fake_kernel_and_bad_flag():
    params, x, y, vectors, weights = make_case([3, 4, 2], (1,), "ce", tasks=2, rows=3)
    c = codes("tanh", "ce")
    torch.library.opcheck(torch.ops.mamlext.mlp_hvp.default, (params, vectors, x, y, *c, weights, True))
    meta = lambda ts: [t.to("meta") for t in ts]  # noqa: E731
    out = ops._mlp_hvp_fake(meta(params), meta(vectors), *meta([x, y]), *c, None, True)
    assert [o.shape for o in out] == [v.shape for v in vectors]
    with pytest.raises(TypeError, match="gauss_newton must be a bool"):
        ops.mlp_hvp(params, vectors, x, y, "tanh", loss="ce", gauss_newton=1)
