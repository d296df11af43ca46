"""Which models the fused MLP engine takes, and what happens when the model changes: every engine computes the
model as it is at each call, and models with hooks, parametrizations or too many layers run as they are (the
generic engine; mamlext.MAML's own forward), giving the per-task loop's meta-gradient."""
import copy

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn import functional as F

import mamlext
from mamlext.data import SinusoidTasks

LR = 0.1


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def data(rows=5, tasks=3):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, rows, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(tasks, rows, 1, generator=gen, dtype=torch.float64)
    return x, y, x.flip(1), y.flip(1)


def loop_grads(model, xs, ys, xq, yq):
    """The per-task autograd loop, by hand (one inner step, mse), on the model itself."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    total = 0
    for t in range(xs.shape[0]):
        support = F.mse_loss(torch.func.functional_call(model, dict(zip(names, params)), (xs[t],)), ys[t])
        grads = torch.autograd.grad(support, params, create_graph=True)
        fast = {n: p - LR * g for n, p, g in zip(names, params, grads)}
        total = total + F.mse_loss(torch.func.functional_call(model, fast, (xq[t],)), yq[t]) / xs.shape[0]
    return torch.autograd.grad(total, params)


def finite_difference_grads(model, xs, ys, xq, yq, eps=1e-6):
    """Central differences of the meta-objective (its value by the per-task loop, which PyTorch computes right even
    where its second derivatives are wrong)."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def objective():
        total = 0.0
        for t in range(xs.shape[0]):
            current = [p.detach().requires_grad_() for p in params]
            support = F.mse_loss(torch.func.functional_call(model, dict(zip(names, current)), (xs[t],)), ys[t])
            grads = torch.autograd.grad(support, current)
            fast = {n: p - LR * g for n, p, g in zip(names, current, grads)}
            total += F.mse_loss(torch.func.functional_call(model, fast, (xq[t],)), yq[t]).item() / xs.shape[0]
        return total
    def shift(p, i, by):
        with torch.no_grad():
            p.view(-1)[i] += by
    out = []
    for p in params:
        grad = torch.zeros_like(p)
        for i in range(p.numel()):
            shift(p, i, eps)
            up = objective()
            shift(p, i, -2 * eps)
            down = objective()
            shift(p, i, eps)
            grad.view(-1)[i] = (up - down) / (2 * eps)
        out.append(grad)
    return out


def engine_grads(algorithm, model, batch):
    for p in model.parameters():
        p.grad = None
    algorithm.meta_loss(*batch).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return grads


def maml_grads(model, batch, maml=None):
    """mamlext.MAML's per-task loop (learn2learn's interface), with a new MAML of the model or the one given."""
    maml = mamlext.MAML(model, lr=LR) if maml is None else maml
    xs, ys, xq, yq = batch
    for p in model.parameters():
        p.grad = None
    for t in range(xs.shape[0]):
        learner = maml.clone()
        learner.adapt(F.mse_loss(learner(xs[t]), ys[t]))
        (F.mse_loss(learner(xq[t]), yq[t]) / xs.shape[0]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return grads


def assert_all_close(got, want, context):
    assert len(got) == len(want), context
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=context)


# --- models the fused engine must not take ------------------------------------------------------------------------

def with_forward_hook():
    model = mlp()
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    return model


def with_forward_pre_hook():
    model = mlp()
    model[2].register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    return model


def with_weight_norm():
    model = mlp()
    model[0] = nn.utils.weight_norm(model[0])
    return model


def with_parametrization():
    model = mlp()
    nn.utils.parametrizations.weight_norm(model[2])
    return model


def deep():
    torch.manual_seed(0)
    layers = [nn.Linear(2, 3)]
    for _ in range(17):
        layers += [nn.Tanh(), nn.Linear(3, 3)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(3, 1)).double()


UNSERVED = {"forward hook": with_forward_hook, "forward pre-hook": with_forward_pre_hook,
            "weight_norm": with_weight_norm, "parametrization": with_parametrization, "19 Linear layers": deep}


@pytest.mark.parametrize("case", list(UNSERVED))
def test_models_the_fused_engine_cannot_compute_run_as_they_are(case):
    """The generic engine gives the true meta-gradient; mamlext.MAML the per-task loop's, as learn2learn. They are
    the same except for weight_norm, whose second derivative PyTorch computes wrongly (torch._weight_norm fails
    gradgradcheck in torch 2.14): there the generic engine, which composes it from primitive ops, matches central
    finite differences and the per-task loop does not."""
    model = UNSERVED[case]()
    batch = data()
    loop = loop_grads(model, *batch)
    want = finite_difference_grads(model, *batch) if "weight_norm" in case or "parametrization" in case else loop
    with pytest.raises(ValueError, match="hook|parametrized|weight and bias|at most 16"):
        mamlext.BatchedMAML(model, inner_lr=LR, backend="fused")
    for memory in ("graph", "low"):
        maml = mamlext.BatchedMAML(model, inner_lr=LR, memory=memory)
        assert maml.engine == "generic", case
        got = engine_grads(maml, model, batch)
        if want is loop:
            assert_all_close(got, want, f"{case}: BatchedMAML, memory={memory}")
        else:
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=f"{case}: finite differences")
    assert_all_close(maml_grads(model, batch), loop, f"{case}: mamlext.MAML")


def test_a_global_hook_routes_to_the_generic_engine_and_sees_every_layer():
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(type(module)))
    try:
        assert mamlext.BatchedMAML(mlp()).engine == "generic"
        model = mlp()
        learner = mamlext.MAML(model, lr=LR).clone()
        learner(data()[0][0])
        assert nn.Linear in seen and nn.Tanh in seen
    finally:
        handle.remove()
    assert mamlext.BatchedMAML(mlp()).engine == "fused_mlp"


def test_backward_hooks_fire_in_mamlext_maml_as_in_learn2learn():
    model = mlp()
    fired = []
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: fired.append(1))
    batch = data()
    want = loop_grads(model, *batch)
    assert_all_close(maml_grads(model, batch), want, "backward hook")
    assert fired, "the backward hook never fired"
    assert mamlext.BatchedMAML(model).engine == "generic"


# --- the model edited after wrapping ------------------------------------------------------------------------------

EDITS = {
    "activation replaced": lambda m: m.__setitem__(1, nn.ReLU()),
    "Linear replaced": lambda m: m.__setitem__(2, nn.Linear(6, 1).double()),
    "layer appended": lambda m: (m.append(nn.Sigmoid()), m.append(nn.Linear(1, 1).double())),
    "hook registered": lambda m: m[1].register_forward_hook(lambda module, args, out: out + 0.5),
    "leaky slope changed": lambda m: (m.__setitem__(1, nn.LeakyReLU(0.1)), setattr(m[1], "negative_slope", 0.3)),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edit_after_wrapping_is_seen_by_the_next_call(edit):
    model = mlp()
    batch = data()
    batched = mamlext.BatchedMAML(model, inner_lr=LR)
    batched.meta_loss(*batch)  # the engine has seen the model
    maml = mamlext.MAML(model, lr=LR)
    maml.clone()(batch[0][0])
    EDITS[edit](model)
    want = loop_grads(model, *batch)
    assert_all_close(engine_grads(batched, model, batch), want, f"{edit}: BatchedMAML")
    assert_all_close(maml_grads(model, batch, maml), want, f"{edit}: mamlext.MAML")


def test_a_dtype_change_after_wrapping_moves_the_engine_or_names_the_reason():
    model = mlp()
    fused = mamlext.BatchedMAML(model, inner_lr=LR, backend="fused")
    auto = mamlext.BatchedMAML(model, inner_lr=LR)
    model.float()
    batch = [t.float() for t in data()]
    assert fused.meta_loss(*batch).dtype == torch.float32
    model.half()
    with pytest.raises(ValueError, match="float32 or all float64"):
        fused.meta_loss(*[t.half() for t in batch])
    model.double()
    auto.meta_loss(*data())
    assert auto.engine == "fused_mlp"


def test_learned_rates_refuse_a_model_whose_parameters_changed():
    model = mlp()
    maml = mamlext.BatchedMAML(model, inner_lr=LR, lr_mode="per_param")
    model.append(nn.Tanh())
    model.append(nn.Linear(1, 1).double())
    with pytest.raises(ValueError, match="learns a rate for each parameter it had"):
        maml.meta_loss(*data())


@pytest.mark.parametrize("setting, value", [("inner_steps", 3), ("lr_mode", "per_param"), ("loss", "ce"),
                                            ("memory", "low"), ("task_chunk", 2)])
def test_settings_fixed_at_construction_refuse_assignment(setting, value):
    maml = mamlext.BatchedMAML(mlp(), inner_lr=LR)
    before = getattr(maml, setting)
    with pytest.raises(AttributeError, match=f"{setting} is fixed when it is built"):
        setattr(maml, setting, value)
    assert getattr(maml, setting) == before
    maml.meta_loss(*data())


def test_settings_read_at_each_call_take_effect():
    model = mlp()
    batch = data()
    maml = mamlext.BatchedMAML(model, inner_lr=0.5)
    maml.inner_lr = LR
    maml.first_order = True
    twin = mamlext.BatchedMAML(copy.deepcopy(model), inner_lr=LR, first_order=True)
    assert maml.meta_loss(*batch).item() == twin.meta_loss(*batch).item()
    assert_all_close(engine_grads(maml, model, batch), engine_grads(twin, twin.model, batch), "first_order")


# --- targets, outputs and arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5), (3, 5, 3), (3, 5, 1, 1)])
def test_mis_shaped_mse_targets_are_refused_by_every_engine(shape):
    model = mlp()
    xs = data()[0]
    ys = torch.zeros(shape, dtype=torch.float64)
    for backend in ("fused", "generic"):
        with pytest.raises(ValueError, match="ys must be"):
            mamlext.BatchedMAML(model, backend=backend).meta_loss(xs, ys, xs, ys)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(2, 3)

    def forward(self, x):
        h = self.body(x)
        return {"out": h, "norm": h.square().sum(-1)}


def test_a_model_returning_a_dict_works_with_a_loss_callable_and_is_refused_by_builtin_losses():
    model = TwoHeads().double()
    xs = data()[0]
    ys = torch.randn(3, 5, 3, dtype=torch.float64)

    def loss_fn(out, y):
        return (out["out"] - y).square().mean() + 0.1 * out["norm"].mean()
    loss = mamlext.BatchedMAML(model, inner_lr=LR, loss=loss_fn).meta_loss(xs, ys, xs, ys)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(RuntimeError, match="returns a dict.*loss callable"):
        mamlext.BatchedMAML(model).meta_loss(xs, ys, xs, ys)


def test_forward_mode_tangents_pass_through_the_fused_layers():
    model = mlp()
    fused = mamlext.nn.FusedMLP.from_sequential(model)
    learner = mamlext.MAML(model, lr=LR).clone()
    x, tangent = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, tangent)
        want = forward_ad.unpack_dual(model(dual)).tangent
        for what, out in (("FusedMLP", fused(dual)), ("a learner", learner(dual)),
                          ("ops.mlp", mamlext.ops.mlp(list(model.parameters()), dual, "tanh"))):
            got = forward_ad.unpack_dual(out).tangent
            assert got is not None, f"{what} dropped the tangent"
            torch.testing.assert_close(got, want, msg=what)


def test_learners_pass_attributes_through_and_keep_a_learned_rate_among_their_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(2, 3), nn.Linear(3, 1)

        def forward(self, x):
            return self.head(self.body(x))
    rate = nn.Parameter(torch.tensor(0.1))
    maml = mamlext.MAML(Net(), lr=rate)
    learner = maml.clone()
    assert isinstance(learner.head, nn.Linear) and learner.head is not maml.module.head
    assert any(p is rate for p in learner.parameters()) and "lr" in learner.state_dict()
    with pytest.raises(AttributeError):
        learner.no_such_attribute


@pytest.mark.parametrize("lr", [None, "0.1", float("nan"), float("inf"), True])
def test_maml_refuses_a_rate_that_is_not_a_finite_number(lr):
    with pytest.raises(ValueError, match="MAML: lr must be"):
        mamlext.MAML(mlp(), lr=lr)


def test_inner_lr_beyond_the_models_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="inner_lr"):
        mamlext.BatchedMAML(mlp().float(), inner_lr=1e39)
    mamlext.BatchedMAML(mlp(), inner_lr=1e39)  # finite in float64


def test_data_helpers_are_reachable_after_import_mamlext_and_check_their_arguments():
    assert callable(mamlext.data.stack_tasks)
    for kwargs in (dict(seed="a"), dict(dtype=torch.int64), dict(device="no-such-device")):
        with pytest.raises(ValueError, match="SinusoidTasks: "):
            SinusoidTasks(**kwargs)
    with pytest.raises(ValueError, match="tasks must be a positive int"):
        SinusoidTasks().sample(True, 5)
