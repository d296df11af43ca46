"""facebookresearch/higher's ``innerloop_ctx`` on mamlext: differentiable inner loops over any nn.Module with a
``torch.optim.SGD`` inner optimiser, the same API and semantics.

    with mamlext.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(loss_fn(fmodel(x_support), y_support))   # differentiable SGD step of the fast weights
        loss_fn(fmodel(x_query), y_query).backward()                # meta-gradient lands in model.parameters()

``fmodel`` runs the model with its current fast weights (``torch.func.functional_call`` on a private copy of the
module tree; an MLP that the fused MLP engine serves runs as one fused op with analytic first and second
derivatives, as mamlext.MAML's learners do). ``diffopt.step(loss)`` is torch.optim.SGD's documented update (lr,
momentum, dampening, nesterov, weight_decay, maximize, per parameter group) written with differentiable ops.
The model itself is never written to: its parameters, buffers, training flags and hooks are as they were when the
context exits, whether or not the body raised.
"""
import contextlib
import math
import numbers
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from mamlext import ops
from mamlext.maml import FusedLearner, _copy_tree
from mamlext.nn import fused_layers, run_fused

__all__ = ["DifferentiableSGD", "FunctionalModule", "innerloop_ctx", "SUPPORTED_OPTIMIZERS", "SGD_SETTINGS"]

SUPPORTED_OPTIMIZERS = (torch.optim.SGD,)
# The settings of a torch.optim.SGD parameter group that the update reads (and `override` may set).
SGD_SETTINGS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")

Override = Dict[str, Union[Sequence, Tensor, float]]
GradCallback = Callable[[List[Optional[Tensor]]], Sequence[Optional[Tensor]]]


def _check_optimizer(opt, where: str) -> None:
    if type(opt) not in SUPPORTED_OPTIMIZERS:
        supported = ", ".join(f"{c.__module__.replace('torch.optim.sgd', 'torch.optim')}.{c.__name__}"
                              for c in SUPPORTED_OPTIMIZERS)
        raise ValueError(f"{where}: the inner optimizer must be one of: {supported} (exactly that class, not a "
                         f"subclass); got {type(opt).__module__}.{type(opt).__name__}")


# ==============================================================================================================
# The patched model
# ==============================================================================================================

class FunctionalModule(FusedLearner):
    """A model run with fast weights: higher's patched module (``fmodel``).

    ``fmodel(*args, params=None, **kwargs)`` runs the model with the latest fast weights (or with ``params``, which
    then become the latest, as in higher). ``fmodel.parameters(time=k)`` are the fast weights after k updates (with
    ``track_higher_grads=False`` only the latest are kept: time 0 and -1 both give them), ``fast_params`` the
    latest, ``init_fast_params`` the first. Attributes of the model pass through (``fmodel.fc``), and a submodule's
    parameters are the latest fast weights, as in higher. ``train()``/``eval()`` set the copy's flags, not the
    model's. The model's buffers are copied (a BatchNorm's running statistics move in the copy only).
    """

    def __init__(self, model: nn.Module, device: Optional[torch.device] = None, copy_initial_weights: bool = True,
                 track_higher_grads: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"innerloop_ctx: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, FunctionalModule):
            raise ValueError("innerloop_ctx: the model is already a patched model (an fmodel); pass the original "
                             "module")
        named = list(model.named_parameters())  # unique parameters, in model.parameters()' order
        if not named:
            raise ValueError(f"innerloop_ctx: the model ({type(model).__name__}) has no parameters")
        names = tuple(name for name, _ in named)
        params = [p for _, p in named]
        slots: List[Tuple[dict, str, Tensor]] = []
        rnns: List[nn.Module] = []
        module = _copy_tree(model, slots, rnns)  # the copy's dicts are its own; the tensors are still the model's
        _isolate(module, device)
        index = {id(p): i for i, p in enumerate(params)}
        self.module = module
        self.training = model.training
        self._names = names
        self._slots = [(parameters, key, index[id(p)]) for parameters, key, p in slots]
        self._rnns = [rnn for rnn in rnns if hasattr(rnn, "_flat_weights_names")]
        # An MLP the fused engine serves runs through ops.mlp; decided once, as for a mamlext.MAML learner
        # (run_fused still checks for hooks at every call). The copy is private: its layers do not change.
        self._fused, self._signature = fused_layers(model), None
        self._fast_params: Optional[List[List[Tensor]]] = None
        self._track_higher_grads = True
        self.track_higher_grads = track_higher_grads
        if copy_initial_weights:  # leaves of their own: meta-gradients stop here (parameters(time=0) get them)
            initial = [_moved(p.detach(), device).clone().requires_grad_(p.requires_grad) for p in params]
        elif device is None:  # differentiable copies: meta-gradients flow back to the model's parameters
            initial = ops.clone_tensors(params)
        else:
            initial = [p.to(device, copy=True) for p in params]
        self.update_params(initial)

    # --- higher's fast-weight API ------------------------------------------------------------------------------

    @property
    def track_higher_grads(self) -> bool:
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"track_higher_grads must be a bool, got {type(value).__name__}")
        self._track_higher_grads = value

    @property
    def fast_params(self) -> Optional[List[Tensor]]:
        """The latest fast weights, in model.parameters()' order."""
        return None if self._fast_params is None else self._fast_params[-1]

    @fast_params.setter
    def fast_params(self, value: Sequence[Tensor]) -> None:
        """Records new fast weights: appended to the history when tracking higher gradients, else replacing it
        (higher's rule). update_params also puts them into the model copy."""
        value = list(value)
        if self._fast_params is None:
            self._fast_params = []
        if self._track_higher_grads or not self._fast_params:
            self._fast_params.append(value)
        else:
            self._fast_params[0] = value

    @property
    def init_fast_params(self) -> List[Tensor]:
        if not self._track_higher_grads:
            raise Exception("Cannot get initial parameters when not tracking higher gradients.")
        return self._fast_params[0]

    def update_params(self, params: Sequence[Tensor]) -> None:
        """Makes ``params`` (one tensor per model parameter, in model.parameters()' order) the latest fast
        weights."""
        params = list(params)
        if len(params) != len(self._names):
            raise ValueError(f"update_params: expected {len(self._names)} tensors (one per model parameter, in "
                             f"model.parameters()' order), got {len(params)}")
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"update_params: params[{i}] ({self._names[i]}) must be a tensor, got "
                                f"{type(p).__name__}")
        self.fast_params = params
        for parameters, key, i in self._slots:  # tied parameters stay tied: every slot of one index
            parameters[key] = params[i]
        for rnn in self._rnns:  # RNNs compute from their cached list of weights (a new list: the model's is shared)
            rnn._flat_weights = [getattr(rnn, name, None) for name in rnn._flat_weights_names]

    def parameters(self, recurse: bool = True, time: Optional[int] = None) -> Iterator[Tensor]:
        """The fast weights after ``time`` updates (None or -1: the latest), in model.parameters()' order."""
        if self._fast_params is None:
            raise Exception("Tried to get fast weights of a patched module which does not encapsulate fast weights.")
        time = -1 if time is None else time
        if not self._track_higher_grads and time not in (-1, 0):
            raise ValueError("The patched model is not tracking higher gradients. Only the latest parameters are "
                             "available.")
        return iter(self._fast_params[time])

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[Tuple[str, Tensor]]:
        """The latest fast weights with the model's parameter names."""
        prefix = prefix + "." if prefix else ""
        return iter([(prefix + name, p) for name, p in zip(self._names, self.fast_params)])

    # --- running the model ---------------------------------------------------------------------------------------

    def forward(self, *args, params: Optional[Sequence[Tensor]] = None, **kwargs):
        if params is not None:
            self.update_params(params)
        if self._fused is not None and len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            out = run_fused(self.module, self._fused, args[0])  # None when hooks are registered
            if out is not None:
                return out
        return torch.func.functional_call(self.module, dict(zip(self._names, self._fast_params[-1])), args, kwargs,
                                          tie_weights=False, strict=False)

    def __getitem__(self, index):
        return self.module[index]

    def __len__(self) -> int:
        return len(self.module)

    def __bool__(self) -> bool:  # not len(): an fmodel of a non-container model is truthy
        return True

    def __iter__(self):
        return iter(self.module)


def _moved(t: Tensor, device: Optional[torch.device]) -> Tensor:
    return t if device is None else t.to(device)


def _isolate(module: nn.Module, device: Optional[torch.device]) -> None:
    """Gives the copy of a module tree (mamlext.maml._copy_tree, which copies every module's dicts) buffers and
    hook tables of its own: what runs on the copy (a BatchNorm updating its statistics, a hook registered through
    fmodel) leaves the model as it was. Shared buffers stay shared."""
    buffers: Dict[int, Tensor] = {}
    for child in module.modules():
        for key, buffer in child._buffers.items():
            if buffer is not None:
                if id(buffer) not in buffers:
                    buffers[id(buffer)] = _moved(buffer.detach(), device).clone()
                child._buffers[key] = buffers[id(buffer)]
        state = child.__dict__
        for name, value in list(state.items()):
            if "hooks" in name and isinstance(value, dict):
                state[name] = value.copy()
        if isinstance(state.get("_non_persistent_buffers_set"), set):
            state["_non_persistent_buffers_set"] = set(state["_non_persistent_buffers_set"])


# ==============================================================================================================
# The differentiable optimiser
# ==============================================================================================================

def _is_zero(value) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and bool(value.detach() == 0)
    return value == 0


def _add_scaled(x: Tensor, alpha, y: Tensor) -> Tensor:
    """x + alpha * y, as torch.optim.SGD computes it (Tensor.add's alpha for a number)."""
    return x + alpha * y if isinstance(alpha, Tensor) else x.add(y, alpha=alpha)


class DifferentiableSGD:
    """torch.optim.SGD's update as a differentiable step of fast weights (higher's ``diffopt``).

    Args:
        other: the torch.optim.SGD whose parameter groups (settings and parameters) and state (momentum buffers)
            are copied at construction.
        reference_params: the model's parameters (model.parameters()): the order of the fast weights.
        fmodel: the patched model whose fast weights ``step`` reads and updates.
        device: where to put the copied state.
        override: settings to override, as in ``step``.
        grad_callback: the default ``grad_callback`` of ``step``.
        track_higher_grads: False: first order (the new fast weights and the state are detached at every step).

    ``param_groups`` are the groups' settings with ``params`` the group's current fast weights; ``state[g][i]``
    the state of the i-th parameter of group g (``momentum_buffer``), as in higher.
    """

    def __init__(self, other: torch.optim.Optimizer, reference_params, fmodel: Optional[FunctionalModule] = None,
                 device: Optional[torch.device] = None, override: Optional[Override] = None,
                 grad_callback: Optional[GradCallback] = None, track_higher_grads: bool = True):
        _check_optimizer(other, "DifferentiableSGD")
        reference_params = list(reference_params)
        index = {id(p): i for i, p in enumerate(reference_params)}
        self.param_groups: List[dict] = []
        self.state: List[Dict[int, dict]] = []
        self._group_to_param_list: List[List[int]] = []
        for g, group in enumerate(other.param_groups):
            settings = {key: (list(value) if isinstance(value, list) else value)
                        for key, value in group.items() if key != "params"}
            mapping, state = [], defaultdict(dict)
            for i, p in enumerate(group["params"]):
                if id(p) not in index:
                    raise ValueError(f"innerloop_ctx: parameter {i} of the optimizer's group {g} (shape "
                                     f"{list(p.shape)}) is not a parameter of the model")
                mapping.append(index[id(p)])
                for key, value in other.state.get(p, {}).items():  # torch's buffers, detached copies
                    if value is not None:
                        state[i][key] = _moved(value.detach(), device).clone() if isinstance(value, Tensor) \
                            else value
            settings["params"] = [None] * len(mapping)
            self.param_groups.append(settings)
            self.state.append(state)
            self._group_to_param_list.append(mapping)
        self._num_params = len(reference_params)
        self._in_groups = sorted({i for mapping in self._group_to_param_list for i in mapping})
        self._fmodel = fmodel
        self._grad_callback = grad_callback
        self._track_higher_grads = track_higher_grads
        if override is not None:
            self._apply_override(override)

    def _apply_override(self, override: Override) -> None:
        """Sets group settings: ``{name: [value]}`` (every group) or ``{name: [one value per group]}``; a value may
        be a tensor that requires grad (a learned lr). A bare number or scalar tensor stands for ``[value]``. The
        settings stay overridden for the later steps, as in higher."""
        if not isinstance(override, dict):
            raise TypeError(f"override must be a dict of setting name -> values, got {type(override).__name__}")
        groups = len(self.param_groups)
        for key, values in override.items():
            if key not in SGD_SETTINGS:
                raise ValueError(f"override: unknown setting {key!r}; torch.optim.SGD's update reads "
                                 f"{', '.join(SGD_SETTINGS)}")
            if isinstance(values, (numbers.Number, bool)) or (isinstance(values, Tensor) and values.dim() == 0):
                values = [values]
            if not isinstance(values, (list, tuple, Tensor)):
                raise TypeError(f"override[{key!r}] must be a list of values (one, or one per parameter group), got "
                                f"{type(values).__name__}")
            if len(values) not in (1, groups):
                raise ValueError(f"Mismatch between the number of override values for optimizer setting {key!r} "
                                 f"({len(values)}) and the number of parameter groups ({groups})")
            for g, group in enumerate(self.param_groups):
                value = values[0] if len(values) == 1 else values[g]
                if key in ("nesterov", "maximize"):
                    if isinstance(value, Tensor) or not isinstance(value, (bool, int)):
                        raise TypeError(f"override[{key!r}] must hold bools, got {type(value).__name__}")
                    value = bool(value)
                elif isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
                    raise TypeError(f"override[{key!r}] must hold numbers or tensors, got {type(value).__name__}")
                group[key] = value

    def step(self, loss: Tensor, params: Optional[Sequence[Tensor]] = None, override: Optional[Override] = None,
             grad_callback: Optional[GradCallback] = None) -> List[Tensor]:
        """One SGD step of the fast weights on ``loss``; returns the new fast weights (model.parameters()' order),
        which also become fmodel's latest.

        Args:
            loss: the inner loss.
            params: the weights to step from (default: fmodel's latest fast weights).
            override: group settings to override from now on (see _apply_override).
            grad_callback: applied to the list of gradients (model.parameters()' order, None where a parameter gets
                none) before the update, e.g. clipping; replaces the one given at construction.
        """
        if override is not None:
            self._apply_override(override)
        if params is None:
            if self._fmodel is None or self._fmodel.fast_params is None:
                raise ValueError("params must be passed to step when the differentiable optimizer has no patched "
                                 "model with fast weights")
            params = self._fmodel.fast_params
        params = list(params)
        if len(params) != self._num_params:
            raise ValueError(f"step: expected {self._num_params} params (one per model parameter), got {len(params)}")
        track = self._track_higher_grads
        callback = grad_callback if grad_callback is not None else self._grad_callback
        # Gradients of what the groups update; of every parameter when a callback may look at them all (higher).
        wanted = range(self._num_params) if callback is not None else self._in_groups
        targets = [i for i in wanted if params[i].requires_grad]
        grads: List[Optional[Tensor]] = [None] * self._num_params
        if targets:
            found = torch.autograd.grad(loss, [params[i] for i in targets], create_graph=track, allow_unused=True)
            for i, g in zip(targets, found):
                grads[i] = g
        if callback is not None:
            grads = list(callback(grads))
            if len(grads) != self._num_params:
                raise ValueError(f"grad_callback returned {len(grads)} gradients for {self._num_params} parameters")
        new_params = list(params)
        with contextlib.nullcontext() if track else torch.no_grad():
            for g, (group, mapping) in enumerate(zip(self.param_groups, self._group_to_param_list)):
                updated = self._update_group(g, group, [params[i] for i in mapping], [grads[i] for i in mapping])
                if not track:  # first order: the new fast weights are leaves
                    updated = [p.detach().requires_grad_(params[i].requires_grad) for p, i in zip(updated, mapping)]
                group["params"] = updated
                for i, p in zip(mapping, updated):
                    new_params[i] = p
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params

    def _update_group(self, g: int, group: dict, params: List[Tensor], grads: List[Optional[Tensor]]) -> List[Tensor]:
        """torch.optim.SGD's update of one group (torch.optim.sgd._single_tensor_sgd) with out-of-place ops; a
        parameter without a gradient is left as it is (its state too), as torch skips it."""
        lr, momentum, dampening = group["lr"], group.get("momentum", 0), group.get("dampening", 0)
        weight_decay, nesterov = group.get("weight_decay", 0), group.get("nesterov", False)
        maximize = group.get("maximize", False)
        if nesterov and (not isinstance(momentum, Tensor) and momentum <= 0
                         or not isinstance(dampening, Tensor) and dampening != 0):
            raise ValueError(f"DifferentiableSGD: group {g}: nesterov momentum needs momentum > 0 and dampening 0, got "
                             f"momentum={momentum}, dampening={dampening}")
        state = self.state[g]
        active, directions = [], []
        for i, (p, grad) in enumerate(zip(params, grads)):
            if grad is None:
                continue
            d = -grad if maximize else grad
            if not _is_zero(weight_decay):
                d = _add_scaled(d, weight_decay, p)
            if not _is_zero(momentum):
                buf = state[i].get("momentum_buffer")
                # torch's first buffer is the direction itself (a detached copy there; differentiable here)
                buf = d if buf is None else _add_scaled(buf.mul(momentum), 1 - dampening, d)
                state[i]["momentum_buffer"] = buf if self._track_higher_grads else buf.detach()
                d = _add_scaled(d, momentum, buf) if nesterov else buf
            active.append(i)
            directions.append(d)
        if not active:
            return list(params)
        stepped = _sgd([params[i] for i in active], directions, lr)
        out = list(params)
        for i, p in zip(active, stepped):
            out[i] = p
        return out


def _sgd(params: List[Tensor], directions: List[Tensor], lr) -> List[Tensor]:
    """params[i] - lr * directions[i]: one autograd node for the list (ops.sgd_update for a number, ops.task_sgd
    for a scalar tensor, which differentiates it, as mamlext.MAML steps); other rates (a tensor that broadcasts to
    every parameter of the group) with plain ops."""
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool) and math.isfinite(lr):
        return ops.sgd_update(params, directions, float(lr))
    first = directions[0]
    if isinstance(lr, Tensor) and lr.dim() == 0 and lr.is_floating_point() and all(
            d.dtype == first.dtype and d.device == first.device for d in directions):
        lr = lr.to(device=first.device, dtype=first.dtype)
        return [u.squeeze(0) for u in ops.task_sgd(params, [d.unsqueeze(0) for d in directions], lr)]
    return [p - lr * d for p, d in zip(params, directions)]


# ==============================================================================================================
# The context manager
# ==============================================================================================================

@contextlib.contextmanager
def innerloop_ctx(model: nn.Module, opt: torch.optim.Optimizer, device: Optional[torch.device] = None,
                  copy_initial_weights: bool = True, override: Optional[Override] = None,
                  track_higher_grads: bool = True):
    """higher.innerloop_ctx: yields ``(fmodel, diffopt)`` for a differentiable inner loop.

    Args:
        model: any nn.Module (an nn.Sequential MLP that the fused engine serves runs as fused ops).
        opt: a torch.optim.SGD over (some of) the model's parameters, with any parameter groups; its settings and
            momentum buffers are copied. Any other optimizer is refused.
        device: where to put the fast weights, buffers and state (default: where the model's are).
        copy_initial_weights: True (higher's default): the first fast weights are detached copies, so
            meta-gradients reach ``fmodel.parameters(time=0)``, not the model; False: differentiable copies, so
            ``loss.backward()`` puts meta-gradients in ``model.parameters()`` (MAML).
        override: group settings to override, e.g. ``{"lr": [learned_lr]}`` (see DifferentiableSGD.step).
        track_higher_grads: False: first order, and only the latest fast weights are kept.

    The model is left as it was (parameters, buffers, training flags, hooks): nothing here writes to it.
    """
    _check_optimizer(opt, "innerloop_ctx")
    fmodel = FunctionalModule(model, device=device, copy_initial_weights=copy_initial_weights,
                              track_higher_grads=track_higher_grads)
    diffopt = DifferentiableSGD(opt, model.parameters(), fmodel=fmodel, device=device, override=override,
                                track_higher_grads=track_higher_grads)
    yield fmodel, diffopt
