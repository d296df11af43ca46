"""BatchedMAML: per-task losses, meta-gradients and lr-gradients against a plain create_graph=True autograd MAML
loop over tasks written here (torch.func.functional_call on the nn.Sequential itself), over a sampled sweep of
models and task batches; adapt/predict; engine selection; every bad input."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import mamlext
from mamlext import BatchedMAML, _ext, ops

from conftest import DEVICES
from mlp_cases import ACT_MODULES, make_tasks, mlp

RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


# ----------------------------------------------------------------------------------------------------------------
# The oracle


def plain_maml(model, xs, ys, xq, yq, loss, steps, first_order, lr_mode, inner_lr, rates, weights):
    """A plain MAML loop over tasks with create_graph=True autograd on the module: returns the per-task losses and
    the gradients of their mean w.r.t. the model's parameters and the rates."""
    fn = F.mse_loss if loss == "mse" else F.cross_entropy
    params = dict(model.named_parameters())
    per_task = []
    for t in range(xs.shape[0]):
        fast = dict(params)
        total = 0.0
        for k in range(steps):
            support = fn(functional_call(model, fast, (xs[t],)), ys[t])
            grads = torch.autograd.grad(support, list(fast.values()), create_graph=not first_order,
                                        retain_graph=True)
            new = {}
            for i, ((name, p), g) in enumerate(zip(fast.items(), grads)):
                lr = inner_lr if lr_mode == "fixed" else (rates[i][k] if lr_mode == "per_layer_step" else rates[i])
                new[name] = p - lr * g
            fast = new
            if weights[k] != 0:
                total = total + weights[k] * fn(functional_call(model, fast, (xq[t],)), yq[t])
        per_task.append(total)
    mean = torch.stack(per_task).mean()
    grads = torch.autograd.grad(mean, list(params.values()) + list(rates), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(list(params.values()) + list(rates), grads)]
    return torch.stack(per_task).detach(), grads[:len(params)], grads[len(params):]


def assert_rel(actual, expected, rtol, what):
    """Normwise relative error per tensor: max|a - e| <= rtol * max|e| (with a floor of 1e-6 on the scale)."""
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None, f"{what}[{i}] got no gradient"
        assert a.shape == e.shape, f"{what}[{i}]: {list(a.shape)} != {list(e.shape)}"
        err = (a.double() - e.double()).abs().max().item()
        scale = max(e.double().abs().max().item(), 1e-6)
        assert err <= rtol * scale, f"{what}[{i}]: max error {err:.3e} > {rtol:.0e} * {scale:.3e}"


# ----------------------------------------------------------------------------------------------------------------
# The sweep: sampled configurations; test_sweep_covers_the_space checks the coverage the brief asks for.

def C(widths, act, loss, lr_mode, first_order, steps, tasks, shots, queries, weights=None, dtype=torch.float64):
    return dict(widths=widths, act=act, loss=loss, lr_mode=lr_mode, first_order=first_order, steps=steps,
                tasks=tasks, shots=shots, queries=queries, weights=weights, dtype=dtype)


F32 = torch.float32
SWEEP = [
    C([1, 40, 40, 1], "relu", "mse", "fixed", False, 1, 25, 10, 10),                        # Finn et al. sinusoid
    C([1, 40, 40, 1], "relu", "mse", "fixed", False, 1, 25, 10, 10, dtype=F32),
    C([3, 1], "tanh", "mse", "fixed", False, 2, 1, 1, 1),                                   # depth 1, T = K = 1
    C([1, 1, 1], "sigmoid", "mse", "per_layer_step", True, 3, 2, 1, 2, [0.2, 0.3, 1.0]),   # width 1
    C([4, 300, 3], "gelu", "ce", "per_param", False, 1, 3, 5, 4),                          # wide
    C([4, 300, 3], "gelu", "ce", "per_param", False, 1, 3, 5, 4, dtype=F32),
    C([2, 17, 9, 33, 5], "elu", "ce", "per_layer_step", False, 2, 4, 50, 7, [0.5, 1.0]),   # depth 4, K = 50
    C([2, 17, 9, 33, 5], "elu", "ce", "per_layer_step", False, 2, 4, 50, 7, [0.5, 1.0], F32),
    C([5, 8, 2], "leaky_relu", "ce", "fixed", True, 1, 64, 3, 3),                         # T = 64
    C([5, 8, 8, 1], "leaky_relu", "mse", "per_param", False, 5, 3, 4, 5),                 # N = 5
    C([5, 8, 8, 1], "leaky_relu", "mse", "per_param", True, 5, 3, 4, 5, [0.1, 0.0, 0.2, 0.0, 1.0]),
    C([3, 12, 4], "tanh", "ce", "per_layer_step", False, 4, 6, 6, 6, [1.0, 1.0, 1.0, 1.0], F32),
    C([3, 12, 4], "tanh", "ce", "per_param", True, 2, 5, 2, 9),
    C([2, 20, 20, 2], "sigmoid", "mse", "per_param", False, 3, 8, 12, 3, [0.3, 0.3, 1.0], F32),
    C([6, 30, 3], "gelu", "mse", "fixed", True, 2, 10, 5, 5, [0.0, 1.0]),
    C([6, 30, 3], "gelu", "mse", "per_layer_step", False, 2, 10, 5, 5),
    C([2, 6, 6, 6, 3], "relu", "ce", "per_param", False, 2, 12, 8, 8, [0.5, 1.0]),
    C([2, 6, 6, 6, 3], "relu", "ce", "per_layer_step", True, 3, 7, 20, 2, None, F32),
    C([1, 64, 1], "elu", "mse", "fixed", False, 3, 16, 10, 10, None, F32),
    C([4, 10, 5], "tanh", "mse", "fixed", False, 1, 1, 50, 50),
    C([1, 280, 1], "relu", "mse", "per_layer_step", False, 1, 2, 10, 10),                 # wide
    C([7, 5, 4], "sigmoid", "ce", "fixed", False, 2, 64, 2, 2, None, F32),                 # T = 64 float32
    C([3, 9, 9, 2], "leaky_relu", "ce", "per_layer_step", False, 4, 3, 3, 3, [0.0, 0.5, 0.0, 1.0]),
    C([2, 4], "elu", "ce", "per_param", True, 1, 9, 5, 5, None, F32),                       # depth 1, ce
    C([3, 7, 7, 7, 2], "gelu", "ce", "fixed", False, 5, 4, 6, 6, [0.2, 0.2, 0.2, 0.2, 1.0]),
]
SWEEP_IDS = [f"{i}-{'-'.join(map(str, c['widths']))}-{c['act']}-{c['loss']}-{c['lr_mode']}-"
             f"{'fo' if c['first_order'] else 'so'}-N{c['steps']}-T{c['tasks']}-K{c['shots']}-"
             f"{'f32' if c['dtype'] == F32 else 'f64'}" for i, c in enumerate(SWEEP)]


def build(cfg, device, seed):
    """A BatchedMAML with random (non-constant) learnable rates, its float64 deep copy for the oracle, the data."""
    torch.manual_seed(seed)
    model = mlp(cfg["widths"], cfg["act"]).to(device=device, dtype=cfg["dtype"])
    oracle_model = copy.deepcopy(model).double()
    maml = BatchedMAML(model, inner_lr=0.05, inner_steps=cfg["steps"], first_order=cfg["first_order"],
                       loss=cfg["loss"], lr_mode=cfg["lr_mode"], step_weights=cfg["weights"], backend="fused")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for r in maml.inner_lrs:
            r.copy_(0.02 + 0.08 * torch.rand(r.shape, generator=gen, dtype=torch.float64))
    rates = [r.detach().double().clone().requires_grad_() for r in maml.inner_lrs]
    data = make_tasks(cfg["widths"], cfg["tasks"], cfg["shots"], cfg["queries"], cfg["loss"], cfg["dtype"],
                      device, gen)
    return maml, oracle_model, rates, data


def oracle_for(cfg, oracle_model, rates, data):
    xs, ys, xq, yq = [d.double() if d.is_floating_point() else d for d in data]
    weights = cfg["weights"] or [0.0] * (cfg["steps"] - 1) + [1.0]
    return plain_maml(oracle_model, xs, ys, xq, yq, cfg["loss"], cfg["steps"], cfg["first_order"], cfg["lr_mode"],
                      0.05, rates, weights)


def compiled_ops_built():
    return _ext._C is not None and all(hasattr(torch.ops.mamlext, n) for n in ("mlp_loss_grad", "mlp_maml"))


# "ops": whatever ops.* routes to (the compiled kernels where built); "reference": the pure-PyTorch twins forced.
PATHS = ["ops", "reference"]


@pytest.fixture
def path(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(ops, "_compiled", lambda name, device: False)
    return request.param


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(SWEEP)), ids=SWEEP_IDS)
def test_meta_gradients_match_plain_maml(device, case, path):
    cfg = SWEEP[case]
    maml, oracle_model, rates, data = build(cfg, device, seed=100 + case)
    loss = maml.meta_loss(*data)
    assert loss.dim() == 0 and loss.dtype == cfg["dtype"]
    loss.backward()
    e_losses, e_param_grads, e_lr_grads = oracle_for(cfg, oracle_model, rates, data)
    rtol = RTOL[cfg["dtype"]]
    assert maml.last_task_losses.shape == (cfg["tasks"],) and not maml.last_task_losses.requires_grad
    assert_rel([maml.last_task_losses], [e_losses], rtol, "per-task losses")
    assert_rel([loss.detach().reshape(1)], [e_losses.mean().reshape(1)], rtol, "meta loss")
    assert_rel([p.grad for p in maml.model.parameters()], e_param_grads, rtol, "meta-gradients")
    assert_rel([r.grad for r in maml.inner_lrs], e_lr_grads, rtol, "lr-gradients")
    assert all(g.abs().max() > 0 for g in e_param_grads[-2:]), "a zero oracle would prove nothing"


def test_sweep_covers_the_space():
    depths = {len(c["widths"]) - 1 for c in SWEEP}
    widths = {w for c in SWEEP for w in c["widths"][1:-1]} | {c["widths"][-1] for c in SWEEP}
    assert depths == {1, 2, 3, 4}
    assert min(widths) == 1 and max(widths) >= 256
    assert {c["act"] for c in SWEEP if len(c["widths"]) > 2} == set(ACT_MODULES)
    assert {c["loss"] for c in SWEEP} == {"mse", "ce"}
    assert {c["lr_mode"] for c in SWEEP} == {"fixed", "per_layer_step", "per_param"}
    assert {c["first_order"] for c in SWEEP} == {False, True}
    assert {c["steps"] for c in SWEEP} == {1, 2, 3, 4, 5}
    assert min(c["tasks"] for c in SWEEP) == 1 and max(c["tasks"] for c in SWEEP) == 64
    assert min(c["shots"] for c in SWEEP) == 1 and max(c["shots"] for c in SWEEP) == 50
    assert any(c["weights"] and sum(w != 0 for w in c["weights"]) > 1 for c in SWEEP), "multi-step loss"
    assert {c["dtype"] for c in SWEEP} == {torch.float64, torch.float32}


@pytest.mark.parametrize("device", DEVICES)
def test_second_order_differs_from_first_order(device):
    cfg = C([2, 10, 1], "tanh", "mse", "fixed", False, 2, 4, 5, 5)
    grads = []
    for first_order in (False, True):
        maml, _, _, data = build({**cfg, "first_order": first_order}, device, seed=7)
        maml.meta_loss(*data).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in maml.model.parameters()]))
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() > 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_meta_loss_goes_through_mlp_maml(device, monkeypatch):
    cfg = C([2, 5, 1], "relu", "mse", "per_layer_step", False, 2, 3, 4, 4)
    maml, _, _, data = build(cfg, device, seed=8)
    seen = []
    original = ops.mlp_maml_mean  # the mean of mlp_maml: BatchedMAML's fused engine calls it

    def spy(*args, **kwargs):
        seen.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "mlp_maml_mean", spy)
    maml.meta_loss(*data)
    assert len(seen) == 1
    assert maml.engine == "fused_mlp"
    if device == "cpu" and compiled_ops_built():  # and ops.mlp_maml reaches the compiled kernel
        assert ops._compiled("mlp_maml", torch.device("cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_meta_training_reduces_the_loss(device):
    """A few Adam steps on the sinusoid problem (mamlext.data) lower the meta-loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)).to(device)
    maml = BatchedMAML(model, inner_lr=0.01, lr_mode="per_layer_step")
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    amp = 0.1 + 4.9 * torch.rand(16, 1, 1, generator=gen)
    phase = 3.14 * torch.rand(16, 1, 1, generator=gen)
    xs, xq = torch.rand(16, 10, 1, generator=gen) * 10 - 5, torch.rand(16, 10, 1, generator=gen) * 10 - 5
    data = [t.to(device) for t in (xs, amp * torch.sin(xs + phase), xq, amp * torch.sin(xq + phase))]
    first = maml.meta_loss(*data).item()
    for _ in range(30):
        opt.zero_grad()
        maml.meta_loss(*data).backward()
        opt.step()
    assert maml.meta_loss(*data).item() < 0.9 * first


# ----------------------------------------------------------------------------------------------------------------
# adapt / predict


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_mode", ["fixed", "per_layer_step", "per_param"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_adapt_and_predict_match_plain_sgd(device, lr_mode, loss, path):
    cfg = C([3, 11, 7, 4], "gelu", loss, lr_mode, False, 3, 5, 6, 8)
    maml, oracle_model, rates, (xs, ys, xq, yq) = build(cfg, device, seed=9)
    before = [p.detach().clone() for p in maml.model.parameters()]
    fn = F.mse_loss if loss == "mse" else F.cross_entropy
    for steps in (0, 1, 3, 4):  # 4 > inner_steps: per_layer_step keeps the last step's rate
        adapted = maml.adapt(xs, ys, steps=steps)
        assert [list(a.shape) for a in adapted] == [[5, *p.shape] for p in maml.model.parameters()]
        assert not any(a.requires_grad for a in adapted)
        out = maml.predict(adapted, xq)
        assert out.shape == (5, 8, 4)
        names = [n for n, _ in oracle_model.named_parameters()]
        for t in range(5):
            fast = dict(oracle_model.named_parameters())
            for k in range(steps):
                grads = torch.autograd.grad(fn(functional_call(oracle_model, fast, (xs[t].double(),)),
                                               ys[t] if loss == "ce" else ys[t].double()), list(fast.values()))
                fast = {n: p - (0.05 if lr_mode == "fixed" else rates[i][min(k, 2)] if lr_mode == "per_layer_step"
                                else rates[i]) * g for i, ((n, p), g) in enumerate(zip(fast.items(), grads))}
            assert_rel([a[t] for a in adapted], [fast[n].detach() for n in names], 1e-10, f"adapted, task {t}")
            expected = functional_call(oracle_model, fast, (xq[t].double(),)).detach()
            assert_rel([out[t]], [expected], 1e-10, f"predict, task {t}")
            assert_rel([out[t]], [functional_call(maml.model, {n: a[t] for n, a in zip(names, adapted)},
                                                  (xq[t],))], 1e-12, "predict vs the module")
    assert all(torch.equal(b, p) for b, p in zip(before, maml.model.parameters())), "adapt changed the model"
    assert maml.adapt(xs, ys)[0].shape[0] == 5  # default steps = inner_steps


# ----------------------------------------------------------------------------------------------------------------
# Construction and engine selection


@pytest.mark.parametrize("lr_mode", ["fixed", "per_layer_step", "per_param"])
def test_inner_lrs_and_defaults(lr_mode):
    model = mlp([3, 5, 2], "relu")
    maml = BatchedMAML(model, inner_lr=0.3, inner_steps=4, lr_mode=lr_mode)
    assert maml.engine == "fused_mlp" and maml.activation == "relu"
    assert maml.step_weights.tolist() == [0.0, 0.0, 0.0, 1.0]
    shapes = {"fixed": [], "per_layer_step": [[4]] * 4, "per_param": [list(p.shape) for p in model.parameters()]}
    assert [list(r.shape) for r in maml.inner_lrs] == shapes[lr_mode]
    assert all((r == 0.3).all() for r in maml.inner_lrs)
    names = {n for n, _ in maml.named_parameters()}
    assert {n for n, _ in model.named_parameters()} <= {n.removeprefix("model.") for n in names}
    assert len(names) == 4 + len(shapes[lr_mode])
    assert isinstance(mamlext.BatchedMAML(mlp([2, 1], "tanh")).model, nn.Sequential)


@pytest.mark.parametrize("act,module,param", [("leaky_relu", nn.LeakyReLU(0.2), 0.2), ("elu", nn.ELU(0.4), 0.4),
                                              ("gelu", nn.GELU(), 0.0), ("sigmoid", nn.Sigmoid(), 0.0)])
def test_activation_parsing(act, module, param):
    maml = BatchedMAML(nn.Sequential(nn.Linear(2, 3), module, nn.Linear(3, 3), copy.deepcopy(module),
                                     nn.Linear(3, 1)))
    assert (maml.activation, maml.act_param) == (act, pytest.approx(param))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        return self.fc(x)


class MyReLU(nn.ReLU):
    pass


UNSUPPORTED = {
    "conv": (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(2, 1)), r"layer 0 \(Conv2d\)"),
    "final_activation": (nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1), nn.Sigmoid()),
                         r"layer 3 \(Sigmoid\).*after the last Linear"),
    "mixed_activations": (nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)),
                          r"layer 3 \(Tanh\).*same kind"),
    "mixed_slopes": (nn.Sequential(nn.Linear(2, 3), nn.LeakyReLU(0.1), nn.Linear(3, 3), nn.LeakyReLU(0.2),
                                   nn.Linear(3, 1)), r"layer 3 \(LeakyReLU\).*same kind"),
    "gelu_tanh": (nn.Sequential(nn.Linear(2, 3), nn.GELU(approximate="tanh"), nn.Linear(3, 1)),
                  r"layer 1 \(GELU\).*approximate='tanh'"),
    "dropout": (nn.Sequential(nn.Linear(2, 3), nn.Dropout(), nn.Linear(3, 1)), r"layer 1 \(Dropout\)"),
    "no_bias": (nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1)),
                r"layer 0 \(Linear\).*without bias"),
    "two_linears": (nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), r"layer 1 \(Linear\).*in a row"),
    "two_activations": (nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.ReLU(), nn.Linear(3, 1)),
                        r"layer 2 \(ReLU\).*after another activation"),
    "leading_activation": (nn.Sequential(nn.ReLU(), nn.Linear(2, 1)), r"layer 0 \(ReLU\).*first layer"),
    "subclass": (nn.Sequential(nn.Linear(2, 3), MyReLU(), nn.Linear(3, 1)), r"layer 1 \(MyReLU\)"),
    "mismatched_features": (nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(4, 1)),
                            r"layer 2 \(Linear\).*in_features = 4"),
    "not_sequential": (Custom(), r"Custom.*nn.Sequential"),
    "empty": (nn.Sequential(), "empty"),
    "half": (nn.Sequential(nn.Linear(2, 1)).half(), "float32 or all float64"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_models(case):
    model, message = UNSUPPORTED[case]
    with pytest.raises(ValueError, match=message):
        BatchedMAML(model, backend="fused")
    if case == "empty":  # no parameters: no engine at all
        with pytest.raises(ValueError, match=r"no engine serves this model \(fused_mlp: .*empty.*; generic: .*no "
                                             r"parameters"):
            BatchedMAML(model)
    else:  # every other model goes to the generic engine
        assert BatchedMAML(model).engine == BatchedMAML(model, backend="generic").engine == "generic"


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(backend="cuda"), ValueError, r"backend must be one of \['auto', 'fused', 'generic'\], got 'cuda'"),
    (dict(loss="l1"), ValueError, "loss must be one of"),
    (dict(lr_mode="per_layer"), ValueError, "lr_mode must be one of"),
    (dict(inner_steps=0), ValueError, "inner_steps must be an int >= 1"),
    (dict(inner_steps=1.5), ValueError, "inner_steps must be an int >= 1"),
    (dict(inner_lr=float("nan")), ValueError, "inner_lr must be a finite float"),
    (dict(inner_steps=2, step_weights=[1.0]), ValueError, "step_weights must hold inner_steps = 2"),
    (dict(step_weights=[float("inf")]), ValueError, "step_weights must be finite"),
])
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        BatchedMAML(mlp([2, 3, 1], "relu"), **kwargs)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        BatchedMAML(lambda x: x)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs


def _bad_inputs():
    gen = torch.Generator().manual_seed(3)
    xs, ys, xq, yq = make_tasks([3, 4, 2], 5, 6, 7, "mse", torch.float64, "cpu", gen)
    cs, cq = torch.randint(0, 2, (5, 6), generator=gen), torch.randint(0, 2, (5, 7), generator=gen)
    nan = xs.clone()
    nan[1, 2, 0] = float("nan")
    inf = ys.clone()
    inf[0, 0, 1] = float("inf")
    mse = dict(xs=xs, ys=ys, xq=xq, yq=yq)
    ce = dict(xs=xs, ys=cs, xq=xq, yq=cq)
    return {
        "tasks_mismatch_xq": ("mse", {**mse, "xq": xq[:4], "yq": yq[:4]}, r"xs has T = 5 tasks but xq has 4"),
        "tasks_mismatch_ys": ("mse", {**mse, "ys": ys[:4]}, r"ys must be \[T, K, out\] = \[5, 6, 2\]"),
        "tasks_mismatch_yq_ce": ("ce", {**ce, "yq": cq[:3]}, r"yq must be \[T, K\] = \[5, 7\]"),
        "feature_size_xs": ("mse", {**mse, "xs": torch.randn(5, 6, 4, dtype=torch.float64)},
                            r"xs must be \[T, K, in\] with in = 3 \(the model's in_features\), got \[5, 6, 4\]"),
        "feature_size_xq": ("mse", {**mse, "xq": torch.randn(5, 7, 2, dtype=torch.float64)},
                            r"xq must be \[T, K, in\]"),
        "dims_xs": ("mse", {**mse, "xs": xs[0]}, r"xs must be \[T, K, in\] = \[T, K, 3\] \(3 dimensions\)"),
        "dims_yq": ("mse", {**mse, "yq": yq[..., 0]}, r"yq must be \[T, K, out\] = \[5, 7, 2\]"),
        "out_size_ys": ("mse", {**mse, "ys": torch.randn(5, 6, 3, dtype=torch.float64)}, r"ys must be \[T, K, out\]"),
        "empty_tasks": ("mse", {**mse, "xs": xs[:0], "ys": ys[:0], "xq": xq[:0], "yq": yq[:0]},
                        r"xs must hold T >= 1 tasks"),
        "empty_rows": ("mse", {**mse, "xs": xs[:, :0], "ys": ys[:, :0]}, r"xs must hold T >= 1 tasks of K >= 1 rows"),
        "dtype_xs": ("mse", {**mse, "xs": xs.float()}, "xs has dtype torch.float32 but the model's parameters are"),
        "dtype_ys_mse": ("mse", {**mse, "ys": ys.float()}, "ys has dtype torch.float32"),
        "dtype_ys_ce": ("ce", {**ce, "ys": cs.int()}, "ys must hold int64 class indices"),
        "float_ys_ce": ("ce", {**ce, "ys": ys}, "ys must hold int64 class indices"),
        "shape_ys_ce": ("ce", {**ce, "ys": cs[:, :, None]}, r"ys must be \[T, K\] = \[5, 6\]"),
        "label_high": ("ce", {**ce, "yq": torch.full((5, 7), 2)}, r"yq holds the class index 2, outside \[0, 2\)"),
        "label_negative": ("ce", {**ce, "ys": torch.full((5, 6), -1)}, r"ys holds the class index -1"),
        "nan_xs": ("mse", {**mse, "xs": nan}, "xs holds non-finite values"),
        "inf_ys": ("mse", {**mse, "ys": inf}, "ys holds non-finite values"),
        "nan_xq_ce": ("ce", {**ce, "xq": torch.full_like(xq, float("nan"))}, "xq holds non-finite values"),
        "device_xs": ("mse", {**mse, "xs": xs.to("meta")}, "xs is on meta but the model is on cpu"),
        "device_yq": ("mse", {**mse, "yq": yq.to("meta")}, "yq is on meta but the model is on cpu"),
        "not_tensor": ("mse", {**mse, "ys": ys.tolist()}, "ys must be a tensor"),
    }


BAD = _bad_inputs()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_meta_loss(case):
    loss, args, message = BAD[case]
    maml = BatchedMAML(mlp([3, 4, 2], "tanh").double(), loss=loss)
    with pytest.raises((ValueError, TypeError), match=r"BatchedMAML\.meta_loss: " + message):
        maml.meta_loss(**args)


SUPPORT_CASES = [c for c in BAD if BAD[c][2].startswith(("xs", "ys")) and c != "tasks_mismatch_xq"]


@pytest.mark.parametrize("case", SUPPORT_CASES)
def test_bad_inputs_adapt(case):
    """The support-set cases, through adapt."""
    loss, args, message = BAD[case]
    maml = BatchedMAML(mlp([3, 4, 2], "tanh").double(), loss=loss)
    with pytest.raises((ValueError, TypeError), match=r"BatchedMAML\.adapt: " + message):
        maml.adapt(args["xs"], args["ys"])


def test_bad_inputs_adapt_steps_and_predict():
    maml = BatchedMAML(mlp([3, 4, 2], "tanh").double())
    gen = torch.Generator().manual_seed(4)
    xs, ys, xq, _ = make_tasks([3, 4, 2], 2, 3, 3, "mse", torch.float64, "cpu", gen)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        maml.adapt(xs, ys, steps=-1)
    adapted = maml.adapt(xs, ys)
    with pytest.raises(ValueError, match="adapted must hold one tensor per parameter"):
        maml.predict(adapted[:3], xq)
    with pytest.raises(ValueError, match=r"adapted\[0\] must be \[T, \*S_0\] = \[3, 4, 3\]"):
        maml.predict(adapted, torch.cat([xq, xq[:1]]))
    with pytest.raises(ValueError, match=r"x must be \[T, K, in\] with in = 3"):
        maml.predict(adapted, xq[..., :2])
    with pytest.raises(ValueError, match=r"adapted\[1\] is torch.float32"):
        maml.predict([adapted[0], adapted[1].float(), *adapted[2:]], xq)


@pytest.mark.parametrize("backend", ["fused", "generic"])
def test_assigning_inner_lr_takes_effect(backend):
    """inner_lr is read by every call: assigning it after construction gives the new rate's meta-loss, adaptation
    and (iMAML) inner solve, as a learner built with that rate."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    xs, ys, xq, yq = (torch.randn(3, 5, d, dtype=torch.float64) for d in (2, 1, 2, 1))
    changed = BatchedMAML(model, inner_lr=0.01, inner_steps=2, backend=backend)
    changed.inner_lr = 0.3
    built = BatchedMAML(model, inner_lr=0.3, inner_steps=2, backend=backend)
    assert changed.inner_lr == 0.3 and changed.lr_mode == "fixed"
    torch.testing.assert_close(changed.meta_loss(xs, ys, xq, yq), built.meta_loss(xs, ys, xq, yq), rtol=0, atol=0)
    for a, b in zip(changed.adapt(xs, ys), built.adapt(xs, ys)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if backend == "fused":  # iMAML runs on the fused MLP engine only
        imaml = mamlext.iMAML(model, inner_lr=0.01, inner_steps=2)
        imaml.inner_lr = 0.3
        for a, b in zip(imaml.adapt(xs, ys), mamlext.iMAML(model, inner_lr=0.3, inner_steps=2).adapt(xs, ys)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
