"""The generic engine (BatchedMAML(backend="generic")): meta-gradients in both memory modes against a plain per-task
autograd MAML loop and against finite differences of the meta-objective (BatchNorm included), the memory claim of
memory="low", adapt / predict, and the errors naming a module the engine cannot batch."""
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from mamlext import BatchedMAML
from mamlext.models import conv4

from conftest import DEVICES
from mlp_cases import make_tasks, mlp

LR_MODES = ["fixed", "per_layer_step", "per_param"]


def small_conv(act=nn.ReLU, pool=nn.MaxPool2d, track_running_stats=True):
    """conv + BatchNorm + activation + pool, twice, then a linear head: 1x8x8 inputs, 3 classes."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=track_running_stats),
                         act(), pool(2), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), act(), pool(2),
                         nn.Flatten(), nn.Linear(16, 3))


def image_tasks(tasks, shots, queries, classes, size, dtype, gen, channels=1):
    def pair(rows):
        x = torch.randn(tasks, rows, channels, size, size, generator=gen, dtype=torch.float64).to(dtype)
        return x, torch.randint(0, classes, (tasks, rows), generator=gen)
    return (*pair(shots), *pair(queries))


def init_rates(maml, gen):
    """Distinct random rates, so that a mix-up of steps or parameters shows."""
    with torch.no_grad():
        for r in maml.inner_lrs:
            r.copy_(0.05 + 0.1 * torch.rand(r.shape, generator=gen, dtype=torch.float64))


def rate_of(maml, i, step):
    if maml.lr_mode == "fixed":
        return maml.inner_lr
    if maml.lr_mode == "per_layer_step":
        return maml.inner_lrs[i][step]
    return maml.inner_lrs[i]


def plain_meta_loss(maml, xs, ys, xq, yq, loss_fn, weights=None):
    """MAML the learn2learn way: task by task, autograd through the inner steps (create_graph), the model's own
    F.batch_norm (no vmap), the mean over tasks of the (step-weighted) query losses."""
    model = maml.model
    names = [n for n, _ in model.named_parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    total = 0.0
    for t in range(xs.shape[0]):
        theta = [p for _, p in model.named_parameters()]
        for step in range(maml.inner_steps):
            out = functional_call(model, {**buffers, **dict(zip(names, theta))}, (xs[t],))
            grads = torch.autograd.grad(loss_fn(out, ys[t]), theta, create_graph=not maml.first_order)
            theta = [p - rate_of(maml, i, step) * g for i, (p, g) in enumerate(zip(theta, grads))]
            if weights is not None or step == maml.inner_steps - 1:
                query = loss_fn(functional_call(model, {**buffers, **dict(zip(names, theta))}, (xq[t],)), yq[t])
                total = total + (1.0 if weights is None else weights[step]) * query
    return total / xs.shape[0]


def meta_grads(maml, loss):
    tensors = [p for p in maml.parameters()]
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def assert_rel_close(actual, expected, rtol, floor=1e-6):
    """Per tensor, max |a - e| <= rtol * max |e|; a tensor whose gradient is zero in exact arithmetic (a conv bias
    before BatchNorm) is measured against `floor` times the largest gradient instead."""
    floor = floor * max(e.abs().max() for e in expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = torch.maximum(e.abs().max(), floor)
        err = (a - e).abs().max() / scale
        assert err <= rtol, f"tensor {i}: relative error {err:.3e} > {rtol}"


@pytest.mark.parametrize("memory", ["graph", "low"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("lr_mode", LR_MODES)
def test_conv_bn_matches_plain_loop(memory, steps, first_order, lr_mode):
    gen = torch.Generator().manual_seed(steps * 10 + len(lr_mode))
    torch.manual_seed(1)
    model = small_conv().double()
    maml = BatchedMAML(model, inner_lr=0.1, inner_steps=steps, first_order=first_order, loss="ce",
                       lr_mode=lr_mode, backend="generic", memory=memory)
    init_rates(maml, gen)
    xs, ys, xq, yq = image_tasks(3, 4, 5, 3, 8, torch.float64, gen)
    loss = maml.meta_loss(xs, ys, xq, yq)
    expected_loss = plain_meta_loss(maml, xs, ys, xq, yq, F.cross_entropy)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    assert_rel_close(meta_grads(maml, loss), meta_grads(maml, expected_loss), 1e-8)


@pytest.mark.parametrize("memory", ["graph", "low"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_conv4_omniglot_shape_matches_plain_loop(memory, steps, first_order):
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(2)
    maml = BatchedMAML(conv4(ways=5, hidden=4).double(), inner_lr=0.4, inner_steps=steps, first_order=first_order,
                       loss="ce", backend="auto", memory=memory)
    assert maml.engine == "generic"
    xs, ys, xq, yq = image_tasks(2, 5, 10, 5, 28, torch.float64, gen)
    loss = maml.meta_loss(xs, ys, xq, yq)
    expected = plain_meta_loss(maml, xs, ys, xq, yq, F.cross_entropy)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    assert_rel_close(meta_grads(maml, loss), meta_grads(maml, expected), 1e-8)


@pytest.mark.parametrize("memory", ["graph", "low"])
@pytest.mark.parametrize("lr_mode", LR_MODES)
@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_on_generic_engine_matches_plain_loop(memory, lr_mode, first_order):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    maml = BatchedMAML(mlp([2, 7, 5, 3], "tanh").double(), inner_lr=0.2, inner_steps=3, first_order=first_order,
                       loss="mse", lr_mode=lr_mode, backend="generic", memory=memory)
    init_rates(maml, gen)
    xs, ys, xq, yq = make_tasks([2, 7, 5, 3], 4, 6, 5, "mse", torch.float64, "cpu", gen)
    loss = maml.meta_loss(xs, ys, xq, yq)
    expected = plain_meta_loss(maml, xs, ys, xq, yq, F.mse_loss)
    assert_rel_close(meta_grads(maml, loss), meta_grads(maml, expected), 1e-8)


@pytest.mark.parametrize("memory", ["graph", "low"])
def test_multi_step_loss_and_custom_loss(memory):
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    weights = [0.2, 0.3, 0.5]

    def smooth_l1(out, target):
        return F.smooth_l1_loss(out, target, beta=0.5)

    maml = BatchedMAML(mlp([2, 6, 2], "elu").double(), inner_lr=0.3, inner_steps=3, loss=smooth_l1,
                       lr_mode="per_layer_step", step_weights=weights, memory=memory)
    assert maml.engine == "generic"  # a loss callable: the fused engine cannot serve it
    init_rates(maml, gen)
    xs, ys, xq, yq = make_tasks([2, 6, 2], 3, 5, 4, "mse", torch.float64, "cpu", gen)
    loss = maml.meta_loss(xs, ys, xq, yq)
    expected = plain_meta_loss(maml, xs, ys, xq, yq, smooth_l1, weights)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    assert_rel_close(meta_grads(maml, loss), meta_grads(maml, expected), 1e-8)
    assert maml.last_task_losses.shape == (3,)


def meta_objective(maml, xs, ys, xq, yq):
    """The meta-objective's value by the plain loop, without a graph beyond the inner steps."""
    return plain_meta_loss(maml, xs, ys, xq, yq, F.cross_entropy).detach()


@pytest.mark.parametrize("memory", ["graph", "low"])
@pytest.mark.parametrize("act, pool", [(nn.Tanh, nn.AvgPool2d), (nn.ReLU, nn.MaxPool2d)])
def test_batchnorm_meta_gradient_matches_finite_differences(memory, act, pool):
    """The trap of vmap through F.batch_norm (wrong second-order meta-gradients) must not catch the engine: its
    directional derivative equals a central finite difference of the meta-objective."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    maml = BatchedMAML(small_conv(act, pool).double(), inner_lr=0.3, inner_steps=2, loss="ce", memory=memory)
    xs, ys, xq, yq = image_tasks(3, 6, 6, 3, 8, torch.float64, gen)
    grads = meta_grads(maml, maml.meta_loss(xs, ys, xq, yq))
    params = list(maml.model.parameters())
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    eps = 1e-5
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
        values.append(meta_objective(maml, xs, ys, xq, yq))
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    finite_difference = (values[0] - values[1]) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    assert abs(analytic - finite_difference) <= 1e-6 * abs(finite_difference)


def test_running_statistics_untouched():
    gen = torch.Generator().manual_seed(6)
    model = small_conv().double()
    before = {n: b.clone() for n, b in model.named_buffers()}
    maml = BatchedMAML(model, inner_steps=2, loss="ce")
    xs, ys, xq, yq = image_tasks(2, 3, 3, 3, 8, torch.float64, gen)
    maml.meta_loss(xs, ys, xq, yq).backward()
    maml.predict(maml.adapt(xs, ys), xq)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def saved_bytes(loss):
    """Bytes of the distinct storages autograd keeps for the backward of loss: the tensors saved by every node of
    its graph. (torch.autograd.graph.saved_tensors_hooks would count them as they are saved, but torch.func's
    transforms refuse to run under those hooks, so the graph is walked instead.)"""
    storages, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        saved += list(getattr(node, "saved_tensors", ()))  # custom autograd Functions
        for value in saved:
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def test_low_memory_does_not_grow_with_steps():
    gen = torch.Generator().manual_seed(8)
    xs, ys, xq, yq = image_tasks(2, 4, 4, 3, 8, torch.float64, gen)
    sizes = {}
    for memory in ("graph", "low"):
        for steps in (1, 10):
            torch.manual_seed(0)
            maml = BatchedMAML(small_conv().double(), inner_lr=0.1, inner_steps=steps, loss="ce", memory=memory)
            sizes[memory, steps] = saved_bytes(maml.meta_loss(xs, ys, xq, yq))
    assert sizes["low", 10] == sizes["low", 1] > 0
    assert sizes["graph", 10] > 5 * sizes["graph", 1]


@pytest.mark.parametrize("device", DEVICES)
def test_adapt_and_predict_match_plain_steps(device):
    gen = torch.Generator().manual_seed(9)
    torch.manual_seed(9)
    model = small_conv().double().to(device)
    maml = BatchedMAML(model, inner_lr=0.2, inner_steps=1, loss="ce")
    xs, ys, xq, yq = [t.to(device) for t in image_tasks(2, 4, 4, 3, 8, torch.float64, gen)]
    adapted = maml.adapt(xs, ys, steps=3)
    out = maml.predict(adapted, xq)
    names = [n for n, _ in model.named_parameters()]
    for t in range(2):
        theta = [p.detach() for p in model.parameters()]
        for _ in range(3):
            theta = [x.requires_grad_(True) for x in theta]
            grads = torch.autograd.grad(F.cross_entropy(functional_call(model, dict(zip(names, theta)), (xs[t],)),
                                                        ys[t]), theta)
            theta = [(p - 0.2 * g).detach() for p, g in zip(theta, grads)]
        for a, e in zip(adapted, theta):
            torch.testing.assert_close(a[t], e, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out[t], functional_call(model, dict(zip(names, theta)), (xq[t],)),
                                   rtol=1e-10, atol=1e-12)
    assert [a.shape for a in maml.adapt(xs, ys, steps=0)] == [(2, *p.shape) for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory", ["graph", "low"])
def test_float32_matches_float64(device, memory):
    gen = torch.Generator().manual_seed(10)
    torch.manual_seed(10)
    model = small_conv()
    xs, ys, xq, yq = image_tasks(3, 4, 4, 3, 8, torch.float64, gen)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        m = BatchedMAML(model.to(dtype=dtype, device=device), inner_lr=0.2, inner_steps=2, loss="ce", memory=memory)
        data = [xs.to(device, dtype), ys.to(device), xq.to(device, dtype), yq.to(device)]
        grads[dtype] = [g.double().cpu() for g in meta_grads(m, m.meta_loss(*data))]
    assert_rel_close(grads[torch.float32], grads[torch.float64], 1e-4, floor=1e-2)


class CountingNorm(nn.Module):
    """Changes a buffer in its forward: the engine cannot keep it per task."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += 1
        return x


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x


@pytest.mark.parametrize("layer, message", [
    (CountingNorm(), r"module '1' \(CountingNorm\) changes its buffer 'seen'"),
    (DataDependent(), r"module '1' \(DataDependent\) cannot run batched over tasks"),
])
def test_unbatchable_module_is_named(layer, message):
    model = nn.Sequential(nn.Linear(2, 3), layer, nn.Linear(3, 1)).double()
    maml = BatchedMAML(model, backend="generic")
    xs = torch.randn(2, 4, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message):
        maml.meta_loss(xs, torch.randn(2, 4, 1, dtype=torch.float64), xs, torch.randn(2, 4, 1, dtype=torch.float64))


@pytest.mark.parametrize("make, message", [
    (lambda d: (d[0][:1], d[1][:1], d[2], d[3]), r"xs has T = 1 tasks but xq has 2"),
    (lambda d: (d[0].float(), d[1], d[2], d[3]), r"xs has dtype torch.float32 but the model's parameters are"),
    (lambda d: (d[0], d[1] + 5, d[2], d[3]), r"ys holds the class index 7, outside \[0, 3\)"),
    (lambda d: (d[0], d[1].float(), d[2], d[3]), r"ys must be int64 class indices"),
    (lambda d: (d[0], d[1][:, :2], d[2], d[3]), r"ys must be \[T, K, ...\] with K = 3"),
    (lambda d: (d[0] * float("nan"), d[1], d[2], d[3]), r"xs holds non-finite values"),
    (lambda d: (d[0][:, :, :, :5], d[1], d[2], d[3]), r"cannot run batched over tasks"),
])
def test_bad_input(make, message):
    gen = torch.Generator().manual_seed(11)
    maml = BatchedMAML(small_conv().double(), loss="ce")
    data = image_tasks(2, 3, 3, 3, 8, torch.float64, gen)
    with pytest.raises((ValueError, RuntimeError), match=message):
        maml.meta_loss(*make(data))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"memory must be one of \['graph', 'low'\], got 'none'"):
        BatchedMAML(small_conv(), memory="none")
    with pytest.raises(ValueError, match=r"BatchedMAML\(backend='fused'\): the fused_mlp engine cannot serve"):
        BatchedMAML(small_conv(), backend="fused")
    with pytest.raises(ValueError, match="the model has no parameters"):
        BatchedMAML(nn.ReLU(), backend="generic")
    maml = BatchedMAML(small_conv().double(), loss="ce", memory="low")
    gen = torch.Generator().manual_seed(12)
    xs, ys, xq, yq = image_tasks(2, 3, 3, 3, 8, torch.float64, gen)
    with pytest.raises(ValueError, match="memory='low' gives no gradient to the inputs"):
        maml.meta_loss(xs.requires_grad_(True), ys, xq, yq)


@pytest.mark.parametrize("lr_mode", ["per_layer_step", "per_param"])
@pytest.mark.parametrize("task_chunk", [1, 2])
def test_low_memory_task_chunks_match_plain_loop(lr_mode, task_chunk):
    """Chunks of tasks (2 of 3 tasks: uneven) give the same losses, meta-gradients and rate gradients."""
    gen = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    weights = [0.4, 0.6]
    maml = BatchedMAML(small_conv().double(), inner_lr=0.2, inner_steps=2, loss="ce", lr_mode=lr_mode,
                       step_weights=weights, memory="low", task_chunk=task_chunk)
    init_rates(maml, gen)
    xs, ys, xq, yq = image_tasks(3, 4, 5, 3, 8, torch.float64, gen)
    loss = maml.meta_loss(xs, ys, xq, yq)
    assert maml.last_task_losses.shape == (3,)
    expected = plain_meta_loss(maml, xs, ys, xq, yq, F.cross_entropy, weights)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    assert_rel_close(meta_grads(maml, loss), meta_grads(maml, expected), 1e-8)


def test_task_chunk_needs_low_memory():
    with pytest.raises(ValueError, match=r"task_chunk must be None or an int >= 1, with memory='low', got "
                                         r"task_chunk=2 with memory='graph'"):
        BatchedMAML(small_conv(), task_chunk=2)
    with pytest.raises(ValueError, match="task_chunk=0"):
        BatchedMAML(small_conv(), memory="low", task_chunk=0)
