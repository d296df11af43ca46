"""Tests of mamlext.utils (clone_module, update_module, detach_module) against learn2learn 0.2's semantics: the
behaviours its tests/unit/utils_test.py checks, its documented ones, and a plain MAML written with them against
one written with torch.func.functional_call."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from mamlext import ops
from mamlext.utils import clone_module, detach_module, update_module

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x):
        return self.model(x)


def small_cnn(channels=1, classes=3):
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, classes)).to(DTYPE)


class ConvNet(nn.Module):
    """learn2learn's shared-parameter test module: the convolutions sit in seq and head, and in net too."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 5, 3, 2, 1))
        self.net = nn.Sequential(self.seq, self.head)

    def forward(self, x):
        return self.net(x)


class TiedNet(nn.Module):
    """One Linear used twice and held under two names, and a parameter shared between two submodules."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.alias = self.shared
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 1)
        self.b.bias = nn.Parameter(self.a.bias[:1].detach().clone())
        self.c = nn.Linear(3, 3)
        self.c.weight = self.a.weight

    def forward(self, x):
        h = torch.tanh(self.alias(torch.tanh(self.shared(x))))
        return self.b(torch.tanh(self.c(torch.tanh(self.a(h)))))


def ref_clone_module(module):
    """The documented semantics, written plainly: a deep copy whose parameters (and buffers that require grad)
    are .clone()s of the originals (no tied parameters, no RNNs)."""
    clone = copy.deepcopy(module)
    for mod, orig in zip(clone.modules(), module.modules()):
        for key, p in orig._parameters.items():
            if p is not None:
                mod._parameters[key] = p.clone()
        for key, b in orig._buffers.items():
            if b is not None and b.requires_grad:
                mod._buffers[key] = b.clone()
    return clone


def sgd_step(model, gradients, lr=0.01):
    with torch.no_grad():
        for param, gradient in zip(model.parameters(), gradients):
            param.sub_(lr * gradient)


# ----------------------------------------------------------------------------------------------------------------
# clone_module


def test_clone_module_basics():
    """A step on the original and the same step on the clone (from its own gradients) give the same parameters."""
    torch.manual_seed(0)
    model = Model()
    x, target = torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.zeros(1, 2)
    grads = torch.autograd.grad(F.mse_loss(model(x), target), list(model.parameters()))
    clone = clone_module(model)
    sgd_step(model, grads)
    clone_grads = torch.autograd.grad(F.mse_loss(clone(x), target), list(clone.parameters()))
    for p, g in zip(clone.parameters(), clone_grads):
        p.data.sub_(0.01 * g)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_clone_is_a_differentiable_copy():
    torch.manual_seed(0)
    model = small_cnn().train()
    clone = clone_module(model)
    assert type(clone) is type(model) and clone is not model
    for (name, p), (cname, q) in zip(model.named_parameters(), clone.named_parameters()):
        assert name == cname and p is not q and torch.equal(p, q)
        assert q.grad_fn is not None and not isinstance(q, nn.Parameter)
    for m, c in zip(model.modules(), clone.modules()):
        assert m is not c and type(m) is type(c)
    # buffers that do not require grad are shared, as in learn2learn: a train-mode forward of the clone updates
    # the original's running statistics
    for b, c in zip(model.buffers(), clone.buffers()):
        assert b is c
    before = model[1].running_mean.clone()
    x = torch.randn(4, 1, 8, 8, dtype=DTYPE)
    out = clone(x)
    assert not torch.equal(model[1].running_mean, before)
    # gradients flow back to the original's parameters, and the original is unchanged
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8)])
def test_clone_module_matches_reference(shape):
    """learn2learn's test_clone_module_models: repeated clone / forward / backward / step on the original gives
    exactly the reference clone's gradients and parameters."""
    torch.manual_seed(0)
    ref_model = small_cnn(channels=shape[0])
    model = copy.deepcopy(ref_model)
    x = torch.randn(5, *shape, dtype=DTYPE)
    for m, clone_fn in ((ref_model, ref_clone_module), (model, clone_module)):
        m.grads = []
        for _ in range(4):
            m.zero_grad()
            clone_fn(m)(x).norm(p=2).backward()
            m.grads.append([p.grad.clone() for p in m.parameters()])
            sgd_step(m, [p.grad for p in m.parameters()])
    for ref_g, g in zip(ref_model.grads, model.grads):
        assert all(torch.equal(a, b) for a, b in zip(ref_g, g))
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_clone_module_nomodule():
    class TrickyModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.tricky_modules = nn.ModuleList([nn.Linear(2, 1), None, nn.Linear(1, 1)])

    clone = clone_module(TrickyModule())
    assert [m is None for m in clone.tricky_modules] == [False, True, False]
    for thing in (None, 3, "text"):
        assert clone_module(thing) is thing


def test_clone_module_shared_params():
    """learn2learn's test_module_clone_shared_params, and tied parameters staying tied in the copy."""
    original = ConvNet()
    clone = clone_module(original)
    assert len(list(clone.parameters())) == len(list(original.parameters()))
    orig_ptrs = {p.data_ptr() for p in original.parameters()}
    assert not any(p.data_ptr() in orig_ptrs for p in clone.parameters()), "clone() forgot some parameters"
    assert clone.net[0][0].weight is clone.seq[0].weight

    model = TiedNet()
    clone = clone_module(model)
    assert clone.shared.weight is clone.alias.weight and clone.c.weight is clone.a.weight
    assert clone.b.bias is not clone.a.bias
    assert len(list(clone.parameters())) == len(list(model.parameters()))
    x = torch.randn(5, 3)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_clone_module_memo_and_one_clone_op(monkeypatch):
    """A memo shared between calls makes the copies of two modules that share a parameter share its clone; every
    parameter is cloned through one ops.clone_tensors call."""
    calls = []
    real = ops.clone_tensors
    monkeypatch.setattr(ops, "clone_tensors", lambda tensors: calls.append(len(tensors)) or real(tensors))
    first = nn.Linear(3, 3)
    second = nn.Linear(3, 3)
    second.weight = first.weight
    memo = {}
    c1, c2 = clone_module(first, memo=memo), clone_module(second, memo=memo)
    assert c1.weight is c2.weight and c1.bias is not c2.bias
    assert memo[first.weight] is c1.weight and memo[second.bias] is c2.bias
    assert calls == [2, 1]
    # without a shared memo, each copy has its own clone
    assert clone_module(first).weight is not clone_module(second).weight


def test_clone_module_buffers_that_require_grad():
    """A buffer that requires grad is cloned (differentiably), as learn2learn does; the others are shared."""
    model = nn.BatchNorm1d(3)
    source = torch.ones(3, requires_grad=True)
    model.running_mean = source * 2  # a buffer with a graph
    clone = clone_module(model)
    assert clone.running_mean is not model.running_mean and torch.equal(clone.running_mean, model.running_mean)
    assert clone.running_var is model.running_var
    clone.running_mean.sum().backward()
    assert torch.equal(source.grad, torch.full((3,), 2.0))


RNNS = [nn.RNN, nn.LSTM, nn.GRU]


@pytest.mark.parametrize("rnn_class", RNNS)
def test_rnn_clone_and_update(rnn_class):
    """learn2learn issue 139: an RNN's cached flat weights follow the cloned and updated parameters."""
    torch.manual_seed(0)
    model = rnn_class(2, 3).to(DTYPE)
    x = torch.randn(6, 4, 2, dtype=DTYPE)
    clone = clone_module(model)
    assert torch.equal(clone(x)[0], model(x)[0])
    assert all(a is b for a, b in zip(clone._flat_weights, clone.parameters()))
    grads = torch.autograd.grad(clone(x)[0].pow(2).sum(), list(clone.parameters()), create_graph=True)
    update_module(clone, updates=[-0.1 * g for g in grads])
    assert all(a is b for a, b in zip(clone._flat_weights, clone.parameters()))
    fast = {name: p - 0.1 * g for (name, p), g in zip(model.named_parameters(), grads)}
    torch.testing.assert_close(clone(x)[0], functional_call(model, fast, (x,))[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rnn_class", RNNS)
def test_rnn_maml_improves(rnn_class):
    """learn2learn's test_rnn_clone, with a MAML written with clone_module and update_module: after one outer
    step, the adapted loss is lower."""
    torch.manual_seed(1234)
    model = rnn_class(2, 1)
    optim = torch.optim.SGD(model.parameters(), lr=0.001)
    data = torch.randn(20, 20, 2)

    def adapted_loss():
        learner = clone_module(model)
        for _ in range(3):
            loss = learner(data)[0].norm(p=2)
            grads = torch.autograd.grad(loss, list(learner.parameters()), create_graph=True)
            update_module(learner, updates=[-1e-3 * g for g in grads])
        return learner(data)[0].norm(p=2)

    first = adapted_loss()
    optim.zero_grad()
    first.backward()
    optim.step()
    assert first.item() > adapted_loss().item()


# ----------------------------------------------------------------------------------------------------------------
# update_module


def test_update_module_with_updates():
    """learn2learn's test_module_update_shared_params: the clone becomes original + update."""
    torch.manual_seed(0)
    original = ConvNet()
    clone = clone_module(original)
    updates = [torch.randn_like(p) for p in clone.parameters()]
    assert update_module(clone, updates) is clone
    assert len(list(clone.parameters())) == len(list(original.parameters()))
    for p, c, u in zip(original.parameters(), clone.parameters(), updates):
        assert torch.equal(c, p + u)
    assert clone.net[0][0].weight is clone.seq[0].weight
    orig_ptrs = {p.data_ptr() for p in original.parameters()}
    assert not any(p.data_ptr() in orig_ptrs for p in clone.parameters())
    assert all(getattr(p, "update", None) is None for p in original.parameters())


def test_update_module_update_attributes_and_tied_parameters():
    """Updates given as .update attributes; a tied parameter is updated once (p + u, not p + 2u) and stays tied;
    the attributes are cleared; buffers with an .update are updated too."""
    torch.manual_seed(0)
    model = TiedNet()
    model.register_buffer("scale", torch.ones(3))
    clone = clone_module(model)
    before = {name: p.detach().clone() for name, p in clone.named_parameters()}
    for p in clone.parameters():
        p.update = torch.full_like(p, 0.5)
    old = list(clone.parameters())
    clone.scale.update = torch.full((3,), 2.0)
    old_scale = clone.scale
    update_module(clone)
    for name, p in clone.named_parameters():
        assert torch.equal(p, before[name] + 0.5)
    assert clone.shared.weight is clone.alias.weight and clone.c.weight is clone.a.weight
    assert torch.equal(clone.scale, torch.full((3,), 3.0)) and old_scale.update is None
    assert all(p.update is None for p in old)
    assert model.scale is old_scale  # the original's buffer itself is not changed
    update_module(clone)  # nothing left to apply
    for name, p in clone.named_parameters():
        assert torch.equal(p, before[name] + 0.5)


def test_update_module_memo_none_and_scalar_updates():
    torch.manual_seed(0)
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    memo = {}
    w, b1, b2 = first.weight, first.bias, second.bias
    update_module(first, [torch.ones(3, 3), None], memo=memo)  # None: that parameter is left as it is
    assert first.bias is b1 and first.weight is memo[w]
    update_module(second, memo=memo)  # the shared weight takes its update from the memo
    assert second.weight is first.weight and second.bias is b2
    # a broadcasting update (a scalar tensor, a number) is applied as p + u
    update_module(second, [torch.tensor(1.0), 2.0])
    assert torch.equal(second.bias, b2 + 2.0)
    assert torch.equal(second.weight, w + 2.0)


def test_update_module_bad_updates():
    model = nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="has 2 parameters but updates holds 1"):
        update_module(model, [torch.ones(2, 3)])  # as learn2learn: the parameters it reaches are updated
    assert model.weight.grad_fn is not None
    with pytest.raises(ValueError, match=r"update of 'bias' has shape \[4, 2\]"):
        update_module(model, [None, torch.ones(4, 2)])


def plain_maml_grads(model, tasks, lr, steps, first_order):
    params = dict(model.named_parameters())
    total = 0.0
    for xs, ys, xq, yq in tasks:
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {name: p - lr * g for (name, p), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(functional_call(model, fast, (xq,)), yq)
    return torch.autograd.grad(total, list(params.values()))


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_maml_with_clone_and_update_module(first_order):
    """learn2learn's recipe (clone_module, autograd.grad, update_module with -lr * g) gives the exact
    meta-gradient."""
    torch.manual_seed(0)
    model = small_cnn().train()
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat(2)
    tasks = [(torch.randn(6, 1, 8, 8, generator=gen, dtype=DTYPE), labels,
              torch.randn(6, 1, 8, 8, generator=gen, dtype=DTYPE), labels) for _ in range(3)]
    for xs, ys, xq, yq in tasks:
        learner = clone_module(model)
        for _ in range(2):
            grads = torch.autograd.grad(F.cross_entropy(learner(xs), ys), list(learner.parameters()),
                                        create_graph=not first_order)
            update_module(learner, updates=[-0.1 * g for g in grads])
        F.cross_entropy(learner(xq), yq).backward()
    expected = torch.cat([g.reshape(-1) for g in plain_maml_grads(reference, tasks, 0.1, 2, first_order)])
    actual = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert ((actual - expected).norm() / expected.norm()).item() <= 1e-9


# ----------------------------------------------------------------------------------------------------------------
# detach_module


def test_module_detach():
    """learn2learn's test_module_detach: after detaching, the parameters take no gradient."""
    torch.manual_seed(0)
    model = Model()
    detach_module(model)
    loss = F.mse_loss(model(torch.tensor([[0.0, 1.0, 2.0, 3.0]])), torch.zeros(1, 2))
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss, list(model.parameters()))


def test_module_detach_keep_requires_grad():
    model = Model()
    model.model[0].bias.requires_grad_(False)
    params = list(model.parameters())
    assert detach_module(model, keep_requires_grad=True) is None
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]
    assert all(a is b for a, b in zip(params, model.parameters()))  # in place
    detach_module(model)
    assert not any(p.requires_grad for p in model.parameters())


def test_detach_a_clone():
    """A detached clone is cut off from the original: gradients stop at the clone's own (leaf) parameters."""
    torch.manual_seed(0)
    model = TiedNet()
    clone = clone_module(model)
    clone.register_buffer("extra", model.a.bias * 3)  # a buffer with a graph
    x = torch.randn(4, 3)
    grads = torch.autograd.grad(clone(x).sum(), list(clone.parameters()), create_graph=True)
    update_module(clone, [-0.1 * g for g in grads])
    detach_module(clone, keep_requires_grad=True)
    assert all(p.is_leaf and p.requires_grad for p in clone.parameters())
    assert clone.extra.is_leaf and clone.extra.requires_grad
    assert clone.shared.weight is clone.alias.weight and clone.c.weight is clone.a.weight
    clone(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in clone.parameters())
    detach_module(clone)
    assert not any(p.requires_grad for p in clone.parameters()) and not clone.extra.requires_grad
    detach_module(None)  # not a module: nothing to do


def test_detach_views():
    """Adapted parameters that are autograd views (a Meta-SGD learner's, updated through ops.task_sgd), which
    cannot be detached in place, are replaced by detached copies, the same copy everywhere a tied one sits."""
    from mamlext.metasgd import MetaSGD
    torch.manual_seed(0)
    learner = MetaSGD(TiedNet(), lr=0.1).clone()
    learner.adapt(learner(torch.randn(4, 3)).pow(2).sum())
    clone = learner.module
    assert all(p._is_view() for p in clone.parameters())
    values = [p.detach().clone() for p in clone.parameters()]
    detach_module(clone, keep_requires_grad=True)
    assert all(p.is_leaf and p.requires_grad and not p._is_view() for p in clone.parameters())
    assert all(torch.equal(p, v) for p, v in zip(clone.parameters(), values))
    assert clone.shared.weight is clone.alias.weight and clone.c.weight is clone.a.weight
    detach_module(clone)
    assert not any(p.requires_grad for p in clone.parameters())


# ----------------------------------------------------------------------------------------------------------------
# learn2learn itself, where it is installed


def test_matches_learn2learn():
    l2l = pytest.importorskip("learn2learn")
    torch.manual_seed(0)
    model = ConvNet().to(DTYPE)
    x = torch.randn(2, 3, 16, 16, dtype=DTYPE)
    ours, theirs = clone_module(model), l2l.clone_module(model)
    assert torch.equal(ours(x), theirs(x))
    updates = [torch.randn_like(p) for p in model.parameters()]
    update_module(ours, updates)
    l2l.update_module(theirs, updates)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
