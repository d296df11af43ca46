"""Property test: every engine gives the per-task autograd loop's meta-gradient, or refuses naming the layer, and
leaves the model exactly as it was.

Random models (depth, widths, activations, modules used twice, tied weights, frozen parameters, BatchNorm or
LayerNorm, forward hooks, parametrizations), models edited between calls, rate modes, orders, step
counts and data, seeded; mis-shaped targets must be refused. MAMLEXT_FUZZ_CASES sets the number of cases (default
400). (Interrupts: tests/test_interrupts.py.)"""
import copy
import os
import random

import pytest
import torch
from torch import nn

import mamlext
from mamlext.maml import _replace_parameters, clone_module

CASES = int(os.environ.get("MAMLEXT_FUZZ_CASES", "400"))
ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, lambda: nn.LeakyReLU(0.2), lambda: nn.ELU(0.8)]
LOSSES = {"mse": lambda out, y: (out - y).square().mean(), "ce": nn.functional.cross_entropy}
ENGINES = {"fused": dict(backend="fused"), "generic graph": dict(backend="generic", memory="graph"),
           "generic low": dict(backend="generic", memory="low"),
           "chunked": dict(backend="generic", memory="low", task_chunk=2)}


class _Scaled(nn.Module):
    """A parametrization: the layer computes with 2 tanh(W). (Not weight_norm, whose second derivative PyTorch
    computes wrongly, so the per-task loop is no oracle for it: see test_model_rules.py.)"""

    def forward(self, weight):
        return torch.tanh(weight) * 2.0


def random_model(rng: random.Random):
    """(model, description): an MLP of 1-3 Linear layers, maybe with a square layer used twice or a tied weight,
    BatchNorm, frozen parameters."""
    width = rng.randint(1, 5)
    sizes = [rng.randint(1, 4)] + [width] * rng.randint(0, 2) + [rng.randint(1, 4)]
    act = rng.choice(ACTIVATIONS)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 2 < len(sizes):
            layers.append(act())
    what = [f"sizes {sizes}", type(layers[1]).__name__ if len(layers) > 1 else "no activation"]
    sharing = rng.choice(["none", "none", "reuse", "tie_weight", "tie_bias"])
    if sharing != "none":  # a square layer next to a twin of the same shape
        square = nn.Linear(sizes[-1], sizes[-1])
        if sharing == "reuse":
            layers += [act(), square, act(), square]
        else:
            twin = nn.Linear(sizes[-1], sizes[-1])
            setattr(twin, sharing[4:], getattr(square, sharing[4:]))
            layers += [act(), square, act(), twin]
        what.append(sharing)
    norm = rng.random()
    if norm < 0.2:  # after the first Linear layer, with or without running statistics
        layers.insert(1, nn.BatchNorm1d(sizes[1], track_running_stats=rng.random() < 0.5))
        what.append("batchnorm")
    elif norm < 0.35:
        layers.insert(1, nn.LayerNorm(sizes[1], elementwise_affine=rng.random() < 0.8))
        what.append("layernorm")
    if rng.random() < 0.1:  # a hook that changes what the layer gives: an engine that skips it is wrong
        layers[0].register_forward_hook(lambda module, args, out: out * 1.5)
        what.append("forward hook")
    if rng.random() < 0.1:
        nn.utils.parametrize.register_parametrization(layers[0], "weight", _Scaled())
        what.append("parametrization")
    model = nn.Sequential(*layers).double()
    params = list(model.parameters())
    if rng.random() < 0.3 and len(params) > 1:
        frozen = rng.sample(range(len(params)), rng.randint(1, len(params) - 1))
        for i in frozen:
            params[i].requires_grad_(False)
        what.append(f"frozen {sorted(frozen)}")
    return model, ", ".join(what)


def snapshot(model):
    """Every slot of the model: (module path, attribute) -> (the object, its value, requires_grad)."""
    state = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(module, kind).items():
                state[(prefix, kind, key)] = (t, None if t is None else t.detach().clone(),
                                              None if t is None else t.requires_grad)
    return state


def assert_unchanged(model, before, context):
    after = snapshot(model)
    assert after.keys() == before.keys(), context
    for key, (obj, value, requires_grad) in before.items():
        now = after[key][0]
        assert now is obj, f"{context}: {key} was replaced by a {type(now).__name__}"
        if obj is not None:
            assert torch.equal(now.detach(), value), f"{context}: {key} changed value"
            assert now.requires_grad == requires_grad, f"{context}: {key} changed requires_grad"


def loop_meta_loss(model, rates_of, data, steps, first_order, loss_fn, weights, adapts=None):
    """The per-task autograd loop (learn2learn's clone / adapt; frozen parameters are not adapted): the mean over
    tasks of the weighted query losses. rates_of(i, step) is parameter i's rate at that step; adapts(i) whether the
    inner loop adapts parameter i (default: those that require grad)."""
    xs, ys, xq, yq = data
    total = 0
    names = [name for name, _ in model.named_parameters()]
    for t in range(xs.shape[0]):
        learner = clone_module(model)
        current = [p for _, p in learner.named_parameters()]
        assert [n for n, _ in learner.named_parameters()] == names
        for step in range(steps):
            support = loss_fn(learner(xs[t]), ys[t])
            adapted = [i for i, p in enumerate(current) if p.requires_grad and (adapts is None or adapts(i))]
            grads = torch.autograd.grad(support, [current[i] for i in adapted], create_graph=not first_order,
                                        allow_unused=True)
            updated = {}
            for i, g in zip(adapted, grads):
                if g is not None:
                    updated[id(current[i])] = current[i] - rates_of(i, step) * (g.detach() if first_order else g)
            _replace_parameters(learner, updated)
            current = [updated.get(id(p), p) for p in current]
            if weights[step] != 0:
                total = total + weights[step] * loss_fn(learner(xq[t]), yq[t])
    return total / xs.shape[0]


def random_case(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model, what = random_model(rng)
    loss = rng.choice(["mse", "ce"])
    steps = rng.randint(1, 3)
    lr_mode = rng.choice(["fixed", "per_layer_step", "per_param"])
    first_order = rng.random() < 0.3
    weights = None if rng.random() < 0.6 else [rng.uniform(0.2, 1.0) for _ in range(steps)]
    tasks, shots, queries = rng.randint(1, 4), rng.randint(2, 4), rng.randint(2, 3)  # BatchNorm needs 2 rows
    in_f, out_f = model[0].in_features, [m for m in model if isinstance(m, nn.Linear)][-1].out_features

    def pair(rows):
        x = torch.randn(tasks, rows, in_f, generator=gen, dtype=torch.float64)
        if loss == "mse":
            return x, torch.randn(tasks, rows, out_f, generator=gen, dtype=torch.float64)
        return x, torch.randint(0, out_f, (tasks, rows), generator=gen)
    config = dict(inner_lr=rng.uniform(0.05, 0.5), inner_steps=steps, first_order=first_order, loss=loss,
                  lr_mode=lr_mode, step_weights=weights)
    description = (f"seed {seed}: {what}; loss {loss}, {steps} steps, {lr_mode}, first_order={first_order}, "
                   f"weights {weights}, T={tasks}")
    rate_values = [torch.rand((steps,) if lr_mode == "per_layer_step" else p.shape, generator=gen,
                              dtype=torch.float64) * 0.4 + 0.05 for p in model.parameters()]
    return model, config, (*pair(shots), *pair(queries)), rate_values, description


def oracle(model, config, data, rate_values):
    """(meta loss, meta-gradients of the parameters by name, of the rates) of the per-task loop, on a copy."""
    twin = copy.deepcopy(model)
    mode, steps = config["lr_mode"], config["inner_steps"]
    rates = [r.clone().requires_grad_(mode != "fixed") for r in rate_values]

    def rates_of(i, step):
        if mode == "fixed":
            return config["inner_lr"]
        return rates[i][step] if mode == "per_layer_step" else rates[i]
    weights = config["step_weights"] or [0.0] * (steps - 1) + [1.0]
    loss = loop_meta_loss(twin, rates_of, data, steps, config["first_order"], LOSSES[config["loss"]], weights)
    wrt = [p for _, p in twin.named_parameters() if p.requires_grad] + (rates if mode != "fixed" else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]
    names = [n for n, p in twin.named_parameters() if p.requires_grad]
    return loss.detach(), dict(zip(names, grads)), grads[len(names):]


def assert_close(actual, expected, context):
    scale = max(expected.abs().max().item(), 1e-3)
    error = (actual - expected).abs().max().item()
    assert error <= 1e-8 * scale, f"{context}: off by {error:.3g} (scale {scale:.3g})"


OTHER_ACTIVATION = {nn.ReLU: nn.Tanh, nn.Tanh: nn.Sigmoid, nn.Sigmoid: nn.ReLU, nn.GELU: nn.ELU, nn.LeakyReLU: nn.GELU,
                    nn.ELU: nn.ReLU}


def run_engine(engine, model, config, data, rate_values, edited=False):
    """The engine's meta-loss and meta-gradients; edited: the engine is built and called on the model with another
    activation at index 1, which is then put back (the engine must see the model as it is at the measured call)."""
    if edited:
        original = model[1]
        model[1] = OTHER_ACTIVATION[type(original)]()
        try:
            maml = mamlext.BatchedMAML(model, **config, **ENGINES[engine])
            maml.meta_loss(*data)
        finally:
            model[1] = original
    else:
        maml = mamlext.BatchedMAML(model, **config, **ENGINES[engine])
    with torch.no_grad():
        for r, value in zip(maml.inner_lrs, rate_values):
            r.copy_(value)
    for p in model.parameters():
        p.grad = None
    loss = maml.meta_loss(*data)
    if loss.requires_grad:
        loss.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for n, p in model.named_parameters() if p.requires_grad}
    rate_grads = [torch.zeros_like(r) if r.grad is None else r.grad.clone() for r in maml.inner_lrs]
    for p in model.parameters():
        p.grad = None
    return loss.detach(), grads, rate_grads


@pytest.mark.parametrize("block", range(4))
def test_engines_match_the_per_task_loop_or_refuse(block):
    """Each block of CASES / 4 seeded cases: every engine that accepts the model gives the loop's meta-loss and
    meta-gradients (parameters and learned rates, float64, rel 1e-8) and leaves the model as it was."""
    accepted = {name: 0 for name in ENGINES}
    for seed in range(block, CASES, 4):
        model, config, data, rate_values, description = random_case(seed)
        want_loss, want_grads, want_rate_grads = oracle(model, config, data, rate_values)
        edited = random.Random(seed).random() < 0.15 and len(model) > 1 and type(model[1]) in OTHER_ACTIVATION
        for engine in ENGINES:
            context = f"{engine}, {description}{', edited between calls' if edited else ''}"
            if config["loss"] == "mse":  # a target without the output dimension is refused, never broadcast
                try:
                    probe = mamlext.BatchedMAML(model, **config, **ENGINES[engine])
                except ValueError:
                    probe = None  # the engine does not serve the model (checked below)
                if probe is not None:
                    with pytest.raises(ValueError, match="ys must be"):
                        probe.meta_loss(data[0], data[1][..., 0], data[2], data[3])
            before = snapshot(model)
            try:
                loss, grads, rate_grads = run_engine(engine, model, config, data, rate_values, edited)
            except ValueError as error:
                assert engine == "fused", f"{context}: refused: {error}"
                assert "layer" in str(error) or "Sequential" in str(error), f"{context}: {error}"
                assert_unchanged(model, before, context)
                continue
            accepted[engine] += 1
            assert_unchanged(model, before, context)
            assert_close(loss, want_loss, f"{context}: meta-loss")
            assert grads.keys() == want_grads.keys(), context
            for name in grads:
                assert_close(grads[name], want_grads[name], f"{context}: d/d {name}")
            if config["lr_mode"] != "fixed":
                for i, (got, want) in enumerate(zip(rate_grads, want_rate_grads)):
                    assert_close(got, want, f"{context}: d/d inner_lrs[{i}]")
    assert all(accepted.values()) or CASES < 40, f"an engine accepted no model: {accepted}"


def test_fused_engine_refuses_shared_parameters_naming_the_layer():
    square = nn.Linear(3, 3)
    reused = nn.Sequential(square, nn.Tanh(), square)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    for model, attribute in ((reused, "weight"), (tied, "weight")):
        with pytest.raises(ValueError, match=rf"layer 2 \(Linear\): its {attribute} is also layer 0's"):
            mamlext.BatchedMAML(model, backend="fused")
        assert mamlext.BatchedMAML(model).engine == "generic"  # auto routes shared parameters to the generic engine


@pytest.mark.parametrize("seed", range(40))
def test_non_finite_values_never_give_a_finite_loss(seed):
    """nan at a random place of a parameter or an input, or inf in an input: the meta-loss is nan or an error,
    never finite. inf in a parameter: finite exactly where the per-task loop's is (tanh(inf) = 1 is finite)."""
    rng = random.Random(1000 + seed)
    model, config, data, rate_values, description = random_case(1000 + seed)
    data = list(data)
    bad = rng.choice([float("nan"), float("inf"), -float("inf")])
    target = rng.choice(["parameter", "input"])
    if target == "parameter":
        p = rng.choice(list(model.parameters()))
        with torch.no_grad():
            p.view(-1)[rng.randrange(p.numel())] = bad
    else:
        x = data[rng.choice([0, 2])]
        x.view(-1)[rng.randrange(x.numel())] = bad
    finite_in_loop = bool(torch.isfinite(oracle(model, config, data, rate_values)[0]))
    if bad != bad and target == "parameter":
        assert not finite_in_loop, description  # the loop propagates nan, as PyTorch does
    for engine in ENGINES:
        try:
            loss = mamlext.BatchedMAML(model, **config, **ENGINES[engine]).meta_loss(*data)
        except ValueError as error:
            assert engine == "fused" or "non-finite" in str(error), f"{engine}, {description}: {error}"
            continue
        assert target == "parameter", f"{engine}, {description}: accepted {bad} in an input"
        assert bool(torch.isfinite(loss)) == finite_in_loop, \
            f"{engine}, {description}: {bad} in a parameter gave the loss {loss.item()} (per-task loop: " \
            f"{'finite' if finite_in_loop else 'not finite'})"
