"""Tests of mamlext.MAML: meta-gradients against a plain MAML written with torch.autograd.grad and
torch.func.functional_call, learn2learn 0.2 semantics, and that the inner update goes through ops.task_sgd."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import mamlext
from mamlext import MAML

from conftest import DEVICES

DTYPE = torch.float64
RTOL = 1e-6
N_TASKS = 3


# ----------------------------------------------------------------------------------------------------------------
# Models and tasks


def sinusoid_mlp():
    """Finn et al.'s sinusoid regression network."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def small_convnet():
    """Conv -> BatchNorm -> ReLU -> MaxPool -> Linear, 1x12x12 inputs, 3 classes."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))


def sinusoid_tasks(n_tasks, device, gen, shots=10):
    tasks = []
    for _ in range(n_tasks):
        amplitude = 0.1 + 4.9 * torch.rand((), generator=gen, dtype=DTYPE)
        phase = math.pi * torch.rand((), generator=gen, dtype=DTYPE)
        xs = (torch.rand(shots, 1, generator=gen, dtype=DTYPE) * 10 - 5)
        xq = (torch.rand(shots, 1, generator=gen, dtype=DTYPE) * 10 - 5)
        tasks.append(tuple(t.to(device) for t in (xs, amplitude * torch.sin(xs + phase),
                                                  xq, amplitude * torch.sin(xq + phase))))
    return tasks


def image_tasks(n_tasks, device, gen, ways=3, shots=2):
    tasks = []
    labels = torch.arange(ways).repeat_interleave(shots)
    for _ in range(n_tasks):
        xs = torch.randn(ways * shots, 1, 12, 12, generator=gen, dtype=DTYPE)
        xq = torch.randn(ways * shots, 1, 12, 12, generator=gen, dtype=DTYPE)
        tasks.append(tuple(t.to(device) for t in (xs, labels, xq, labels)))
    return tasks


CASES = {
    "sinusoid_mlp": (sinusoid_mlp, sinusoid_tasks, F.mse_loss, 0.01),
    "convnet_bn": (small_convnet, image_tasks, F.cross_entropy, 0.1),
}


def make_case(name, device, seed=0):
    build, make_tasks, loss_fn, lr = CASES[name]
    torch.manual_seed(seed)
    model = build().to(device=device, dtype=DTYPE).train()
    gen = torch.Generator().manual_seed(seed + 1)
    return model, make_tasks(N_TASKS, device, gen), loss_fn, lr


# ----------------------------------------------------------------------------------------------------------------
# The oracle: a plain MAML


def plain_maml_grads(model, tasks, loss_fn, lr, steps, first_order, extra=()):
    """Gradients of the summed query losses w.r.t. the model's parameters (and ``extra`` tensors, e.g. a
    learnable lr), with ``steps`` inner SGD steps per task."""
    params = dict(model.named_parameters())
    total = 0.0
    for xs, ys, xq, yq in tasks:
        fast = dict(params)
        for _ in range(steps):
            loss = loss_fn(functional_call(model, fast, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {name: p - lr * g for (name, p), g in zip(fast.items(), grads)}
        total = total + loss_fn(functional_call(model, fast, (xq,)), yq)
    return torch.autograd.grad(total, list(params.values()) + list(extra))


def mamlext_meta_grads(maml, tasks, loss_fn, steps, clone_kwargs=None):
    """learn2learn-style meta-training step; returns the gradients accumulated on the model's parameters."""
    for xs, ys, xq, yq in tasks:
        learner = maml.clone(**(clone_kwargs or {}))
        for _ in range(steps):
            learner.adapt(loss_fn(learner(xs), ys))
        loss_fn(learner(xq), yq).backward()
    return [p.grad for p in maml.module.parameters()]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def assert_close_rel(actual, expected, rtol=RTOL):
    assert all(a is not None for a in actual), "some parameter got no gradient"
    a, b = flat(actual), flat(expected)
    assert a.shape == b.shape
    assert b.norm() > 0 and a.norm() > 0, "gradients are all zero: the comparison would prove nothing"
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= rtol, f"relative error {rel:.3e} > {rtol:.0e}"


# ----------------------------------------------------------------------------------------------------------------
# Meta-gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_meta_gradient_matches_plain_maml(device, case, steps, first_order):
    model, tasks, loss_fn, lr = make_case(case, device)
    reference_model = copy.deepcopy(model)

    maml = MAML(model, lr=lr, first_order=first_order)
    actual = mamlext_meta_grads(maml, tasks, loss_fn, steps)
    expected = plain_maml_grads(reference_model, tasks, loss_fn, lr, steps, first_order)
    assert_close_rel(actual, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_second_order_differs_from_first_order(device, case):
    """The two orders must give different meta-gradients, or the tests above could not tell them apart."""
    model, tasks, loss_fn, lr = make_case(case, device)
    so = flat(plain_maml_grads(model, tasks, loss_fn, lr, 1, first_order=False))
    fo = flat(plain_maml_grads(model, tasks, loss_fn, lr, 1, first_order=True))
    assert ((so - fo).norm() / so.norm()).item() > 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_clone_first_order_overrides(device, first_order):
    """clone(first_order=...) wins over the MAML's own setting (and so does adapt(..., first_order=...))."""
    model, tasks, loss_fn, lr = make_case("sinusoid_mlp", device)
    reference_model = copy.deepcopy(model)
    maml = MAML(model, lr=lr, first_order=not first_order)
    learner = maml.clone(first_order=first_order)
    assert learner.first_order is first_order
    assert maml.first_order is (not first_order)

    actual = mamlext_meta_grads(maml, tasks, loss_fn, 2, clone_kwargs={"first_order": first_order})
    expected = plain_maml_grads(reference_model, tasks, loss_fn, lr, 2, first_order)
    assert_close_rel(actual, expected)

    # the same through adapt's own argument
    model.zero_grad()
    for xs, ys, xq, yq in tasks:
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(loss_fn(learner(xs), ys), first_order=first_order)
        loss_fn(learner(xq), yq).backward()
    assert_close_rel([p.grad for p in model.parameters()], expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_learnable_lr_gradient(device, case, steps, first_order):
    model, tasks, loss_fn, _ = make_case(case, device)
    reference_model = copy.deepcopy(model)
    lr = nn.Parameter(torch.tensor(0.1, dtype=DTYPE, device=device))
    reference_lr = nn.Parameter(torch.tensor(0.1, dtype=DTYPE, device=device))

    maml = MAML(model, lr=lr, first_order=first_order)
    assert maml.lr is lr
    actual = mamlext_meta_grads(maml, tasks, loss_fn, steps)
    expected = plain_maml_grads(reference_model, tasks, loss_fn, reference_lr, steps, first_order,
                                extra=[reference_lr])
    assert lr.grad is not None
    assert lr.grad.abs() > 0
    assert_close_rel([lr.grad], [expected[-1]])
    assert_close_rel(actual, expected[:-1])


# ----------------------------------------------------------------------------------------------------------------
# learn2learn semantics


@pytest.mark.parametrize("device", DEVICES)
def test_clone_adapt_leaves_original_unchanged(device):
    model, tasks, loss_fn, lr = make_case("sinusoid_mlp", device)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    maml = MAML(model, lr=lr)
    xs, ys, _, _ = tasks[0]

    learner = maml.clone()
    assert isinstance(learner, MAML)
    assert learner.module is not model
    originals = dict(model.named_parameters())
    for name, p in learner.module.named_parameters():
        assert p is not originals[name]
        assert torch.equal(p, before[name])

    loss = loss_fn(learner(xs), ys)
    grads = dict(zip(before, torch.autograd.grad(loss, list(learner.module.parameters()), retain_graph=True)))
    learner.adapt(loss)

    for name, p in model.named_parameters():
        assert isinstance(p, nn.Parameter)
        assert p is originals[name]
        assert torch.equal(p.detach(), before[name]), f"{name} of the original module changed"
        assert p.grad is None
    adapted = dict(learner.module.named_parameters())
    assert set(adapted) == set(before)
    for name, p in adapted.items():
        assert not torch.equal(p.detach(), before[name]), f"{name} was not adapted"
        torch.testing.assert_close(p.detach(), before[name] - lr * grads[name], rtol=1e-12, atol=1e-12)
        assert p.grad_fn is not None, f"{name}: the adapted parameter is not connected to the original"
    # the original module still computes with the original parameters
    assert not torch.equal(maml(xs), learner(xs))


@pytest.mark.parametrize("device", DEVICES)
def test_module_lr_and_forward_passthrough(device):
    model, tasks, _, _ = make_case("convnet_bn", device)
    model.eval()  # deterministic passthrough comparison
    maml = MAML(model, lr=0.25)
    assert maml.module is model
    assert maml.lr == 0.25
    xs = tasks[0][0]
    assert torch.equal(maml(xs), model(xs))
    learner = maml.clone()
    assert learner.lr == 0.25
    assert torch.equal(learner(xs), model(xs))
    # the parameters seen through the MAML wrapper are the model's
    assert [id(p) for p in maml.parameters()] == [id(p) for p in model.parameters()]


class TiedNet(nn.Module):
    """Uses the same Linear twice, and also holds it under a second name."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.alias = self.shared
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.alias(torch.tanh(self.shared(x)))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_tied_parameters_stay_tied(device, first_order):
    torch.manual_seed(0)
    model = TiedNet().to(device=device, dtype=DTYPE)
    reference_model = copy.deepcopy(model)
    assert reference_model.alias is reference_model.shared
    gen = torch.Generator().manual_seed(3)
    tasks = [tuple(torch.randn(8, d, generator=gen, dtype=DTYPE).to(device) for d in (4, 1, 4, 1))
             for _ in range(N_TASKS)]
    maml = MAML(model, lr=0.1, first_order=first_order)

    learner = maml.clone()
    assert learner.module.shared.weight is learner.module.alias.weight
    # (as in learn2learn, the submodule object itself is copied per name; its parameters stay shared)
    xs, ys, _, _ = tasks[0]
    learner.adapt(F.mse_loss(learner(xs), ys))
    learner.adapt(F.mse_loss(learner(xs), ys))
    assert learner.module.shared.weight is learner.module.alias.weight
    assert learner.module.shared.bias is learner.module.alias.bias
    assert len(list(learner.module.parameters())) == 4
    assert not torch.equal(learner.module.shared.weight.detach(), model.shared.weight.detach())

    actual = mamlext_meta_grads(maml, tasks, F.mse_loss, 2)
    expected = plain_maml_grads(reference_model, tasks, F.mse_loss, 0.1, 2, first_order)
    assert_close_rel(actual, expected)


class SharedAcrossModules(nn.Module):
    """One Parameter object registered in two different submodules."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).sum(-1, keepdim=True)


def test_parameter_shared_across_submodules_stays_tied():
    torch.manual_seed(0)
    model = SharedAcrossModules().to(DTYPE)
    maml = MAML(model, lr=0.1)
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 1, dtype=DTYPE)
    learner = maml.clone()
    assert learner.module.a.weight is learner.module.b.weight
    learner.adapt(F.mse_loss(learner(x), y))
    assert learner.module.a.weight is learner.module.b.weight
    assert not torch.equal(learner.module.a.weight.detach(), model.a.weight.detach())
    assert learner.module.a.bias is not learner.module.b.bias


def _frozen_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DTYPE)
    model[2].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("where", ["constructor", "clone", "adapt"])
def test_nograd_parameter(where):
    model = _frozen_model()
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 1, dtype=DTYPE)

    learner = MAML(model, lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"2\.bias") as info:
        learner.adapt(F.mse_loss(learner(x), y))
    assert "allow_nograd=True" in str(info.value)

    if where == "constructor":
        learner = MAML(model, lr=0.1, allow_nograd=True).clone()
        learner.adapt(F.mse_loss(learner(x), y))
    elif where == "clone":
        learner = MAML(model, lr=0.1).clone(allow_nograd=True)
        learner.adapt(F.mse_loss(learner(x), y))
    else:
        learner = MAML(model, lr=0.1).clone()
        learner.adapt(F.mse_loss(learner(x), y), allow_nograd=True)
    frozen = learner.module[2].bias
    assert not frozen.requires_grad
    assert torch.equal(frozen, model[2].bias.detach())
    assert not torch.equal(learner.module[2].weight.detach(), model[2].weight.detach())
    F.mse_loss(learner(x), y).backward()
    assert model[2].bias.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 1)
        self.unused = nn.Linear(3, 1)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("where", ["constructor", "clone", "adapt", "allow_nograd"])
def test_unused_parameter(where):
    torch.manual_seed(0)
    model = WithUnused().to(DTYPE)
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 1, dtype=DTYPE)

    learner = MAML(model, lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"unused\.weight") as info:
        learner.adapt(F.mse_loss(learner(x), y))
    assert "allow_unused=True" in str(info.value)

    if where == "constructor":
        learner = MAML(model, lr=0.1, allow_unused=True).clone()
        learner.adapt(F.mse_loss(learner(x), y))
    elif where == "clone":
        learner = MAML(model, lr=0.1).clone(allow_unused=True)
        learner.adapt(F.mse_loss(learner(x), y))
    elif where == "adapt":
        learner = MAML(model, lr=0.1).clone()
        learner.adapt(F.mse_loss(learner(x), y), allow_unused=True)
    else:  # learn2learn: allow_unused defaults to allow_nograd
        learner = MAML(model, lr=0.1, allow_nograd=True).clone()
        learner.adapt(F.mse_loss(learner(x), y))
    assert torch.equal(learner.module.unused.weight.detach(), model.unused.weight.detach())
    assert torch.equal(learner.module.unused.bias.detach(), model.unused.bias.detach())
    assert not torch.equal(learner.module.used.weight.detach(), model.used.weight.detach())
    F.mse_loss(learner(x), y).backward()
    assert model.used.weight.grad is not None and model.used.weight.grad.abs().sum() > 0
    assert model.unused.weight.grad is None


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        MAML(lambda x: x, lr=0.1)
    with pytest.raises(TypeError):
        MAML(torch.zeros(3), lr=0.1)
    with pytest.raises(ValueError, match="scalar"):
        MAML(nn.Linear(2, 2), lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="scalar"):
        MAML(nn.Linear(2, 2), lr=nn.Parameter(torch.full((2, 2), 0.1)))
    MAML(nn.Linear(2, 2), lr=torch.tensor(0.1))  # a scalar tensor is fine


# ----------------------------------------------------------------------------------------------------------------
# The update goes through ops.task_sgd


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_adapt_with_a_tensor_rate_calls_task_sgd_once(monkeypatch, device, first_order):
    """A tensor (learnable) rate goes through task_sgd, which differentiates it."""
    real = mamlext.ops.task_sgd
    calls = []

    def counting_task_sgd(params, grads, lr):
        out = real(params, grads, lr)
        calls.append((list(params), list(grads), lr, out))
        return out

    monkeypatch.setattr(mamlext.ops, "task_sgd", counting_task_sgd)
    model, tasks, loss_fn, lr = make_case("convnet_bn", device)
    lr = torch.tensor(lr, dtype=torch.float64, device=device)
    maml = MAML(model, lr=lr, first_order=first_order)
    n_params = len(list(model.parameters()))
    xs, ys, xq, yq = tasks[0]

    learner = maml.clone()
    assert calls == []
    for k in range(3):
        learner.adapt(loss_fn(learner(xs), ys))
        assert len(calls) == k + 1
        params, grads, call_lr, out = calls[-1]
        assert len(params) == len(grads) == len(out) == n_params
        assert torch.equal(call_lr, lr.to(call_lr.dtype))
        for g, o in zip(grads, out):
            assert g.shape[0] == 1 and o.shape[0] == 1  # one task, leading task dimension
            assert g.requires_grad is (not first_order)
        # the adapted parameters are the op's outputs (views of them), not a separate computation
        out_ptrs = {o.data_ptr() for o in out}
        for p in learner.module.parameters():
            assert p.data_ptr() in out_ptrs
    loss_fn(learner(xq), yq).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(calls) == 3


def test_task_sgd_output_is_what_the_learner_uses(monkeypatch):
    """With a tensor rate, if task_sgd's result changes, so does the adapted learner: nothing bypasses the op."""
    real = mamlext.ops.task_sgd
    monkeypatch.setattr(mamlext.ops, "task_sgd", lambda params, grads, lr: real(params, grads, 2 * lr))
    model, tasks, loss_fn, lr = make_case("sinusoid_mlp", "cpu")
    xs, ys, _, _ = tasks[0]
    learner = MAML(model, lr=torch.tensor(lr, dtype=torch.float64)).clone()
    loss = loss_fn(learner(xs), ys)
    grads = torch.autograd.grad(loss, list(learner.module.parameters()), retain_graph=True)
    learner.adapt(loss)
    for p, p0, g in zip(learner.module.parameters(), model.parameters(), grads):
        torch.testing.assert_close(p.detach(), p0.detach() - 2 * lr * g, rtol=1e-12, atol=1e-12)


def test_cpu_float64_uses_compiled_kernel_when_available(monkeypatch):
    """With the extension loaded, adapt dispatches to torch.ops.mamlext.task_sgd, not the reference twin."""
    if not mamlext._ext.has_kernels("cpu"):
        pytest.skip("compiled extension not loaded")

    def forbidden(*args, **kwargs):
        raise AssertionError("reference.task_sgd was used although compiled kernels are available")

    monkeypatch.setattr(mamlext.reference, "task_sgd", forbidden)
    model, tasks, loss_fn, lr = make_case("sinusoid_mlp", "cpu")
    xs, ys, xq, yq = tasks[0]
    learner = MAML(model, lr=torch.tensor(lr, dtype=torch.float64)).clone()
    learner.adapt(loss_fn(learner(xs), ys))
    loss_fn(learner(xq), yq).backward()


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_float_rate_update_is_exact_sgd_without_task_sgd(monkeypatch, first_order):
    """A float rate: one task has nothing to batch, so the update is one multi-tensor add, p - lr * g exactly,
    differentiable twice (the second-order meta-gradient is pinned by the tests above)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a float rate should not need task_sgd")
    monkeypatch.setattr(mamlext.ops, "task_sgd", forbidden)
    model, tasks, loss_fn, lr = make_case("sinusoid_mlp", "cpu")
    xs, ys, _, _ = tasks[0]
    learner = MAML(model, lr=lr, first_order=first_order).clone()
    loss = loss_fn(learner(xs), ys)
    grads = torch.autograd.grad(loss, list(learner.module.parameters()), retain_graph=True)
    learner.adapt(loss)
    for p, p0, g in zip(learner.module.parameters(), model.parameters(), grads):
        assert torch.equal(p.detach(), torch.add(p0.detach(), g, alpha=-lr))
        assert p.grad_fn is not None
