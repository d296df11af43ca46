"""The implementations of one MAML (or iMAML) meta-iteration the benchmarks compare, all on the same model and data.

Each builder takes (model, setting, data) with data = (xs, ys, xq, yq) and returns ``run()``, which computes one
meta-iteration (inner loop of every task, query losses, meta-gradient of their mean w.r.t. the model's parameters)
and returns the meta-gradient as a list in model.parameters() order. A builder raises Skip when the implementation
does not apply (a library not installed, an engine that cannot serve the model).

  loop      a plain per-task autograd loop, the learn2learn way: for each task, torch.func.functional_call +
            torch.autograd.grad(create_graph=not first_order) inner steps, then the query loss / T, .backward().
            It is the reference every other implementation's meta-gradient is checked against.
  l2l-style learn2learn 0.2's MAML written out in plain PyTorch (clone_module, then each parameter replaced by
            p + (-lr * g)), in the loop as a learn2learn user writes it: learner = clone(); adapt(support loss);
            (query loss / T).backward().
  mamlext.MAML  the one-import swap: mamlext.MAML in that loop.
  ops-only  that loop without the learner: the ops mamlext.MAML's learners call, on bare parameter lists (MLPs the
            fused engine serves): the least a per-task learner on them costs.
  learn2learn   learn2learn.algorithms.MAML in that loop (when installed).
  vmap      torch.func.grad of the mean query loss, the per-task losses from torch.func.vmap over tasks of the inner
            adaptation written with torch.func.grad ("vmap(grad)" MAML). The model runs as it is: an
            nn.BatchNorm2d in training mode gives wrong second-order meta-gradients under vmap (functorch issue
            534), and the check against `loop` marks such a row failed rather than hiding the trap.
  higher    facebookresearch/higher's innerloop_ctx with a differentiable SGD, task by task (second order only).
  torchopt  torchopt.MetaSGD on a copy of the model, task by task, the state restored after each (second order only).
  fused / generic-*   mamlext.BatchedMAML with backend "fused" (the fused MLP engine) or "generic" (any model;
            memory mode "graph" or "low").
"""
import copy
import importlib.util
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

import mamlext
from mamlext import batched, ops
from mamlext.maml import _replace_parameters
from mamlext.nn import fused_layers, parameter_slots

Run = Callable[[], List[Tensor]]
LOSS_FUNCTIONS = {"mse": F.mse_loss, "ce": F.cross_entropy}


class Skip(Exception):
    """An implementation that does not run here; the message says why."""


class Setting(NamedTuple):
    inner_lr: float
    steps: int
    first_order: bool
    loss: str  # "mse" or "ce"


class IMAMLSetting(NamedTuple):
    inner_lr: float
    steps: int
    lam: float
    cg_steps: int
    loss: str


def _zero_grads(params: List[Tensor]) -> None:
    for p in params:
        p.grad = None


def _engine(name: str, make: Callable):
    """make(): one of mamlext's engines on the model; Skip where it refuses the model."""
    try:
        return make()
    except (ValueError, NotImplementedError) as error:
        raise Skip(f"{name} does not serve this model: {error}") from None


def _meta_loss_run(engine, model: nn.Module, data) -> Run:
    """The meta-gradient of engine.meta_loss(xs, ys, xq, yq) w.r.t. the model's parameters, by backward."""
    params = list(model.parameters())

    def run():
        _zero_grads(params)
        engine.meta_loss(*data).backward()
        return [p.grad for p in params]
    return run


# --- MAML ------------------------------------------------------------------------------------------------------------

def loop(model: nn.Module, setting: Setting, data) -> Run:
    xs, ys, xq, yq = data
    named = dict(model.named_parameters())
    params = list(named.values())
    loss = LOSS_FUNCTIONS[setting.loss]
    tasks = xs.shape[0]

    def run():
        _zero_grads(params)
        for t in range(tasks):
            fast = named
            for _ in range(setting.steps):
                support = loss(functional_call(model, fast, (xs[t],)), ys[t])
                grads = torch.autograd.grad(support, list(fast.values()), create_graph=not setting.first_order)
                fast = {name: p - setting.inner_lr * g for (name, p), g in zip(fast.items(), grads)}
            (loss(functional_call(model, fast, (xq[t],)), yq[t]) / tasks).backward()
        return [p.grad for p in params]
    return run


def _learner_loop(make_learner: Callable[[], Callable[[Tensor], Tensor]], adapt: Callable, params: List[Tensor],
                  setting: Setting, data) -> Run:
    """The loop as a learn2learn user writes it: per task, learner = clone(); adapt(learner, support loss) per
    step; (query loss / T).backward()."""
    xs, ys, xq, yq = data
    loss = LOSS_FUNCTIONS[setting.loss]
    tasks = xs.shape[0]

    def run():
        _zero_grads(params)
        for t in range(tasks):
            learner = make_learner()
            for _ in range(setting.steps):
                adapt(learner, loss(learner(xs[t]), ys[t]))
            (loss(learner(xq[t]), yq[t]) / tasks).backward()
        return [p.grad for p in params]
    return run


def _l2l_clone_module(module: nn.Module, memo: Dict[int, Tensor]) -> nn.Module:
    """learn2learn 0.2's clone_module in plain PyTorch: a shallow copy of each module (through nn.Module's
    __setattr__) whose parameters are p.clone(), tied ones cloned once."""
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = module._parameters.copy()
    clone._buffers = module._buffers.copy()
    clone._modules = module._modules.copy()
    for key, param in module._parameters.items():
        if param is not None:
            if id(param) not in memo:
                memo[id(param)] = param.clone()
            clone._parameters[key] = memo[id(param)]
    for key, child in module._modules.items():
        clone._modules[key] = child if child is None else _l2l_clone_module(child, memo)
    if hasattr(clone, "flatten_parameters"):
        clone = clone._apply(lambda x: x)
    return clone


def l2l_style(model: nn.Module, setting: Setting, data) -> Run:
    """learn2learn 0.2's MAML written out in plain PyTorch: clone_module, autograd.grad of the support loss,
    every parameter replaced by p + (-lr * g)."""
    def adapt(learner, support):
        params = list(learner.parameters())
        grads = torch.autograd.grad(support, params, retain_graph=not setting.first_order,
                                    create_graph=not setting.first_order)
        _replace_parameters(learner, {id(p): p + (-setting.inner_lr * g) for p, g in zip(params, grads)})
    return _learner_loop(lambda: _l2l_clone_module(model, {}), adapt, list(model.parameters()), setting, data)


def mamlext_maml(model: nn.Module, setting: Setting, data) -> Run:
    """The one-import swap: mamlext.MAML in the learn2learn loop."""
    maml = mamlext.MAML(model, lr=setting.inner_lr, first_order=setting.first_order)
    return _learner_loop(maml.clone, lambda learner, support: learner.adapt(support), list(model.parameters()),
                         setting, data)


def ops_only_loop(model: nn.Module, setting: Setting, data) -> Run:
    """mamlext.MAML's per-task loop with the learner taken away: the ops its learners call (clone_tensors, the
    fused MLP layers, sgd_update) on bare parameter lists, no module. What a per-task learner on these ops costs at
    the least; the gap to mamlext.MAML is the module bookkeeping (the clone of the module tree, nn.Module calls)."""
    layers = fused_layers(model)
    if layers is None:
        raise Skip("the ops-only loop runs MLPs that the fused engine serves")
    params = [slot[key] for slot, key in parameter_slots(model, layers)]
    xs, ys, xq, yq = data
    loss = LOSS_FUNCTIONS[setting.loss]
    tasks = xs.shape[0]

    def forward(fast, x):
        return ops.mlp(fast, x, layers.activation, layers.act_param)

    def run():
        _zero_grads(params)
        for t in range(tasks):
            fast = ops.clone_tensors(params)
            for _ in range(setting.steps):
                grads = torch.autograd.grad(loss(forward(fast, xs[t]), ys[t]), fast,
                                            create_graph=not setting.first_order)
                fast = ops.sgd_update(fast, grads, setting.inner_lr)
            (loss(forward(fast, xq[t]), yq[t]) / tasks).backward()
        return [p.grad for p in params]
    return run


def learn2learn_maml(model: nn.Module, setting: Setting, data) -> Run:
    _require("learn2learn")
    import learn2learn

    maml = learn2learn.algorithms.MAML(model, lr=setting.inner_lr, first_order=setting.first_order)
    return _learner_loop(maml.clone, lambda learner, support: learner.adapt(support), list(model.parameters()),
                         setting, data)


def vmap_grad(model: nn.Module, setting: Setting, data) -> Run:
    xs, ys, xq, yq = data
    theta = {name: p.detach() for name, p in model.named_parameters()}
    loss = LOSS_FUNCTIONS[setting.loss]

    def task_loss(params, x, y):
        return loss(functional_call(model, params, (x,)), y)

    def task_query_loss(params, x_s, y_s, x_q, y_q):
        for _ in range(setting.steps):
            g = grad(task_loss)(params, x_s, y_s)
            if setting.first_order:
                g = {name: v.detach() for name, v in g.items()}
            params = {name: params[name] - setting.inner_lr * g[name] for name in params}
        return task_loss(params, x_q, y_q)

    def meta_objective(params):
        return vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq).mean()

    meta_grad = grad(meta_objective)

    def run():
        return list(meta_grad(theta).values())
    return run


def _second_order_only(name: str, setting: Setting) -> None:
    if setting.first_order:
        raise Skip(f"{name} has no first-order MAML mode that yields meta-gradients (detaching its inner steps cuts "
                   "the graph to the initial parameters); run for second order only")


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _require(module: str) -> None:
    if not importable(module):
        raise Skip(f"{module} is not installed (pip install {module})")


def _innerloop_run(innerloop_ctx, model: nn.Module, setting: Setting, data) -> Run:
    """higher's loop: per task, innerloop_ctx(model, SGD, copy_initial_weights=False), diffopt.step per inner step,
    (query loss / T).backward()."""
    xs, ys, xq, yq = data
    params = list(model.parameters())
    loss = LOSS_FUNCTIONS[setting.loss]
    inner_opt = torch.optim.SGD(params, lr=setting.inner_lr)
    tasks = xs.shape[0]

    def run():
        _zero_grads(params)
        for t in range(tasks):
            with innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                               track_higher_grads=not setting.first_order) as (fmodel, diffopt):
                for _ in range(setting.steps):
                    diffopt.step(loss(fmodel(xs[t]), ys[t]))
                (loss(fmodel(xq[t]), yq[t]) / tasks).backward()
        return [p.grad for p in params]
    return run


def higher_loop(model: nn.Module, setting: Setting, data) -> Run:
    _require("higher")
    _second_order_only("higher", setting)
    import higher

    return _innerloop_run(higher.innerloop_ctx, model, setting, data)


def torchopt_loop(model: nn.Module, setting: Setting, data) -> Run:
    _require("torchopt")
    _second_order_only("torchopt", setting)
    import torchopt

    xs, ys, xq, yq = data
    own = copy.deepcopy(model)  # MetaSGD replaces the model's parameters by their updates in place
    params = list(own.parameters())
    loss = LOSS_FUNCTIONS[setting.loss]
    inner_opt = torchopt.MetaSGD(own, lr=setting.inner_lr)
    model_state = torchopt.extract_state_dict(own, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
    tasks = xs.shape[0]

    def run():
        _zero_grads(params)
        for t in range(tasks):
            for _ in range(setting.steps):
                inner_opt.step(loss(own(xs[t]), ys[t]))
            (loss(own(xq[t]), yq[t]) / tasks).backward()
            torchopt.recover_state_dict(own, model_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        return [p.grad for p in params]
    return run


def metasgd_style(model: nn.Module, setting: Setting, data) -> Run:
    """learn2learn 0.2's MetaSGD written out in plain PyTorch: clone_module, the rates cloned, autograd.grad of the
    support loss, every parameter replaced by p - lr_p * g (per-element rates, here all inner_lr, so the model's
    meta-gradient is MAML's)."""
    rates = [torch.full_like(p, setting.inner_lr, requires_grad=True) for p in model.parameters()]

    def adapt(learner, support):
        module, lrs = learner
        params = list(module.parameters())
        grads = torch.autograd.grad(support, params, retain_graph=not setting.first_order,
                                    create_graph=not setting.first_order)
        _replace_parameters(module, {id(p): p - lr * g for p, lr, g in zip(params, lrs, grads)})

    def make_learner():
        module = _l2l_clone_module(model, {})
        lrs = [lr.clone() for lr in rates]

        class Learner(tuple):
            def __call__(self, x):
                return self[0](x)
        return Learner((module, lrs))
    return _learner_loop(make_learner, adapt, list(model.parameters()), setting, data)


def mamlext_metasgd(model: nn.Module, setting: Setting, data) -> Run:
    """The one-import swap for learn2learn's MetaSGD: mamlext.MetaSGD in the same loop."""
    meta = mamlext.MetaSGD(model, lr=setting.inner_lr, first_order=setting.first_order)
    return _learner_loop(meta.clone, lambda learner, support: learner.adapt(support), list(model.parameters()),
                         setting, data)


def mamlext_innerloop(model: nn.Module, setting: Setting, data) -> Run:
    """higher's loop with mamlext.innerloop_ctx (torch.optim.SGD as the differentiable inner optimiser)."""
    return _innerloop_run(mamlext.innerloop_ctx, model, setting, data)


def generic_available() -> bool:
    return "generic" in batched.BACKENDS


def batched_maml(backend: str, memory: Optional[str] = None,
                 task_chunk: Optional[int] = None) -> Callable[[nn.Module, Setting, tuple], Run]:
    """The builder of mamlext.BatchedMAML on `backend` (and, for the generic engine, its memory mode and chunk of
    tasks)."""

    def build(model: nn.Module, setting: Setting, data) -> Run:
        options = {}
        if backend == "generic":
            if not generic_available():
                raise Skip("mamlext has no generic engine in this version (mamlext.batched.BACKENDS = "
                           f"{list(batched.BACKENDS)})")
            options["memory"] = memory
            if task_chunk is not None:
                options["task_chunk"] = task_chunk
        maml = _engine(f"the {backend} engine", lambda: mamlext.BatchedMAML(
            model, inner_lr=setting.inner_lr, inner_steps=setting.steps, first_order=setting.first_order,
            loss=setting.loss, backend=backend, **options))
        return _meta_loss_run(maml, model, data)
    return build


# the rows that are mamlext's own engines
MAMLEXT_IMPLS = ("fused", "generic-graph", "generic-low", "generic-low-chunk1")

# Every MAML implementation by row name; workloads pick the ones that apply to them.
MAML_IMPLS: Dict[str, Callable[[nn.Module, Setting, tuple], Run]] = {
    "loop": loop,
    "l2l-style": l2l_style,
    "mamlext.MAML": mamlext_maml,
    "ops-only": ops_only_loop,
    "learn2learn": learn2learn_maml,
    "vmap": vmap_grad,
    "higher": higher_loop,
    "mamlext.innerloop_ctx": mamlext_innerloop,
    "metasgd-style": metasgd_style,
    "mamlext.MetaSGD": mamlext_metasgd,
    "torchopt": torchopt_loop,
    "fused": batched_maml("fused"),
    "generic-graph": batched_maml("generic", "graph"),
    "generic-low": batched_maml("generic", "low"),
    "generic-low-chunk1": batched_maml("generic", "low", task_chunk=1),  # one task at a time: the least memory
}


# --- iMAML -----------------------------------------------------------------------------------------------------------
# phi_t = `steps` gradient-descent steps on L_support,t(phi) + lam/2 ||phi - theta||^2 from theta (no graph), then
# g_t = (I + H_t / lam)^{-1} grad L_query,t(phi_t) by `cg_steps` of conjugate gradient from 0; the meta-gradient is
# mean_t g_t (Rajeswaran et al. 2019).

def _cg_update(rs, p_ap, zero):
    """rs / p_ap, 0 where p_ap = 0 (a task whose residual is already 0 stays where it is)."""
    return torch.where(p_ap != 0, rs / torch.where(p_ap != 0, p_ap, 1), zero)


def imaml_loop(model: nn.Module, setting: IMAMLSetting, data) -> Run:
    """Task by task: plain autograd, Hessian-vector products by double backward."""
    xs, ys, xq, yq = data
    names = [name for name, _ in model.named_parameters()]
    theta = [p.detach() for p in model.parameters()]
    loss = LOSS_FUNCTIONS[setting.loss]
    tasks = xs.shape[0]

    def task_loss(phi, x, y):
        return loss(functional_call(model, dict(zip(names, phi)), (x,)), y)

    def dot(a, b):
        return sum((x * y).sum() for x, y in zip(a, b))

    def run():
        total = [torch.zeros_like(p) for p in theta]
        for t in range(tasks):
            phi = [p.clone() for p in theta]
            for _ in range(setting.steps):
                phi = [p.requires_grad_() for p in phi]
                grads = torch.autograd.grad(task_loss(phi, xs[t], ys[t]), phi)
                phi = [(p - setting.inner_lr * (g + setting.lam * (p - p0))).detach()
                       for p, g, p0 in zip(phi, grads, theta)]
            phi = [p.requires_grad_() for p in phi]
            b = torch.autograd.grad(task_loss(phi, xq[t], yq[t]), phi)
            support_grads = torch.autograd.grad(task_loss(phi, xs[t], ys[t]), phi, create_graph=True)
            x = [torch.zeros_like(v) for v in b]
            r = [v.clone() for v in b]
            p = [v.clone() for v in b]
            rs = dot(r, r)
            zero = torch.zeros_like(rs)
            for _ in range(setting.cg_steps):
                hvp = torch.autograd.grad(support_grads, phi, grad_outputs=p, retain_graph=True)
                ap = [pi + h / setting.lam for pi, h in zip(p, hvp)]
                alpha = _cg_update(rs, dot(p, ap), zero)
                x = [xi + alpha * pi for xi, pi in zip(x, p)]
                r = [ri - alpha * api for ri, api in zip(r, ap)]
                rs_new = dot(r, r)
                beta = _cg_update(rs_new, rs, zero)
                p = [ri + beta * pi for ri, pi in zip(r, p)]
                rs = rs_new
            for acc, xi in zip(total, x):
                acc.add_(xi, alpha=1.0 / tasks)
        return total
    return run


def imaml_vmap(model: nn.Module, setting: IMAMLSetting, data) -> Run:
    """torch.func: vmap over tasks of the inner steps (grad) and the CG solve (Hessian-vector products by grad of
    <grad, v>)."""
    xs, ys, xq, yq = data
    theta = {name: p.detach() for name, p in model.named_parameters()}
    loss = LOSS_FUNCTIONS[setting.loss]

    def task_loss(phi, x, y):
        return loss(functional_call(model, phi, (x,)), y)

    def dot(a, b):
        return sum((a[k] * b[k]).sum() for k in a)

    def task_meta_grad(x_s, y_s, x_q, y_q):
        phi = theta
        for _ in range(setting.steps):
            g = grad(task_loss)(phi, x_s, y_s)
            phi = {k: phi[k] - setting.inner_lr * (g[k] + setting.lam * (phi[k] - theta[k])) for k in phi}
        b = grad(task_loss)(phi, x_q, y_q)

        def hvp(v):  # reverse over reverse (forward-over-reverse jvp trips on ZeroTensors in mse_loss's backward)
            return grad(lambda q: dot(grad(task_loss)(q, x_s, y_s), v))(phi)

        x = {k: torch.zeros_like(v) for k, v in b.items()}
        r, p = dict(b), dict(b)
        rs = dot(r, r)
        zero = torch.zeros_like(rs)
        for _ in range(setting.cg_steps):
            hv = hvp(p)
            ap = {k: p[k] + hv[k] / setting.lam for k in p}
            alpha = _cg_update(rs, dot(p, ap), zero)
            x = {k: x[k] + alpha * p[k] for k in x}
            r = {k: r[k] - alpha * ap[k] for k in r}
            rs_new = dot(r, r)
            beta = _cg_update(rs_new, rs, zero)
            p = {k: r[k] + beta * p[k] for k in p}
            rs = rs_new
        return x

    batched_grads = vmap(task_meta_grad)

    def run():
        return [g.mean(0) for g in batched_grads(xs, ys, xq, yq).values()]
    return run


def imaml_mamlext(model: nn.Module, setting: IMAMLSetting, data) -> Run:
    imaml = _engine("mamlext.iMAML", lambda: mamlext.iMAML(
        model, inner_lr=setting.inner_lr, inner_steps=setting.steps, lam=setting.lam, cg_steps=setting.cg_steps,
        loss=setting.loss))
    return _meta_loss_run(imaml, model, data)


IMAML_IMPLS: Dict[str, Callable[[nn.Module, IMAMLSetting, tuple], Run]] = {
    "loop": imaml_loop,
    "vmap": imaml_vmap,
    "fused": imaml_mamlext,
}
