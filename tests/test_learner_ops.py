"""clone_tensors and sgd_update (a per-task learner's parameter copy and inner SGD step, one autograd node per
list): values, which outputs require grad, gradients to second order, op registration, bad input."""
import pytest
import torch
from torch.nn import functional as F

import mamlext
from mamlext import _ext, ops, reference

from conftest import DEVICES

requires_ext = pytest.mark.skipif(_ext._C is None, reason="compiled extension not loaded")
SHAPES = [(3, 5), (5,), (), (1,), (0, 4), (7, 1, 2)]


def tensors(shapes, device, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            .requires_grad_(requires_grad) for s in shapes]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_values_match_the_definition(device, dtype):
    params, grads = tensors(SHAPES, device, dtype), tensors(SHAPES, device, dtype, seed=1)
    for p, c in zip(params, ops.clone_tensors(params)):
        assert torch.equal(c, p) and c.data_ptr() != p.data_ptr() or p.numel() == 0
    for p, g, u in zip(params, grads, ops.sgd_update(params, grads, 0.3)):
        assert u.dtype == dtype and u.shape == p.shape
        torch.testing.assert_close(u, p - 0.3 * g)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_many_tensors(device):
    shapes = [(2 + i % 5, 3) for i in range(130)]
    params = [t.t() for t in tensors([(3, 2 + i % 5) for i in range(130)], device)]
    grads = tensors(shapes, device, seed=2)
    assert not params[0].is_contiguous()
    for p, g, u in zip(params, grads, ops.sgd_update(params, grads, -1.5)):
        torch.testing.assert_close(u, p + 1.5 * g, rtol=0, atol=1e-15)
    for p, c in zip(params, ops.clone_tensors(params)):
        assert torch.equal(c, p)


def test_empty_lists():
    assert ops.clone_tensors([]) == [] and ops.sgd_update([], [], 0.1) == []
    if _ext._C is not None:
        assert torch.ops.mamlext.sgd_update([], [], 0.1) == []


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_outputs_require_grad_as_clone_and_update_would(device):
    params = tensors([(2, 2), (3,), (4,)], device)
    params[0].requires_grad_()
    clones = ops.clone_tensors(params)
    assert [c.requires_grad for c in clones] == [True, False, False]
    grads = tensors([(2, 2), (3,), (4,)], device, seed=1)
    grads[2].requires_grad_()
    assert [u.requires_grad for u in ops.sgd_update(params, grads, 0.1)] == [True, False, True]
    with torch.no_grad():
        assert not any(u.requires_grad for u in ops.sgd_update(params, grads, 0.1))
        assert not any(c.requires_grad for c in ops.clone_tensors(params))


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(device):
    params = tensors([(2, 3), (3,), ()], device, requires_grad=True)
    grads = tensors([(2, 3), (3,), ()], device, seed=1, requires_grad=True)
    n = len(params)

    def update(*flat):
        return tuple(ops.sgd_update(list(flat[:n]), list(flat[n:]), 0.7))

    def clone(*flat):
        return tuple(ops.clone_tensors(list(flat)))

    assert torch.autograd.gradcheck(update, (*params, *grads))
    assert torch.autograd.gradgradcheck(update, (*params, *grads))
    assert torch.autograd.gradcheck(clone, tuple(params))
    assert torch.autograd.gradgradcheck(clone, tuple(params))


@requires_ext
def test_second_order_maml_through_the_ops_equals_plain_autograd():
    """A one-step MAML meta-gradient through clone_tensors and sgd_update equals the one through t.clone() and
    p - lr * g: their backwards are differentiable where second order needs it."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 4, generator=gen, dtype=torch.float64)

    def meta_grad(clone, update):
        fast = clone([w, b])
        loss = F.mse_loss(torch.tanh(x @ fast[0].t() + fast[1]), y)
        fast = update(fast, torch.autograd.grad(loss, fast, create_graph=True), 0.4)
        return torch.autograd.grad(F.mse_loss(torch.tanh(x @ fast[0].t() + fast[1]), y), [w, b])

    ours = meta_grad(ops.clone_tensors, ops.sgd_update)
    plain = meta_grad(reference.clone_tensors, lambda ps, gs, lr: [p - lr * g for p, g in zip(ps, gs)])
    for a, e in zip(ours, plain):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


@requires_ext
def test_opcheck():
    params = tensors([(2, 3), (3,)], "cpu", requires_grad=True)
    grads = tensors([(2, 3), (3,)], "cpu", seed=1, requires_grad=True)
    torch.library.opcheck(torch.ops.mamlext.sgd_update.default, (params, grads, 0.2))
    torch.library.opcheck(torch.ops.mamlext.clone_tensors.default, (params,))


@requires_ext
@pytest.mark.parametrize("call, message", [
    (lambda: ops.sgd_update([torch.zeros(2)], [], 0.1), "same length"),
    (lambda: ops.sgd_update([torch.zeros(2)], [torch.zeros(3)], 0.1), r"grads\[0\] must have params\[0\]'s shape"),
    (lambda: ops.sgd_update([torch.zeros(2)], [torch.zeros(2, dtype=torch.float64)], 0.1),
     r"grads\[0\] is torch.float64|grads\[0\] is Double"),
    (lambda: ops.sgd_update([torch.zeros(2)], [torch.zeros(2)], float("nan")), "lr must be finite"),
    (lambda: ops.sgd_update([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2, dtype=torch.int64)], 0.1),
     r"params\[0\] must be a floating-point tensor"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_maml_learners_use_one_node_per_list():
    """mamlext.MAML's clone and adapt record one node each for the whole parameter list (what makes its per-task
    loop cheaper than per-tensor clones and updates)."""
    if _ext._C is None:
        pytest.skip("compiled extension not loaded")
    model = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    learner = mamlext.MAML(model, lr=0.1).clone()
    clones = list(learner.parameters())
    assert len({c.grad_fn for c in clones}) == 1
    learner.adapt(F.mse_loss(learner(torch.randn(4, 2)), torch.randn(4, 1)))
    assert len({p.grad_fn for p in learner.parameters()}) == 1


@requires_ext
def test_unused_outputs_give_no_gradient():
    """As with t.clone() and p - lr * g: an input whose outputs get no gradient gets none (None), not zeros."""
    a, b = tensors([(2,), (3,)], "cpu", requires_grad=True)
    ca, cb = ops.clone_tensors([a, b])
    ua, ub = ops.sgd_update([ca, cb], [ca.detach(), cb.detach()], 0.1)
    ua.sum().backward()
    assert a.grad is not None and b.grad is None
