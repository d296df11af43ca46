"""What each engine does with shared and frozen parameters, nan, buffers and absurd hyperparameters: the per-task
loop's answer or an error, and the user's model left exactly as it was."""
import pytest
import torch
from torch import nn

import mamlext
from mamlext import _ext, ops
from mamlext._mlp_codes import ACTIVATIONS, LOSSES

from test_fuzz import assert_unchanged, loop_meta_loss, snapshot

ENGINES = [dict(backend="auto"), dict(backend="generic", memory="graph"), dict(backend="generic", memory="low")]


def tasks(in_f=4, out_f=4, t=3, k=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t, k, f, generator=gen, dtype=torch.float64) for f in (in_f, out_f, in_f, out_f)]


def mse(out, y):
    return (out - y).square().mean()


def loop(model, data, steps=1, lr=0.1):
    """The per-task loop's meta-loss and meta-gradients (by parameter name) on the model itself."""
    loss = loop_meta_loss(model, lambda i, step: lr, data, steps, False, mse, [0.0] * (steps - 1) + [1.0])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return loss.detach(), dict(zip([n for n, _ in named], grads))


def engine_result(model, data, steps=1, lr=0.1, **kwargs):
    maml = mamlext.BatchedMAML(model, inner_lr=lr, inner_steps=steps, **kwargs)
    loss = maml.meta_loss(*data)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return maml, loss.detach(), grads


def reused():
    square = nn.Linear(4, 4)
    return nn.Sequential(square, nn.Tanh(), square).double()


def tied():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    model[2].weight = model[0].weight
    return model


@pytest.mark.parametrize("make", [reused, tied])
@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: "-".join(e.values()))
def test_shared_parameters_get_the_loops_meta_gradient(make, engine):
    model, data = make(), tasks()
    want_loss, want = loop(model, data, steps=2)
    before = snapshot(model)
    maml, loss, grads = engine_result(model, data, steps=2, **engine)
    assert maml.engine == "generic"  # auto routes shared parameters away from the fused kernels
    assert_unchanged(model, before, "after meta_loss")
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)
    assert grads.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-9, atol=1e-12)
    model(data[0][0])  # the model still runs
    maml.meta_loss(*data)  # and a second call works


def test_reused_module_in_anil_head():
    head = reused()
    backbone = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    anil = mamlext.ANIL(backbone, head, inner_lr=0.1, loss="mse")
    xs, ys, xq, yq = tasks(in_f=3)
    before = snapshot(anil)
    anil.meta_loss(xs, ys, xq, yq).backward()
    assert_unchanged(anil, before, "ANIL")
    assert all(p.grad is not None for p in anil.parameters() if p.requires_grad and p.dim() > 0)
    backbone_grads = [p.grad.clone() for p in backbone.parameters()]
    head_grads = [p.grad.clone() for p in head.parameters()]
    # the loop on backbone + head, adapting the head only
    loss = loop_meta_loss(nn.Sequential(backbone, head), lambda i, step: 0.1, (xs, ys, xq, yq), 1, False, mse,
                          [1.0], adapts=lambda i: i >= 2)
    want = torch.autograd.grad(loss, list(backbone.parameters()) + list(head.parameters()))
    for got, expected in zip(backbone_grads + head_grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", [reused, tied])
def test_shared_parameters_in_reptile_and_imaml(make):
    model = make()
    reptile = mamlext.Reptile(model, inner_lr=0.1, inner_steps=2, outer_step=0.5)
    assert reptile.engine == "generic"
    xs, ys, _, _ = tasks()
    weight = model[0].weight
    reptile.step(xs, ys)
    assert model[0].weight is weight and model[2].weight is weight  # still one parameter
    with pytest.raises(ValueError, match=r"iMAML: no engine serves this model \(fused_mlp: layer 2 \(Linear\): "
                                         r"its weight is also layer 0's"):
        mamlext.iMAML(make())


def frozen_model():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    model[0].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("engine", ENGINES + [dict(backend="fused")], ids=lambda e: "-".join(e.values()))
@pytest.mark.parametrize("lr_mode", ["fixed", "per_layer_step", "per_param"])
def test_frozen_parameters_are_not_adapted(engine, lr_mode):
    model, data = frozen_model(), tasks()
    want_loss, want = mamlext_maml_allow_nograd(model, data)
    frozen = model[0].weight.detach().clone()
    maml, loss, grads = engine_result(model, data, steps=2, lr_mode=lr_mode, **engine)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)
    assert grads.keys() == want.keys() == {"0.bias", "2.weight", "2.bias"}
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-9, atol=1e-12)
    assert torch.equal(model[0].weight, frozen)
    if lr_mode != "fixed":  # the frozen weight's rate is not used: no gradient
        assert maml.inner_lrs[0].grad is None and maml.inner_lrs[1].grad is not None
    adapted = maml.adapt(data[0], data[1])
    assert torch.equal(adapted[0], frozen.expand_as(adapted[0]))


def mamlext_maml_allow_nograd(model, data, steps=2, lr=0.1):
    """learn2learn's semantics, by mamlext.MAML(allow_nograd=True): frozen parameters are not adapted."""
    maml = mamlext.MAML(model, lr=lr, allow_nograd=True)
    xs, ys, xq, yq = data
    total = 0
    for t in range(xs.shape[0]):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(mse(learner(xs[t]), ys[t]))
        total = total + mse(learner(xq[t]), yq[t]) / xs.shape[0]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return total.detach(), dict(zip([n for n, _ in named], torch.autograd.grad(total, [p for _, p in named])))


def test_reptile_leaves_frozen_parameters():
    model = frozen_model()
    frozen = model[0].weight.detach().clone()
    free = model[2].weight.detach().clone()
    xs, ys, _, _ = tasks()
    adapted = mamlext.Reptile(model, inner_lr=0.1, inner_steps=2, outer_step=0.5).step(xs, ys)
    assert torch.equal(model[0].weight, frozen) and torch.equal(adapted[0][0], frozen)
    assert not torch.equal(model[2].weight, free)


def test_imaml_frozen_parameters_are_not_adapted_nor_solved_for():
    """iMAML with a frozen layer equals iMAML on the model whose frozen layer is a constant: the adapted
    parameters keep it, and its solve runs on the blocks of the others."""
    model, data = frozen_model(), tasks()
    imaml = mamlext.iMAML(model, inner_lr=0.1, inner_steps=3, lam=2.0, cg_steps=30)
    adapted = imaml.adapt(data[0], data[1])
    assert torch.equal(adapted[0], model[0].weight.detach().expand_as(adapted[0]))
    imaml.meta_loss(*data).backward()
    assert model[0].weight.grad is None
    got = [p.grad.clone() for p in (model[0].bias, model[2].weight, model[2].bias)]
    # the same solve written out: phi from the adapted parameters only, g = (I + H / lam)^-1 grad L_query
    free = [model[0].bias, model[2].weight, model[2].bias]
    want = [torch.zeros_like(p) for p in free]
    xs, ys, xq, yq = data
    for t in range(xs.shape[0]):
        def forward(b0, w2, b2, x):
            return nn.functional.linear(torch.relu(nn.functional.linear(x, model[0].weight, b0)), w2, b2)
        phi = [p.detach().clone() for p in free]
        for step in range(3):
            phi_var = [p.clone().requires_grad_(True) for p in phi]
            loss = mse(forward(*phi_var, xs[t]), ys[t])
            g = torch.autograd.grad(loss, phi_var)
            phi = [p - 0.1 * (gi + (2.0 * (p - p0) if step > 0 else 0)) for p, gi, p0 in zip(phi, g, free)]
        flat = torch.cat([p.reshape(-1) for p in phi]).detach()
        sizes = [p.numel() for p in phi]

        def support(v):
            parts = torch.split(v, sizes)
            return mse(forward(*[q.reshape(p.shape) for q, p in zip(parts, phi)], xs[t]), ys[t])

        def query(v):
            parts = torch.split(v, sizes)
            return mse(forward(*[q.reshape(p.shape) for q, p in zip(parts, phi)], xq[t]), yq[t])
        hessian = torch.autograd.functional.hessian(support, flat)
        b = torch.autograd.functional.jacobian(query, flat)
        g = torch.linalg.solve(torch.eye(len(flat), dtype=flat.dtype) + hessian / 2.0, b) / xs.shape[0]
        for w, part, p in zip(want, torch.split(g, sizes), phi):
            w += part.reshape(p.shape)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


class Counter(nn.Module):
    """Reassigns its buffer in forward (not in place)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.n = self.n + 1
        return self.linear(x)


def test_buffer_reassigned_in_forward_is_refused_naming_the_module():
    model = Counter().double()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"module 'Counter' \(Counter\) changes its buffer 'n'"):
        mamlext.BatchedMAML(model, inner_lr=0.1).meta_loss(*tasks())
    assert_unchanged(model, before, "after the refused call")


@pytest.mark.parametrize("cpu_path", ["per_task", "layerwise", "team"])
@pytest.mark.parametrize("make", [lambda: nn.ReLU(), lambda: nn.LeakyReLU(0.1), lambda: nn.ELU()])
def test_nan_propagates_through_the_fused_kernels(make, cpu_path):
    model = nn.Sequential(nn.Linear(4, 5), make(), nn.Linear(5, 4)).double()
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    data = tasks()
    params = [p.detach() for p in model.parameters()]
    activation = type(model[1]).__name__.lower().replace("leakyrelu", "leaky_relu")
    act_param = {"leaky_relu": 0.1, "elu": 1.0}.get(activation, 0.0)
    losses, grads = ops.mlp_loss_grad(params, data[0], data[1], activation, act_param)
    assert torch.isnan(losses).all()
    if _ext._C is not None:  # every CPU implementation of the fused ops
        codes = (ACTIVATIONS[activation], act_param, LOSSES["mse"], cpu_path, 3 if cpu_path == "team" else 0)
        assert torch.isnan(torch.ops.mamlext._mlp_loss_grad_path(params, data[0], data[1], *codes)[0]).all()
        lrs = [torch.full((1,), 0.1, dtype=torch.float64) for _ in params]
        query_losses = torch.ops.mamlext._mlp_maml_path(params, *data, lrs, torch.ones(1, dtype=torch.float64), False,
                                                        *codes)[0]
        assert torch.isnan(query_losses).all()
    loss = mamlext.BatchedMAML(model, inner_lr=0.1, backend="fused").meta_loss(*data)
    assert torch.isnan(loss)
    # and the relu pass-through: a nan input of the activation gives nan gradients, as torch.relu's backward
    z = torch.tensor([float("nan"), 1.0, -1.0], dtype=torch.float64, requires_grad=True)
    torch.relu(z).sum().backward()
    assert torch.isnan(torch.relu(z.detach())[0]) and z.grad[0] == 1


def test_absurd_hyperparameters_are_refused():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    with pytest.raises(ValueError, match="outer_step must be a finite float"):
        mamlext.Reptile(model, outer_step=float("inf"))
    with pytest.raises(ValueError, match=r"lam must be in \[1e-08, 1e\+08\]"):
        mamlext.iMAML(model, lam=1e-300)
    params = [p.detach() for p in model.parameters()]
    xs, ys, xq, yq = tasks(in_f=2, out_f=1)
    for bad in (float("nan"), float("inf")):
        lrs = [torch.full((1,), bad, dtype=torch.float64) for _ in params]
        with pytest.raises(ValueError, match=r"mlp_maml: lrs\[0\] must be finite"):
            ops.mlp_maml(params, xs, ys, xq, yq, lrs, activation="tanh")
        with pytest.raises(ValueError, match="mlp_maml: step_weights must be finite"):
            ops.mlp_maml(params, xs, ys, xq, yq, 0.1, step_weights=[bad], activation="tanh")
    v = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="maml_reverse_step: v must be a sequence of tensors, got Tensor"):
        ops.maml_reverse_step(v, [v, v])


def test_errors_name_the_algorithm_and_the_problem():
    def vector_loss(out, y):
        return (out - y).square()  # not reduced to one task's mean
    model = nn.Sequential(nn.Linear(4, 4)).double()
    with pytest.raises(ValueError, match="BatchedMAML.meta_loss: the loss callable must return one task's mean loss"):
        mamlext.BatchedMAML(model, loss=vector_loss).meta_loss(*tasks())
    anil = mamlext.ANIL(nn.Sequential(nn.Linear(3, 4)).double(), nn.Linear(4, 4).double(), loss="mse")
    xs, ys, xq, yq = tasks(in_f=3)
    with pytest.raises(ValueError, match=r"^ANIL\.meta_loss: ys must hold the same T = 3 tasks"):
        anil.meta_loss(xs, ys[:2], xq, yq)
    with pytest.raises(ValueError, match=r"^Reptile: inner_steps must be an int >= 1"):
        mamlext.Reptile(model, inner_steps=0)
    with pytest.raises(ValueError, match=r"^Reptile\.adapt: xs"):
        mamlext.Reptile(model).adapt(xs, ys)
    with pytest.raises(ValueError, match="MAML: the model .Tanh. has no parameters"):
        mamlext.MAML(nn.Tanh(), lr=0.1)


def test_ops_take_empty_lists_and_refuse_vmap():
    assert torch.ops.mamlext.task_sgd([], [], 0.1) == []
    assert torch.ops.mamlext.task_sgd.tensor_lr([], [], []) == []
    assert torch.ops.mamlext.maml_reverse_step([], [], [], False) == ([], [])
    params = torch.zeros(3, 2, 4)
    grads = torch.ones(3, 2, 4)
    with pytest.raises(RuntimeError, match="torch.func.vmap over mamlext ops is not supported.*task dimension"):
        torch.func.vmap(lambda p, g: torch.ops.mamlext.task_sgd([p], [g], 0.1)[0])(params, grads)
