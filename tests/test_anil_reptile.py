"""ANIL and Reptile against plain per-task loops (float64)."""
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from mamlext import ANIL, Reptile

from mlp_cases import make_tasks, mlp
from test_generic_engine import assert_rel_close, image_tasks, init_rates, rate_of


def backbone():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(48, 6), nn.Tanh())


def plain_anil_loss(anil, xs, ys, xq, yq):
    """ANIL task by task: the backbone on the task's data, the head adapted with create_graph."""
    head_maml = anil.head
    head = head_maml.model
    names = [n for n, _ in head.named_parameters()]
    total = 0.0
    for t in range(xs.shape[0]):
        fs, fq = anil.backbone(xs[t]), anil.backbone(xq[t])
        theta = list(head.parameters())
        for step in range(head_maml.inner_steps):
            loss = F.cross_entropy(functional_call(head, dict(zip(names, theta)), (fs,)), ys[t])
            grads = torch.autograd.grad(loss, theta, create_graph=not head_maml.first_order)
            theta = [p - rate_of(head_maml, i, step) * g for i, (p, g) in enumerate(zip(theta, grads))]
        total = total + F.cross_entropy(functional_call(head, dict(zip(names, theta)), (fq,)), yq[t])
    return total / xs.shape[0]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("lr_mode", ["fixed", "per_layer_step", "per_param"])
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_anil_matches_plain_loop(steps, first_order, lr_mode, head):
    gen = torch.Generator().manual_seed(steps)
    torch.manual_seed(steps)
    head_module = nn.Linear(6, 3) if head == "linear" else mlp([6, 5, 3], "relu")
    anil = ANIL(backbone().double(), head_module.double(), inner_lr=0.3, inner_steps=steps,
                first_order=first_order, lr_mode=lr_mode)
    init_rates(anil.head, gen)
    xs, ys, xq, yq = image_tasks(3, 4, 5, 3, 8, torch.float64, gen)
    loss = anil.meta_loss(xs, ys, xq, yq)
    expected = plain_anil_loss(anil, xs, ys, xq, yq)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    params = list(anil.parameters())
    actual_grads = torch.autograd.grad(loss, params, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    backbone_count = len(list(anil.backbone.parameters()))
    assert all(g is not None for g in actual_grads[:backbone_count])  # the meta-gradient reaches the backbone
    assert_rel_close(actual_grads, expected_grads, 1e-8)


def test_anil_adapt_predict_shapes_and_errors():
    gen = torch.Generator().manual_seed(0)
    anil = ANIL(backbone().double(), nn.Linear(6, 3).double(), inner_lr=0.3)
    xs, ys, xq, yq = image_tasks(2, 4, 5, 3, 8, torch.float64, gen)
    out = anil.predict(anil.adapt(xs, ys, steps=2), xq)
    assert out.shape == (2, 5, 3)
    loss = anil.meta_loss(xs, ys, xq, yq)
    torch.testing.assert_close(anil.last_task_losses.mean(), loss.detach())
    with pytest.raises(ValueError, match=r"ANIL.meta_loss: xs has T = 1 tasks but xq has 2"):
        anil.meta_loss(xs[:1], ys[:1], xq, yq)
    with pytest.raises(ValueError, match=r"ANIL: xs must be \[T, K, \*input shape\]"):
        anil.meta_loss(xs[:, 0, 0, 0, 0], ys, xq, yq)
    with pytest.raises(TypeError, match="ANIL: head must be an nn.Module"):
        ANIL(backbone(), "linear")


def plain_reptile(model, xs, ys, inner_lr, steps, outer_step, loss_fn):
    names = [n for n, _ in model.named_parameters()]
    theta0 = [p.detach().clone() for p in model.parameters()]
    adapted = []
    for t in range(xs.shape[0]):
        theta = [p.clone() for p in theta0]
        for _ in range(steps):
            theta = [p.requires_grad_(True) for p in theta]
            grads = torch.autograd.grad(loss_fn(functional_call(model, dict(zip(names, theta)), (xs[t],)), ys[t]),
                                        theta)
            theta = [(p - inner_lr * g).detach() for p, g in zip(theta, grads)]
        adapted.append(theta)
    return [p + outer_step * (torch.stack([a[i] for a in adapted]).mean(0) - p) for i, p in enumerate(theta0)]


@pytest.mark.parametrize("model_kind", ["mlp", "conv"])
def test_reptile_matches_plain_loop(model_kind):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    if model_kind == "mlp":
        model, loss, loss_fn = mlp([2, 8, 8, 1], "relu").double(), "mse", F.mse_loss
        xs, ys, _, _ = make_tasks([2, 8, 8, 1], 4, 6, 1, "mse", torch.float64, "cpu", gen)
    else:
        model, loss, loss_fn = backbone().append(nn.Linear(6, 3)).double(), "ce", F.cross_entropy
        xs, ys, _, _ = image_tasks(4, 6, 1, 3, 8, torch.float64, gen)
    reptile = Reptile(model, inner_lr=0.1, inner_steps=3, outer_step=0.5, loss=loss)
    assert reptile.engine == ("fused_mlp" if model_kind == "mlp" else "generic")
    for _ in range(2):  # two meta-steps: the second starts from the first's result
        expected = plain_reptile(model, xs, ys, 0.1, 3, 0.5, loss_fn)
        reptile.step(xs, ys)
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_reptile_bad_input_and_evaluation():
    with pytest.raises(ValueError, match="Reptile: outer_step must be a finite float > 0, got 0"):
        Reptile(mlp([1, 2, 1], "relu"), outer_step=0)
    gen = torch.Generator().manual_seed(2)
    model = mlp([2, 4, 1], "relu").double()
    reptile = Reptile(model, inner_lr=0.1, inner_steps=2)
    xs, ys, xq, _ = make_tasks([2, 4, 1], 3, 5, 4, "mse", torch.float64, "cpu", gen)
    with pytest.raises(ValueError, match=r"xs must be \[T, K, in\] with in = 2"):
        reptile.step(xs[:, :, :1], ys)
    adapted = reptile.adapt(xs, ys, steps=2)
    names = [n for n, _ in model.named_parameters()]
    out = reptile.predict(adapted, xq)
    for t in range(3):
        expected = functional_call(model, {n: a[t] for n, a in zip(names, adapted)}, (xq[t],))
        torch.testing.assert_close(out[t], expected)
    for a, phi in zip(adapted, reptile.step(xs, ys)):  # step adapts from the same theta as adapt did
        torch.testing.assert_close(a, phi)
