"""A drop-in replacement for learn2learn 0.2's ``l2l.algorithms.MAML``. One task at a time, as learn2learn: on an
MLP that the fused engine serves, a learner's forward is one fused op with analytic first and second derivatives
(mamlext.nn); its update is one multi-tensor add (a tensor rate goes through the ``task_sgd`` op, which
differentiates it). maml.batched() gives the engine that runs all tasks of a meta-batch at once (BatchedMAML).

    maml = mamlext.MAML(model, lr=0.01)          # was: l2l.algorithms.MAML(model, lr=0.01)
    learner = maml.clone()
    learner.adapt(loss_fn(learner(x_support), y_support))
    loss_fn(learner(x_query), y_query).backward()  # meta-gradient lands in model.parameters()
"""
import math
import numbers
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from mamlext import ops
from mamlext.batched import BatchedMAML
from mamlext.engines.generic import LossFn
from mamlext.engines.mlp_spec import mlp_signature
from mamlext.nn import FusedLayers, fused_layers, parameter_slots, run_fused


def refresh_flat_weights(module: nn.Module) -> None:
    """RNNs cache their weights in a flat list (learn2learn issue 139): rebuilt from the tensors the module holds
    now. learn2learn calls module._apply(lambda x: x) for this, which on an RNN ends in _init_flat_weights; this
    calls that directly (on non-leaf tensors _apply also sets .data to itself and reads .grad, which warns)."""
    if isinstance(module, nn.RNNBase) and hasattr(module, "_init_flat_weights"):
        module._init_flat_weights()
    else:
        module._apply(lambda x: x)


def clone_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are differentiable clones of the originals (gradients flow back to
    them). Tied parameters stay tied; buffers are shared with the original, as in learn2learn."""
    slots: List[Tuple[dict, str, Tensor]] = []
    rnns: List[nn.Module] = []
    clone = _copy_tree(module, slots, rnns)
    unique = list({id(param): param for _, _, param in slots}.values())
    # Every parameter cloned at once: one autograd node for the model, not one per tensor.
    clones = dict(zip(map(id, unique), ops.clone_tensors(unique)))
    for parameters, key, param in slots:
        parameters[key] = clones[id(param)]
    for rnn in rnns:
        refresh_flat_weights(rnn)
    return clone


def _copy_tree(module: nn.Module, slots: List[Tuple[dict, str, Tensor]], rnns: List[nn.Module]) -> nn.Module:
    """A copy of the module tree that shares the original's parameters and buffers. slots gets (the copy's
    _parameters, key, parameter) of each parameter, rnns the copies that cache flat weights."""
    # The attributes go straight into the copy's __dict__: nn.Module.__setattr__'s checks cost more than the rest
    # of a small model's clone.
    state = module.__dict__.copy()
    parameters = state["_parameters"] = module._parameters.copy()
    state["_buffers"] = module._buffers.copy()
    modules = state["_modules"] = module._modules.copy()
    slots.extend((parameters, key, param) for key, param in parameters.items() if param is not None)
    for key, child in modules.items():
        if child is not None:
            modules[key] = _copy_tree(child, slots, rnns)
    clone = module.__new__(type(module))
    object.__setattr__(clone, "__dict__", state)
    if hasattr(type(clone), "flatten_parameters"):  # the type's attribute: no __getattr__ miss
        rnns.append(clone)
    return clone


def _replace_parameters(module: nn.Module, updated: Dict[int, Tensor]) -> None:
    """Puts the updated tensors in place of the parameters they replace, everywhere in the module tree."""
    for child in module.modules():
        for key, param in child._parameters.items():
            if param is not None and id(param) in updated:
                child._parameters[key] = updated[id(param)]
        if hasattr(type(child), "flatten_parameters"):
            refresh_flat_weights(child)


class FusedLearner(nn.Module):
    """What mamlext's learners (MAML, MetaSGD, innerloop_ctx's fmodel) share: the wrapped ``module``, its forward as one
    fused op where the fused MLP engine serves it (``_fused``, re-derived when the model changed: ``_signature``; a
    learner's is None, it keeps what clone() derived), and attribute pass-through to the module."""

    _fused: Optional[FusedLayers]
    _signature: Optional[tuple]

    def _refresh_fused(self) -> None:
        """Re-derives _fused when the module changed since it was derived (a layer replaced or added, a dtype
        changed, a hook or parametrization registered): the module is computed as it is now."""
        signature = mlp_signature(self.module)
        if signature != self._signature:
            self._fused, self._signature = fused_layers(self.module), signature

    def __getattr__(self, name: str):
        """The module's attributes, as learn2learn's learners pass them through (``learner.head``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if modules is None or "module" not in modules:
                raise
            return getattr(modules["module"], name)

    def forward(self, *args, **kwargs):
        if self._signature is not None:
            self._refresh_fused()
        if self._fused is not None and len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            out = run_fused(self.module, self._fused, args[0])
            if out is not None:
                return out
        return self.module(*args, **kwargs)

    def _name_of(self, param: Tensor) -> str:
        return next(name for name, p in self.module.named_parameters() if p is param)


class MAML(FusedLearner):
    """Model-Agnostic Meta-Learning with learn2learn 0.2's interface (``clone``, ``adapt``, ``module``, ``lr``).

    Args:
        model: the module to meta-learn.
        lr: the inner-loop step size: a float, or a scalar tensor (a learnable rate).
        first_order: drop second-order terms (FOMAML).
        allow_unused: allow parameters that the adaptation loss does not use (they are not updated).
            Defaults to ``allow_nograd``.
        allow_nograd: allow parameters with ``requires_grad=False`` (they are not updated).

    On a model that the fused MLP engine serves (an nn.Sequential of nn.Linear layers with one activation kind
    between them, see mamlext.BatchedMAML), a learner's forward is one fused op with analytic first and second
    derivatives (mamlext.ops.mlp); every other model, and a model with forward hooks, runs its own forward.
    """

    def __init__(self, model: nn.Module, lr, first_order: bool = False, allow_unused: Optional[bool] = None,
                 allow_nograd: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAML: model must be an nn.Module, got {type(model).__name__}")
        if next(model.parameters(), None) is None:
            raise ValueError(f"MAML: the model ({type(model).__name__}) has no parameters to meta-learn")
        if isinstance(lr, Tensor):
            if lr.dim() != 0 or not lr.is_floating_point():
                raise ValueError(f"MAML: lr must be a float or a floating-point scalar tensor, got a {lr.dtype} tensor "
                                 f"of shape {list(lr.shape)}")
        elif isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr):
            raise ValueError(f"MAML: lr must be a finite float or a scalar tensor, got {lr!r}")
        self.module = model
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused
        # A model the fused MLP engine serves runs as one fused op with analytic first and second derivatives;
        # re-derived by clone() and forward() when the model changed (mlp_signature).
        # (A learner's _signature is None: it keeps what clone() derived.)
        self._fused: Optional[FusedLayers] = None
        self._signature: Optional[tuple] = ()
        self._refresh_fused()

    def adapt(self, loss: Tensor, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> None:
        """One inner SGD step on ``loss``, in place: ``self.module`` becomes the adapted module."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        second_order = not first_order

        # A fused model's parameters sit in known slots: no walk over the module tree to find or replace them.
        slots = parameter_slots(self.module, self._fused) if self._fused is not None else None
        params = [slot[key] for slot, key in slots] if slots is not None else list(self.module.parameters())
        diff_params = [p for p in params if p.requires_grad]
        if len(diff_params) != len(params) and not allow_nograd:
            frozen = next(p for p in params if not p.requires_grad)
            raise RuntimeError(f"MAML.adapt: parameter '{self._name_of(frozen)}' does not require grad; "
                               "pass allow_nograd=True to leave such parameters unadapted")
        gradients = torch.autograd.grad(loss, diff_params, retain_graph=second_order, create_graph=second_order,
                                        allow_unused=True)
        to_update: List[Tensor] = []
        steps: List[Tensor] = []
        for p, g in zip(diff_params, gradients):
            if g is not None:
                to_update.append(p)
                steps.append(g)
            elif not allow_unused:
                raise RuntimeError(f"MAML.adapt: parameter '{self._name_of(p)}' was not used to compute the loss; "
                                   "pass allow_unused=True to leave unused parameters unadapted")
        if not to_update:
            return
        new_params = self._sgd(to_update, steps)
        if slots is not None and len(new_params) == len(slots):  # every parameter adapted (the common case)
            for (slot, key), new in zip(slots, new_params):
                slot[key] = new
            return
        updated = dict(zip(map(id, to_update), new_params))
        if slots is None:
            _replace_parameters(self.module, updated)
            return
        for slot, key in slots:
            slot[key] = updated.get(id(slot[key]), slot[key])

    def _sgd(self, params: List[Tensor], grads: List[Tensor]) -> List[Tensor]:
        """params - lr * grads. One task has nothing to batch over tasks: a float rate takes sgd_update (one
        autograd node for every parameter); a tensor rate goes through task_sgd, which differentiates it."""
        lr = self.lr
        if not isinstance(lr, Tensor):
            return ops.sgd_update(params, grads, lr)
        lr = lr.to(device=grads[0].device, dtype=grads[0].dtype)
        return [u.squeeze(0) for u in ops.task_sgd(params, [g.unsqueeze(0) for g in grads], lr)]

    def batched(self, inner_steps: int = 1, loss: Union[str, LossFn] = "mse", **options) -> BatchedMAML:
        """The task-batched engine for this learner's model, rate and first-order flag: the loop

            for xs, ys, xq, yq in tasks:
                learner = maml.clone()
                for _ in range(inner_steps):
                    learner.adapt(loss_fn(learner(xs), ys))
                (loss_fn(learner(xq), yq) / len(tasks)).backward()

        becomes ``maml.batched(inner_steps, loss).meta_loss(*mamlext.data.stack_tasks(tasks)).backward()``, with the
        same meta-gradient (frozen parameters, as with allow_nograd=True, are not adapted). loss: "mse"
        (F.mse_loss), "ce" (F.cross_entropy) or a callable loss_fn(output, target); options: the other arguments of
        BatchedMAML (backend, memory, lr_mode, step_weights, ...)."""
        if isinstance(self.lr, Tensor):
            raise ValueError("MAML.batched: a tensor lr (a learned step size) has no BatchedMAML counterpart; "
                             "BatchedMAML learns rates with lr_mode='per_layer_step' or 'per_param'")
        if not self.allow_nograd:
            frozen = next((p for p in self.module.parameters() if not p.requires_grad), None)
            if frozen is not None:
                raise RuntimeError(f"MAML.batched: parameter '{self._name_of(frozen)}' does not require grad; "
                                   "pass allow_nograd=True to leave such parameters unadapted")
        return BatchedMAML(self.module, inner_lr=self.lr, inner_steps=inner_steps, first_order=self.first_order,
                           loss=loss, **options)

    def clone(self, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> "MAML":
        """A copy whose adaptation does not touch this learner, but whose gradients flow back to it."""
        # __init__'s checks hold for a clone; its attributes go straight into __dict__ (see clone_module)
        if self._signature is not None:
            self._refresh_fused()
        learner = MAML.__new__(MAML)
        nn.Module.__init__(learner)
        if isinstance(self.lr, nn.Parameter):  # a learned rate: a parameter of the learner too, as in learn2learn
            learner._parameters["lr"] = self.lr
        else:
            vars(learner)["lr"] = self.lr
        vars(learner).update(_fused=self._fused, _signature=None,
                             first_order=self.first_order if first_order is None else first_order,
                             allow_unused=self.allow_unused if allow_unused is None else allow_unused,
                             allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd)
        learner._modules["module"] = clone_module(self.module)
        return learner
