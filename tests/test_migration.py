"""From a learn2learn-style per-task loop to the batched engine in one line: MAML.batched and data.stack_tasks."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mamlext
from mamlext.data import stack_tasks

from test_fused_mlp import run_loop, sine_tasks


def loop_grads(maml, tasks, steps, loss_fn):
    """The loop as a learn2learn user writes it: the meta-gradients of the parameters that get one."""
    return [g for g in run_loop(maml, tasks, steps, loss_fn) if g is not None]


def batched_grads(engine, tasks):
    engine.meta_loss(*stack_tasks(tasks)).backward()
    grads = [p.grad.clone() for p in engine.model.parameters() if p.requires_grad]
    engine.model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("backend", ["auto", "generic"])
def test_batched_gives_the_loops_meta_gradient(steps, first_order, backend):
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    maml = mamlext.MAML(model, lr=0.05, first_order=first_order)
    tasks = sine_tasks(6)
    want = loop_grads(maml, tasks, steps, F.mse_loss)
    engine = maml.batched(inner_steps=steps, loss="mse", backend=backend)
    assert engine.engine == ("fused_mlp" if backend == "auto" else "generic")
    assert engine.first_order is first_order and engine.inner_lr == 0.05
    for got, expected in zip(batched_grads(engine, tasks), want):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_batched_with_a_loss_callable_and_frozen_parameters():
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    model[0].bias.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    tasks = [(torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randint(0, 4, (5,), generator=gen),
              torch.randn(7, 3, generator=gen, dtype=torch.float64), torch.randint(0, 4, (7,), generator=gen))
             for _ in range(4)]
    with pytest.raises(RuntimeError, match="MAML.batched: parameter '0.bias' does not require grad"):
        mamlext.MAML(model, lr=0.1).batched(loss=F.cross_entropy)
    maml = mamlext.MAML(model, lr=0.1, allow_nograd=True)
    want = loop_grads(maml, tasks, 2, F.cross_entropy)
    got = batched_grads(maml.batched(inner_steps=2, loss=F.cross_entropy), tasks)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_batched_refuses_a_tensor_rate():
    maml = mamlext.MAML(nn.Linear(1, 1), lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match="MAML.batched: a tensor lr"):
        maml.batched()


def test_stack_tasks_shapes_and_errors():
    tasks = sine_tasks(3, shots=4)
    xs, ys, xq, yq = stack_tasks(iter(tasks))  # any iterable
    assert xs.shape == (3, 4, 1) and torch.equal(yq[2], tasks[2][3])
    bad = tasks[:1] + [(tasks[1][0], tasks[1][1], torch.zeros(5, 1, dtype=torch.float64), tasks[1][3])]
    with pytest.raises(ValueError, match=r"stack_tasks: task 1's xq is \[5, 1\] torch.float64 on cpu but task 0's "
                                         r"is \[4, 1\]"):
        stack_tasks(bad)
    with pytest.raises(ValueError, match="stack_tasks: task 1's ys is .* torch.float32"):
        stack_tasks([tasks[0], (tasks[0][0], tasks[0][1].float(), tasks[0][2], tasks[0][3])])
    with pytest.raises(ValueError, match="tasks is empty"):
        stack_tasks([])
    with pytest.raises(ValueError, match=r"task 0 must be a tuple \(xs, ys, xq, yq\) of 4 tensors, got tuple of "
                                         "length 3"):
        stack_tasks([tasks[0][:3]])
    with pytest.raises(TypeError, match="task 0's yq must be a tensor, got list"):
        stack_tasks([(*tasks[0][:3], [1.0])])
