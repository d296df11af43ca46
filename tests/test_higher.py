"""mamlext.higher.innerloop_ctx against higher's documented behaviour, written out as a plain-PyTorch oracle: a
hand-written differentiable torch.optim.SGD update over lists of tensors and torch.autograd.grad(create_graph=True),
the model run by torch.func.functional_call. float64 throughout."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mamlext.ops
from mamlext.higher import innerloop_ctx

DT = torch.float64
TOL = 1e-9

# SGD settings: (name, constructor kwargs); nesterov needs momentum and no dampening (torch's rule).
OPTIONS = [
    ("plain", dict(lr=0.1)),
    ("momentum", dict(lr=0.1, momentum=0.9)),
    ("dampening", dict(lr=0.1, momentum=0.8, dampening=0.3)),
    ("nesterov", dict(lr=0.1, momentum=0.7, nesterov=True)),
    ("weight_decay", dict(lr=0.1, weight_decay=0.05)),
    ("maximize", dict(lr=0.02, momentum=0.5, maximize=True)),
    ("all", dict(lr=0.05, momentum=0.6, nesterov=True, weight_decay=0.01)),
]
SGD_DEFAULTS = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).to(DT)


class Tied(nn.Module):
    """A custom module with a tied weight (used twice) and a keyword argument."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)
        self.mid = nn.Linear(5, 5)
        self.mid.weight = self.inp.weight

    def forward(self, x, scale=1.0):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x))))) * scale


def data(model):
    g = torch.Generator().manual_seed(1)
    shape = (6, 1, 10, 10) if isinstance(model[0], nn.Conv2d) else (6, 5)
    xs, xq = torch.randn(shape, generator=g, dtype=DT), torch.randn(shape, generator=g, dtype=DT)
    ys, yq = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 3, generator=g, dtype=DT)
    return xs, ys, xq, yq


def groups_of(model, options, per_group):
    """The SGD's param groups: one group, or (per_group) the first layer with other settings than the rest."""
    params = list(model.parameters())
    if not per_group:
        return [dict(params=params, **options)]
    other = dict(options, lr=options["lr"] * 0.5, weight_decay=0.02)
    if other.get("momentum", 0) == 0:
        other.update(momentum=0.3)
    return [dict(params=params[:2], **other), dict(params=params[2:], **options)]


def oracle(model, groups, steps, xs, ys, copy_initial, track, loss_fn=F.mse_loss, lrs=None):
    """higher's documented semantics by hand: the fast weights of every step (list of lists) and the initial ones.
    lrs: per-group tensor rates overriding the groups' lr."""
    named = list(model.named_parameters())
    names, params = [n for n, _ in named], [p for _, p in named]
    setting = [None] * len(params)
    for g, group in enumerate(groups):
        for p in group["params"]:
            s = dict(SGD_DEFAULTS, **{k: v for k, v in group.items() if k != "params"})
            if lrs is not None:
                s["lr"] = lrs[g]
            setting[next(i for i, q in enumerate(params) if q is p)] = s
    if copy_initial:
        fast = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    else:
        fast = [p.clone() for p in params]
    history, bufs = [fast], [None] * len(params)
    for _ in range(steps):
        loss = loss_fn(torch.func.functional_call(model, dict(zip(names, fast)), (xs,)), ys)
        idx = [i for i, p in enumerate(fast) if setting[i] is not None and p.requires_grad]
        grads = torch.autograd.grad(loss, [fast[i] for i in idx], create_graph=track, allow_unused=True)
        new = list(fast)
        for i, g in zip(idx, grads):
            s, p = setting[i], fast[i]
            d = -g if s["maximize"] else g
            if s["weight_decay"] != 0:
                d = d + s["weight_decay"] * p
            if s["momentum"] != 0:
                bufs[i] = d if bufs[i] is None else s["momentum"] * bufs[i] + (1 - s["dampening"]) * d
                if not track:
                    bufs[i] = bufs[i].detach()
                d = d + s["momentum"] * bufs[i] if s["nesterov"] else bufs[i]
            new[i] = p - s["lr"] * d
            if not track:
                new[i] = new[i].detach().requires_grad_()
        fast = new
        history.append(fast)
    return history


def assert_rel(actual, expected, tol=TOL):
    for a, e in zip(actual, expected):
        assert a is not None and e is not None
        scale = max(e.abs().max().item(), 1e-30)
        err = (a - e).abs().max().item() / scale
        assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


def run_ours(model, opt, steps, xs, ys, xq, yq, copy_initial, track, loss_fn=F.mse_loss, **ctx):
    with innerloop_ctx(model, opt, copy_initial_weights=copy_initial, track_higher_grads=track, **ctx) as (fm, do):
        for _ in range(steps):
            do.step(loss_fn(fm(xs), ys))
        loss_fn(fm(xq), yq).backward()
    return fm, do


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused MLP forwards (ops.mlp, which mamlext.nn.run_fused calls)."""
    calls = []
    real = mamlext.ops.mlp

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mamlext.ops, "mlp", spy)
    return calls


# --- meta-gradients against the oracle --------------------------------------------------------------------------

@pytest.mark.parametrize("make", [mlp, convnet], ids=["mlp", "conv"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name,options", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_meta_gradients_maml(make, steps, name, options, fused_calls):
    """copy_initial_weights=False: the meta-gradient lands in model.parameters(), as the oracle's."""
    model = make()
    xs, ys, xq, yq = data(model)
    groups = groups_of(model, options, per_group=False)
    run_ours(model, torch.optim.SGD(groups), steps, xs, ys, xq, yq, copy_initial=False, track=True)
    ours = [p.grad for p in model.parameters()]
    fast = oracle(model, groups, steps, xs, ys, copy_initial=False, track=True)[-1]
    expected = torch.autograd.grad(F.mse_loss(torch.func.functional_call(
        model, dict(zip([n for n, _ in model.named_parameters()], fast)), (xq,)), yq), list(model.parameters()))
    assert_rel(ours, expected)
    assert (len(fused_calls) == steps + 1) if make is mlp else not fused_calls


@pytest.mark.parametrize("make", [mlp, convnet], ids=["mlp", "conv"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("copy_initial", [True, False])
@pytest.mark.parametrize("name,options", [OPTIONS[1], OPTIONS[6]], ids=["momentum", "all"])
def test_meta_gradients_per_group(make, steps, copy_initial, name, options):
    """Two parameter groups with different settings; copy_initial_weights=True puts the meta-gradient in
    fmodel.parameters(time=0) and leaves model.parameters() without gradients."""
    model = make()
    xs, ys, xq, yq = data(model)
    groups = groups_of(model, options, per_group=True)
    fm, _ = run_ours(model, torch.optim.SGD(groups), steps, xs, ys, xq, yq, copy_initial=copy_initial, track=True)
    history = oracle(model, groups, steps, xs, ys, copy_initial=copy_initial, track=True)
    names = [n for n, _ in model.named_parameters()]
    targets = history[0] if copy_initial else list(model.parameters())
    expected = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, dict(zip(names, history[-1])),
                                                                         (xq,)), yq), targets)
    if copy_initial:
        assert all(p.grad is None for p in model.parameters())
        assert_rel([p.grad for p in fm.parameters(time=0)], expected)
        assert_rel(list(fm.init_fast_params), history[0])
    else:
        assert_rel([p.grad for p in model.parameters()], expected)
    for k in range(steps + 1):  # the history, step by step
        assert_rel(list(fm.parameters(time=k)), history[k])


@pytest.mark.parametrize("make", [mlp, convnet], ids=["mlp", "conv"])
@pytest.mark.parametrize("copy_initial", [True, False])
def test_first_order(make, copy_initial):
    """track_higher_grads=False: the fast weights are detached after each step (first order); only the latest are
    kept; the meta-gradient is the query gradient at the adapted weights and never reaches the model."""
    model = make()
    xs, ys, xq, yq = data(model)
    groups = groups_of(model, OPTIONS[6][1], per_group=True)
    fm, _ = run_ours(model, torch.optim.SGD(groups), 3, xs, ys, xq, yq, copy_initial=copy_initial, track=False)
    final = oracle(model, groups, 3, xs, ys, copy_initial=copy_initial, track=False)[-1]
    names = [n for n, _ in model.named_parameters()]
    expected = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, dict(zip(names, final)), (xq,)), yq),
                                   final)
    latest = list(fm.parameters())
    assert all(p.is_leaf and p.requires_grad for p in latest)
    assert_rel(latest, final)
    assert_rel([p.grad for p in latest], expected)
    assert all(p.grad is None for p in model.parameters())
    assert [p is q for p, q in zip(fm.parameters(time=0), latest)] == [True] * len(latest)
    with pytest.raises(ValueError, match="not tracking higher gradients"):
        fm.parameters(time=1)
    with pytest.raises(Exception, match="not tracking higher gradients"):
        fm.init_fast_params


def test_custom_module_tied_weights_and_kwargs():
    """Any nn.Module through functional_call: a tied weight (one fast weight for both uses) and keyword args."""
    model = Tied().to(DT)
    g = torch.Generator().manual_seed(2)
    xs, xq, ys, yq = (torch.randn(6, k, generator=g, dtype=DT) for k in (5, 5, 3, 3))
    groups = groups_of(model, OPTIONS[3][1], per_group=False)
    assert len(list(model.parameters())) == 5  # the tied weight once
    with innerloop_ctx(model, torch.optim.SGD(groups), copy_initial_weights=False) as (fm, do):
        for _ in range(2):
            do.step(F.mse_loss(fm(xs, scale=2.0), ys))
        F.mse_loss(fm(xq, scale=2.0), yq).backward()
        assert fm.mid.weight is fm.inp.weight is fm.fast_params[0]  # higher: submodules hold the fast weights
        assert fm and [n for n, _ in fm.named_parameters()] == [n for n, _ in model.named_parameters()]
    lf = lambda out, y: F.mse_loss(out * 2.0, y)  # noqa: E731  (the oracle's call has no kwargs)
    fast = oracle(model, groups, 2, xs, ys, copy_initial=False, track=True, loss_fn=lf)[-1]
    names = [n for n, _ in model.named_parameters()]
    expected = torch.autograd.grad(lf(torch.func.functional_call(model, dict(zip(names, fast)), (xq,)), yq),
                                   list(model.parameters()))
    assert_rel([p.grad for p in model.parameters()], expected)


# --- the fast weights against torch.optim.SGD's own steps -------------------------------------------------------

@pytest.mark.parametrize("make", [mlp, convnet], ids=["mlp", "conv"])
@pytest.mark.parametrize("name,options", OPTIONS + [("tensor_lr", dict(lr=torch.tensor(0.07), momentum=0.5))],
                         ids=[o[0] for o in OPTIONS] + ["tensor_lr"])
def test_fast_weights_equal_torch_sgd(make, name, options):
    """k differentiable steps give torch.optim.SGD's own k steps on a copy (per-group settings, and the momentum
    buffers an optimizer that already stepped holds, which the differentiable optimizer starts from)."""
    model = make()
    xs, ys, _, _ = data(model)
    opt = torch.optim.SGD(groups_of(model, options, per_group=True))
    F.mse_loss(model(xs * 0.5), ys).backward()  # one real step first: the optimizer has momentum buffers
    opt.step()
    opt.zero_grad()
    ref_model, ref_opt = copy.deepcopy((model, opt))
    expected = []
    for _ in range(3):
        ref_opt.zero_grad()
        F.mse_loss(ref_model(xs), ys).backward()
        ref_opt.step()
        expected.append([p.detach().clone() for p in ref_model.parameters()])
    with innerloop_ctx(model, opt) as (fm, do):
        for k in range(3):
            new = do.step(F.mse_loss(fm(xs), ys))
            assert [a is b for a, b in zip(new, fm.fast_params)] == [True] * len(new)
            for a, e in zip(fm.parameters(time=k + 1), expected[k]):
                torch.testing.assert_close(a.detach(), e, rtol=1e-12, atol=1e-14)


# --- override, grad_callback, frozen parameters ----------------------------------------------------------------

@pytest.mark.parametrize("where", ["ctx", "step"])
def test_override_learned_lr(where):
    """override={"lr": [one tensor per group]}: learned rates, meta-gradients to them and to the model."""
    model = mlp()
    xs, ys, xq, yq = data(model)
    groups = groups_of(model, OPTIONS[1][1], per_group=True)
    lrs = [torch.tensor(0.08, dtype=DT, requires_grad=True), torch.tensor(0.03, dtype=DT, requires_grad=True)]
    override = {"lr": lrs}
    ctx_kw = dict(override=override) if where == "ctx" else {}
    with innerloop_ctx(model, torch.optim.SGD(groups), copy_initial_weights=False, **ctx_kw) as (fm, do):
        for k in range(3):
            do.step(F.mse_loss(fm(xs), ys), override=override if where == "step" and k == 0 else None)
        F.mse_loss(fm(xq), yq).backward()
    params = list(model.parameters())
    fast = oracle(model, groups, 3, xs, ys, copy_initial=False, track=True, lrs=lrs)[-1]
    names = [n for n, _ in model.named_parameters()]
    expected = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, dict(zip(names, fast)), (xq,)), yq),
                                   params + lrs)
    assert_rel([p.grad for p in params] + [lr.grad for lr in lrs], expected)


def test_override_errors():
    model = mlp()
    opt = torch.optim.SGD(groups_of(model, dict(lr=0.1), per_group=True))
    with pytest.raises(ValueError, match="unknown setting 'betas'"):
        with innerloop_ctx(model, opt, override={"betas": [(0.9, 0.99)]}):
            pass
    with pytest.raises(ValueError, match="number of parameter groups"):
        with innerloop_ctx(model, opt, override={"lr": [0.1, 0.2, 0.3]}):
            pass


def test_grad_callback_and_step_params():
    """grad_callback sees every gradient in model.parameters()' order; halving them halves the step. step(params=)
    and fmodel(x, params=) take explicit weights, which become the latest."""
    model = mlp()
    xs, ys, _, _ = data(model)
    halve = lambda grads: [g * 0.5 for g in grads]  # noqa: E731
    with innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fm, do):
        halved = do.step(F.mse_loss(fm(xs), ys), grad_callback=halve)
    with innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.05)) as (fm2, do2):
        init = list(fm2.parameters(time=0))
        out = fm2(xs, params=init)  # params= appends to the history
        assert len(list(fm2.parameters(time=1))) == len(init)
        plain = do2.step(F.mse_loss(out, ys), params=init)
    assert_rel(halved, plain, 1e-12)
    assert_rel(list(fm2.parameters(time=2)), plain, 0)


def test_frozen_and_unoptimized_parameters():
    """A parameter with requires_grad=False, and one the optimizer does not hold, are not updated (the frozen one
    stays frozen); the others match the oracle."""
    model = mlp()
    model[0].bias.requires_grad_(False)
    xs, ys, xq, yq = data(model)
    params = list(model.parameters())
    groups = [dict(params=params[:4], lr=0.1, momentum=0.9)]  # the last layer is not optimized
    fm, _ = run_ours(model, torch.optim.SGD(groups), 2, xs, ys, xq, yq, copy_initial=False, track=True)
    history = oracle(model, groups, 2, xs, ys, copy_initial=False, track=True)
    latest = list(fm.parameters())
    assert not latest[1].requires_grad and torch.equal(latest[1], params[1])
    assert torch.equal(latest[4], params[4]) and torch.equal(latest[5], params[5])
    assert_rel(latest, history[-1])
    assert params[1].grad is None
    names = [n for n, _ in model.named_parameters()]
    trainable = [p for p in params if p.requires_grad]
    expected = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, dict(zip(names, history[-1])),
                                                                         (xq,)), yq), trainable)
    assert_rel([p.grad for p in trainable], expected)


# --- refusals and the model left as it was ---------------------------------------------------------------------

def test_unsupported_optimizer_refused():
    model = mlp()

    class MySGD(torch.optim.SGD):
        pass

    for opt in (torch.optim.Adam(model.parameters()), MySGD(model.parameters(), lr=0.1)):
        with pytest.raises(ValueError, match=r"must be one of: torch\.optim\.SGD"):
            with innerloop_ctx(model, opt):
                pass
    other = nn.Linear(2, 2).to(DT)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        with innerloop_ctx(model, torch.optim.SGD(other.parameters(), lr=0.1)):
            pass


def _snapshot(model):
    return ([(p, p.detach().clone(), p.requires_grad, p.grad) for p in model.parameters()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()])


@pytest.mark.parametrize("raises", [False, True])
def test_model_unchanged(raises):
    """Parameters (identity and values), buffers (BatchNorm statistics), training flags and hooks of the model are
    as they were when the context exits, also when the body raises."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)).to(DT)
    model[3].eval()  # mixed flags
    xs, ys, xq, yq = data(mlp())
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="body failed") if raises else pytest.MonkeyPatch.context():
        with innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) as (fm, do):
            for _ in range(2):
                do.step(F.mse_loss(fm(xs), ys))
            fm.module[0].register_forward_hook(lambda *a: None)
            fm.eval()
            F.mse_loss(fm(xq), yq).backward()
            assert not fm.module[1].training and not fm.training
            assert fm.module[1].num_batches_tracked.item() == 2  # the copy's statistics moved
            if raises:
                raise RuntimeError("body failed")
    after = _snapshot(model)
    for (p, value, rg, grad), (q, value2, rg2, grad2) in zip(before[0], after[0]):
        assert p is q and torch.equal(value, value2) and rg == rg2 and grad is grad2 is None
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2] == after[2]


# --- higher itself, where installed ------------------------------------------------------------------------------

def test_against_higher():
    higher = pytest.importorskip("higher")
    for make in (mlp, convnet):
        model = make()
        xs, ys, xq, yq = data(model)
        groups = groups_of(model, OPTIONS[6][1], per_group=True)
        grads = []
        for ctx in (higher.innerloop_ctx, innerloop_ctx):
            model.zero_grad()
            with ctx(model, torch.optim.SGD(groups), copy_initial_weights=False) as (fm, do):
                for _ in range(3):
                    do.step(F.mse_loss(fm(xs), ys))
                F.mse_loss(fm(xq), yq).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert_rel(grads[1], grads[0])
