"""Tests of mamlext.metasgd.MetaSGD: meta-gradients (model parameters and per-element rates) against a plain
Meta-SGD written with torch.autograd.grad and torch.func.functional_call, learn2learn 0.2's MetaSGD semantics
(the behaviours its tests/unit/algorithms/metasgd_test.py checks, and its documented ones), and the errors."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from mamlext import ops
from mamlext.metasgd import MetaSGD

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")
RTOL = 1e-9
N_TASKS = 3


# ----------------------------------------------------------------------------------------------------------------
# Models and tasks


def mlp():
    """An MLP the fused engine serves."""
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def convnet():
    """Conv -> BatchNorm -> ReLU -> MaxPool -> Linear (the generic path: the model's own forward)."""
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3))


def regression_tasks(gen, n=N_TASKS, shots=8):
    tasks = []
    for _ in range(n):
        w = torch.randn(2, 1, generator=gen, dtype=DTYPE)
        xs, xq = (torch.randn(shots, 2, generator=gen, dtype=DTYPE) for _ in range(2))
        tasks.append((xs, torch.sin(xs @ w), xq, torch.sin(xq @ w)))
    return tasks


def image_tasks(gen, n=N_TASKS, ways=3, shots=2):
    labels = torch.arange(ways).repeat_interleave(shots)
    return [(torch.randn(ways * shots, 1, 10, 10, generator=gen, dtype=DTYPE), labels,
             torch.randn(ways * shots, 1, 10, 10, generator=gen, dtype=DTYPE), labels) for _ in range(n)]


CASES = {"mlp": (mlp, regression_tasks, F.mse_loss), "convnet": (convnet, image_tasks, F.cross_entropy)}


def make_case(name, seed=0):
    build, make_tasks, loss_fn = CASES[name]
    torch.manual_seed(seed)
    model = build().to(DTYPE).train()
    return model, make_tasks(torch.Generator().manual_seed(seed + 1)), loss_fn


def random_rates(model, seed=5):
    """Per-element rates that differ from element to element, so that a mix-up of rates would show."""
    gen = torch.Generator().manual_seed(seed)
    return [0.05 + 0.2 * torch.rand(p.shape, generator=gen, dtype=DTYPE) for p in model.parameters()]


# ----------------------------------------------------------------------------------------------------------------
# The oracle: a plain Meta-SGD, one task at a time


def plain_metasgd_grads(model, rates, tasks, loss_fn, steps, first_order):
    """Gradients of the summed query losses w.r.t. the model's parameters and the rates (leaf tensors), with
    ``steps`` inner steps p <- p - rate * grad per task (gradients detached when first_order)."""
    params = dict(model.named_parameters())
    total = 0.0
    for xs, ys, xq, yq in tasks:
        fast = dict(params)
        for _ in range(steps):
            loss = loss_fn(functional_call(model, fast, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {name: p - r * g for (name, p), r, g in zip(fast.items(), rates, grads)}
        total = total + loss_fn(functional_call(model, fast, (xq,)), yq)
    return torch.autograd.grad(total, list(params.values()) + list(rates))


def metasgd_grads(meta, tasks, loss_fn, steps, clone_kwargs=None, adapt_kwargs=None):
    """learn2learn-style meta-training step; returns the gradients on the model's parameters, then the rates."""
    for xs, ys, xq, yq in tasks:
        learner = meta.clone(**(clone_kwargs or {}))
        for _ in range(steps):
            learner.adapt(loss_fn(learner(xs), ys), **(adapt_kwargs or {}))
        loss_fn(learner(xq), yq).backward()
    return [p.grad for p in meta.module.parameters()] + [r.grad for r in meta.lrs]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def assert_close_rel(actual, expected, rtol=RTOL):
    assert all(a is not None for a in actual), "some tensor got no gradient"
    a, b = flat(actual), flat(expected)
    assert a.shape == b.shape
    assert b.norm() > 0 and a.norm() > 0, "gradients are all zero: the comparison would prove nothing"
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= rtol, f"relative error {rel:.3e} > {rtol:.0e}"


# ----------------------------------------------------------------------------------------------------------------
# Meta-gradients


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_meta_gradient_matches_plain_metasgd(case, steps, first_order):
    model, tasks, loss_fn = make_case(case)
    reference = copy.deepcopy(model)
    init = random_rates(model)
    rates = [nn.Parameter(r.clone()) for r in init]

    meta = MetaSGD(model, first_order=first_order, lrs=rates)
    assert (meta._fused is not None) == (case == "mlp"), "the MLP should take the fused path, the convnet not"
    actual = metasgd_grads(meta, tasks, loss_fn, steps)
    reference_rates = [r.clone().requires_grad_() for r in init]
    expected = plain_metasgd_grads(reference, reference_rates, tasks, loss_fn, steps, first_order)
    n = len(init)
    assert_close_rel(actual[:-n], expected[:-n])   # the model's parameters
    assert_close_rel(actual[-n:], expected[-n:])   # the rates
    for r, g in zip(rates, actual[-n:]):
        assert g.shape == r.shape


@pytest.mark.parametrize("case", list(CASES))
def test_default_rates_meta_gradient(case):
    """MetaSGD(model, lr): every rate element starts at lr; the meta-gradient is the plain one's."""
    model, tasks, loss_fn = make_case(case, seed=2)
    reference = copy.deepcopy(model)
    meta = MetaSGD(model, lr=0.1)
    actual = metasgd_grads(meta, tasks, loss_fn, 1)
    rates = [torch.full_like(p, 0.1).requires_grad_() for p in reference.parameters()]
    expected = plain_metasgd_grads(reference, rates, tasks, loss_fn, 1, False)
    assert_close_rel(actual, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_second_order_differs_from_first_order(case):
    """The two orders give different meta-gradients, or the tests above could not tell them apart: the
    parameters' from one step on, the rates' from two (after one step, d loss / d rate = -g * d loss / d p' in
    both)."""
    model, tasks, loss_fn = make_case(case)
    rates = [r.requires_grad_() for r in random_rates(model)]
    n = len(rates)
    for steps, part in ((1, slice(0, -n)), (2, slice(-n, None))):
        so = plain_metasgd_grads(model, rates, tasks, loss_fn, steps, first_order=False)
        fo = plain_metasgd_grads(model, rates, tasks, loss_fn, steps, first_order=True)
        a, b = flat(so[part]), flat(fo[part])
        assert ((a - b).norm() / a.norm()).item() > 1e-4


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("where", ["clone", "adapt"])
def test_first_order_overrides(first_order, where):
    """clone(first_order=...) and adapt(loss, first_order=...) win over the MetaSGD's own setting."""
    model, tasks, loss_fn = make_case("convnet")
    reference = copy.deepcopy(model)
    meta = MetaSGD(model, lr=0.1, first_order=not first_order)
    if where == "clone":
        learner = meta.clone(first_order=first_order)
        assert learner.first_order is first_order and meta.first_order is (not first_order)
        assert meta.clone().first_order is (not first_order)
        actual = metasgd_grads(meta, tasks, loss_fn, 2, clone_kwargs={"first_order": first_order})
    else:
        actual = metasgd_grads(meta, tasks, loss_fn, 2, adapt_kwargs={"first_order": first_order})
    rates = [torch.full_like(p, 0.1).requires_grad_() for p in reference.parameters()]
    assert_close_rel(actual, plain_metasgd_grads(reference, rates, tasks, loss_fn, 2, first_order))


class TiedNet(nn.Module):
    """Uses the same Linear twice, and also holds it under a second name."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.alias = self.shared
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.alias(torch.tanh(self.shared(x)))))


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_tied_parameters(first_order):
    """One rate per distinct parameter; a tied parameter is updated once and stays tied."""
    torch.manual_seed(0)
    model = TiedNet().to(DTYPE)
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    tasks = [tuple(torch.randn(6, d, generator=gen, dtype=DTYPE) for d in (4, 1, 4, 1)) for _ in range(N_TASKS)]
    init = random_rates(model)
    meta = MetaSGD(model, lrs=[nn.Parameter(r.clone()) for r in init], first_order=first_order)
    assert len(meta.lrs) == 4

    learner = meta.clone()
    xs, ys, _, _ = tasks[0]
    learner.adapt(F.mse_loss(learner(xs), ys))
    assert learner.module.shared.weight is learner.module.alias.weight
    assert len(list(learner.module.parameters())) == 4

    actual = metasgd_grads(meta, tasks, F.mse_loss, 2)
    rates = [r.clone().requires_grad_() for r in init]
    assert_close_rel(actual, plain_metasgd_grads(reference, rates, tasks, F.mse_loss, 2, first_order))


def test_scalar_rates_per_tensor():
    """lrs may hold a scalar per parameter tensor (one rate for the tensor), as learn2learn's p - lr * g allows."""
    model, tasks, loss_fn = make_case("mlp")
    reference = copy.deepcopy(model)
    values = [0.1, 0.2, 0.05, 0.15, 0.3, 0.08]
    meta = MetaSGD(model, lrs=[nn.Parameter(torch.tensor(v, dtype=DTYPE)) for v in values])
    actual = metasgd_grads(meta, tasks, loss_fn, 2)
    rates = [torch.tensor(v, dtype=DTYPE, requires_grad=True) for v in values]
    assert_close_rel(actual, plain_metasgd_grads(reference, rates, tasks, loss_fn, 2, False))
    assert all(r.grad.shape == () for r in meta.lrs)


def test_rates_computed_by_the_caller():
    """lrs holding tensors that are not Parameters (e.g. computed from a learned scale) are used as they are, and
    the meta-gradient flows into what they were computed from (learn2learn keeps them as a plain list)."""
    model, tasks, loss_fn = make_case("convnet")
    reference = copy.deepcopy(model)
    scale = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    meta = MetaSGD(model, lrs=[scale * torch.ones_like(p) for p in model.parameters()])
    assert isinstance(meta.lrs, list)
    assert len(list(meta.parameters())) == len(list(model.parameters()))
    total = 0.0
    for xs, ys, xq, yq in tasks:  # one backward: the rates' own graph is built once
        learner = meta.clone()
        learner.adapt(loss_fn(learner(xs), ys))
        total = total + loss_fn(learner(xq), yq)
    total.backward()
    ref_scale = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    rates = [ref_scale * torch.ones_like(p) for p in reference.parameters()]
    expected = plain_metasgd_grads(reference, rates, tasks, loss_fn, 1, False)
    total = torch.autograd.grad(flat(rates), ref_scale, flat(expected[-len(rates):]))[0]
    assert_close_rel([scale.grad], [total])


# ----------------------------------------------------------------------------------------------------------------
# learn2learn semantics (tests/unit/algorithms/metasgd_test.py and the documented behaviour)


def l2l_model():
    """learn2learn's test model: Linear / ReLU / Linear / Sigmoid / Linear / Softmax, with a buffer."""
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.Sigmoid(), nn.Linear(20, 20),
                          nn.Softmax(dim=-1)).to(DTYPE)
    model.register_buffer("dummy_buf", torch.zeros(1, 2, 3, 4, dtype=DTYPE))
    return model


@pytest.mark.parametrize("first_order", [False, True])
def test_clone_computes_as_the_model(first_order):
    torch.manual_seed(0)
    model = l2l_model()
    meta = MetaSGD(model, lr=0.1, first_order=first_order)
    x = torch.randn(7, 10, dtype=DTYPE)
    ref = model(x)
    for learner in (meta.clone(), meta.clone()):
        assert torch.equal(learner(x), ref)
    assert torch.equal(meta(x), ref)


def test_forward_passthrough_fused_mlp():
    model, tasks, _ = make_case("mlp")
    meta = MetaSGD(model, lr=0.1)
    assert meta._fused is not None
    xs = tasks[0][0]
    torch.testing.assert_close(meta(xs), model(xs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(meta.clone()(xs), model(xs), rtol=1e-12, atol=1e-12)


def test_graph_connection():
    torch.manual_seed(0)
    model = l2l_model()
    meta = MetaSGD(model, lr=0.1)
    learner = meta.clone()
    learner(torch.randn(7, 10, dtype=DTYPE)).norm(p=2).backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.norm() > 0


def test_meta_lr():
    """The rates are parameters of the MetaSGD, one per parameter element, each at lr."""
    model = l2l_model()
    meta = MetaSGD(model, lr=0.1)
    num_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in meta.parameters()) == 2 * num_params
    assert isinstance(meta.lrs, nn.ParameterList)
    for r, p in zip(meta.lrs, model.parameters()):
        assert isinstance(r, nn.Parameter) and r.requires_grad
        assert r.shape == p.shape and r.dtype == p.dtype
        assert torch.equal(r, torch.full_like(p, 0.1))
    # the model's parameters first, then the rates; the outer optimiser sees both
    assert [id(p) for p in meta.parameters()] == [id(p) for p in [*model.parameters(), *meta.lrs]]
    assert {f"lrs.{i}" for i in range(len(meta.lrs))} <= set(meta.state_dict())
    assert meta.module is model


def test_adaptation():
    torch.manual_seed(0)
    model = l2l_model()
    meta = MetaSGD(model, lr=0.1)
    x = torch.randn(7, 10, dtype=DTYPE)
    learner = meta.clone()
    loss = learner(x).norm(p=2)
    learner.adapt(loss)
    new_loss = learner(x).norm(p=2)
    assert loss >= new_loss
    new_loss.backward()
    for p in meta.parameters():
        assert p.grad is not None and p.grad.norm() > 0


@pytest.mark.parametrize("case", list(CASES))
def test_clone_shares_and_adapting_leaves_the_original_unchanged(case):
    model, tasks, loss_fn = make_case(case)
    meta = MetaSGD(model, lrs=[nn.Parameter(r) for r in random_rates(model)])
    before = [p.detach().clone() for p in model.parameters()]
    rates_before = [r.detach().clone() for r in meta.lrs]
    xs, ys, _, _ = tasks[0]

    learner = meta.clone()
    assert isinstance(learner, MetaSGD) and learner.module is not model
    assert learner.first_order is meta.first_order
    # parameters and rates: differentiable copies, not the same tensors; buffers shared (as learn2learn)
    for p, q in zip(learner.module.parameters(), model.parameters()):
        assert p is not q and torch.equal(p, q) and p.grad_fn is not None
    assert len(learner.lrs) == len(meta.lrs)
    for r, s in zip(learner.lrs, meta.lrs):
        assert r is not s and torch.equal(r, s) and r.grad_fn is not None
    for b, c in zip(learner.module.buffers(), model.buffers()):
        assert b is c
    assert list(learner.parameters()) == list(learner.module.parameters())  # a learner's rates are a plain list

    loss = loss_fn(learner(xs), ys)
    grads = torch.autograd.grad(loss, list(learner.module.parameters()), retain_graph=True)
    learner.adapt(loss)
    for p, b in zip(model.parameters(), before):
        assert isinstance(p, nn.Parameter) and torch.equal(p.detach(), b) and p.grad is None
    for r, b in zip(meta.lrs, rates_before):
        assert torch.equal(r.detach(), b) and r.grad is None
    for p, b, r, g in zip(learner.module.parameters(), before, rates_before, grads):
        torch.testing.assert_close(p.detach(), b - r * g, rtol=1e-12, atol=1e-12)
        assert p.grad_fn is not None
    assert not torch.equal(meta(xs), learner(xs))

    # a clone of a learner adapts from the learner's state, and leaves it unchanged
    inner = learner.clone()
    inner.adapt(loss_fn(inner(xs), ys))
    for p, q in zip(learner.module.parameters(), inner.module.parameters()):
        assert not torch.equal(p, q)


def test_attribute_passthrough():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)
            self.note = "hello"

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model = Net()
    meta = MetaSGD(model, lr=0.1)
    assert meta.head is model.head and meta.note == "hello"
    learner = meta.clone()
    assert isinstance(learner.head, nn.Linear) and learner.head is not model.head
    with pytest.raises(AttributeError):
        meta.nothing_here


def test_given_parameter_list_and_list_of_parameters():
    model = nn.Linear(3, 2).to(DTYPE)
    plist = nn.ParameterList([nn.Parameter(torch.full_like(p, 0.3)) for p in model.parameters()])
    assert MetaSGD(model, lrs=plist).lrs is plist
    params = [nn.Parameter(torch.full_like(p, 0.3)) for p in model.parameters()]
    meta = MetaSGD(model, lrs=params, lr=None)  # lr is unused when lrs is given
    assert isinstance(meta.lrs, nn.ParameterList)
    assert all(a is b for a, b in zip(meta.lrs, params))
    assert [id(p) for p in meta.parameters()] == [id(p) for p in [*model.parameters(), *params]]


def test_to_moves_the_rates():
    meta = MetaSGD(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)), lr=0.5).to(DTYPE)
    assert all(r.dtype == DTYPE for r in meta.lrs)
    x = torch.randn(5, 3, dtype=DTYPE)
    learner = meta.clone()
    learner.adapt(learner(x).pow(2).mean())
    learner(x).sum().backward()
    assert all(r.grad is not None for r in meta.lrs)


def test_update_is_one_task_sgd_call(monkeypatch):
    """Every parameter's update goes through one ops.task_sgd call with the per-element rates."""
    real = ops.task_sgd
    calls = []

    def counting(params, grads, lr):
        out = real(params, grads, lr)
        calls.append((list(params), list(grads), list(lr), out))
        return out

    monkeypatch.setattr(ops, "task_sgd", counting)
    model, tasks, loss_fn = make_case("convnet")
    meta = MetaSGD(model, lrs=[nn.Parameter(r) for r in random_rates(model)])
    xs, ys, _, _ = tasks[0]
    learner = meta.clone()
    for k in range(2):
        learner.adapt(loss_fn(learner(xs), ys))
        assert len(calls) == k + 1
        params, grads, rates, out = calls[-1]
        assert len(params) == len(grads) == len(rates) == len(meta.lrs)
        for g, r, p in zip(grads, rates, model.parameters()):
            assert g.shape == (1, *p.shape) and r.shape == p.shape
        out_ptrs = {o.data_ptr() for o in out}
        assert all(p.data_ptr() in out_ptrs for p in learner.module.parameters())


@pytest.mark.filterwarnings("error:The .grad attribute of a Tensor that is not a leaf Tensor")
def test_rnn_learner():
    """An RNN's flat weights follow the adapted parameters (learn2learn issue 139)."""
    torch.manual_seed(0)
    model = nn.GRU(2, 3).to(DTYPE)
    meta = MetaSGD(model, lr=0.1)
    x = torch.randn(5, 4, 2, dtype=DTYPE)
    learner = meta.clone()
    learner.adapt(learner(x)[0].pow(2).sum())
    adapted = {name: p for name, p in learner.module.named_parameters()}
    torch.testing.assert_close(learner(x)[0], functional_call(model, adapted, (x,))[0], rtol=1e-12, atol=1e-12)
    learner(x)[0].pow(2).sum().backward()
    assert all(p.grad is not None for p in meta.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_memory_does_not_grow():
    """learn2learn's memory test: repeated clone / adapt leaves no memory behind."""
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(10)])
    meta = MetaSGD(model, lr=1e-4).cuda()
    usages = []
    for _ in range(5):
        learner = meta.clone()
        x = torch.randn(1024, 128, device="cuda")
        for _ in range(5):
            learner.adapt(torch.norm(learner(x)))
        usages.append(torch.cuda.memory_allocated(0))
    assert all(u == usages[0] for u in usages)


def test_matches_learn2learn():
    l2l = pytest.importorskip("learn2learn")
    model, tasks, loss_fn = make_case("convnet")
    other = copy.deepcopy(model)
    ours = metasgd_grads(MetaSGD(model, lr=0.1), tasks, loss_fn, 2)
    theirs = metasgd_grads(l2l.algorithms.MetaSGD(other, lr=0.1), tasks, loss_fn, 2)
    assert_close_rel(ours, theirs)


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_model():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        MetaSGD(lambda x: x, lr=0.1)
    with pytest.raises(ValueError, match="no parameters"):
        MetaSGD(nn.ReLU(), lr=0.1)


@pytest.mark.parametrize("lr", [None, float("nan"), float("inf"), "0.1", True, torch.tensor([0.1, 0.2]),
                                torch.tensor(1)])
def test_bad_lr(lr):
    with pytest.raises(ValueError, match="lr must be a finite"):
        MetaSGD(nn.Linear(2, 2), lr=lr)


def test_scalar_tensor_lr_gives_its_value():
    meta = MetaSGD(nn.Linear(2, 2), lr=torch.tensor(0.25))
    assert all(torch.equal(r, torch.full_like(r, 0.25)) for r in meta.lrs)


def test_bad_lrs():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    good = [torch.full_like(p, 0.1) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"lrs holds 3 tensors but the model has 4 parameters"):
        MetaSGD(model, lrs=good[:3])
    with pytest.raises(ValueError, match=r"lrs\[1\] has shape \[3\] but parameter 1 has shape \[4\]"):
        MetaSGD(model, lrs=[good[0], torch.ones(3), *good[2:]])
    with pytest.raises(TypeError, match=r"lrs\[2\] must be a tensor"):
        MetaSGD(model, lrs=[good[0], good[1], 0.1, good[3]])
    with pytest.raises(ValueError, match=r"lrs\[0\] must be a floating-point tensor"):
        MetaSGD(model, lrs=[torch.ones(4, 3, dtype=torch.int64), *good[1:]])
    with pytest.raises(ValueError, match=r"lrs\[3\] must be finite"):
        MetaSGD(model, lrs=[*good[:3], torch.tensor([float("nan")])])
    with pytest.raises(TypeError, match="lrs must be a list of tensors"):
        MetaSGD(model, lrs=torch.ones(4))
    with pytest.raises(TypeError, match="lrs must be a list of tensors"):
        MetaSGD(model, lrs=0.1)


def test_bad_losses():
    model, tasks, loss_fn = make_case("mlp")
    meta = MetaSGD(model, lr=0.1)
    xs, ys, _, _ = tasks[0]
    learner = meta.clone()
    with pytest.raises(TypeError, match="loss must be a tensor"):
        learner.adapt(1.0)
    with pytest.raises(ValueError, match=r"loss must be a scalar tensor, got shape \[8, 1\]"):
        learner.adapt((learner(xs) - ys) ** 2)
    with pytest.raises(ValueError, match="does not depend on the learner's parameters"):
        learner.adapt(torch.tensor(1.0, dtype=DTYPE))
    with pytest.raises(ValueError, match="does not depend on any parameter of the learner's module"):
        learner.adapt(loss_fn(meta(xs), ys))  # the original's output, not the learner's
    learner.adapt(loss_fn(learner(xs), ys))  # the learner is still usable


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 1)
        self.unused = nn.Linear(3, 1)

    def forward(self, x):
        return self.used(x)


def test_unused_and_frozen_parameters_are_named():
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    learner = MetaSGD(WithUnused(), lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"parameter 'unused\.weight' was not used"):
        learner.adapt(F.mse_loss(learner(x), y))
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    model[2].bias.requires_grad_(False)
    learner = MetaSGD(model, lr=0.1).clone()
    with pytest.raises(RuntimeError, match=r"parameter '2\.bias' does not require grad"):
        learner.adapt(F.mse_loss(learner(x), y))


def test_module_changed_after_construction():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    meta = MetaSGD(model, lr=0.1)
    model.append(nn.ReLU()).append(nn.Linear(1, 1))
    learner = meta.clone()
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="module has 6 parameters but lrs holds 4 rates"):
        learner.adapt(learner(x).pow(2).mean())
