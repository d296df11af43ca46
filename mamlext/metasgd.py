"""A drop-in replacement for learn2learn 0.2's ``l2l.algorithms.MetaSGD`` (Li et al. 2017, "Meta-SGD: Learning to
Learn Quickly for Few-Shot Learning"): MAML whose inner step size is learned per parameter element.

    meta = mamlext.MetaSGD(model, lr=0.01)        # was: l2l.algorithms.MetaSGD(model, lr=0.01)
    opt = torch.optim.Adam(meta.parameters())     # the model's parameters and the rates (meta.lrs)
    learner = meta.clone()
    learner.adapt(loss_fn(learner(x_support), y_support))   # p <- p - lr_p * grad_p, elementwise
    loss_fn(learner(x_query), y_query).backward()            # meta-gradients reach the model and the rates

It runs on mamlext.MAML's machinery: a learner's module is maml.clone_module's differentiable copy; on an MLP that
the fused engine serves its forward is one fused op (mamlext.nn), other models run their own forward; the update of
all parameters is one ops.task_sgd call with per-element tensor rates, which differentiates params, gradients and
rates twice over.
"""
import math
import numbers
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from mamlext import ops
from mamlext.maml import FusedLearner, _replace_parameters, clone_module
from mamlext.nn import FusedLayers, parameter_slots


class MetaSGD(FusedLearner):
    """Meta-SGD with learn2learn 0.2's interface (``clone``, ``adapt``, ``module``, ``lrs``, ``first_order``).

    Args:
        model: the module to meta-learn.
        lr: the initial value of every per-element rate (a finite float; a scalar tensor gives its value).
            Unused when ``lrs`` is given.
        first_order: drop second-order terms (the rates still get their first-order meta-gradient).
        lrs: the rates themselves, overriding ``lr``: one tensor per parameter of ``model`` (in
            ``model.parameters()`` order), of that parameter's shape (per-element rates) or a scalar (one rate for
            the tensor). An nn.ParameterList, or a sequence of nn.Parameters, is registered, so that
            ``parameters()`` includes it (learn2learn registers only an nn.ParameterList); a sequence holding
            other tensors (e.g. a hypernetwork's output) is kept as a plain list, as learn2learn does
            (not registered: ``.to()`` and ``state_dict()`` do not see it).

    ``parameters()`` yields the model's parameters, then the rates. ``clone()`` gives a learner whose module is a
    differentiable copy of the model (parameters cloned, buffers shared, tied parameters kept tied) and whose
    ``lrs`` are differentiable copies of the rates (a plain list); adapting it leaves this object unchanged, and
    the query loss's backward reaches the model's parameters and the rates. Attributes the MetaSGD lacks are looked
    up on the module (``learner.head``), as learn2learn's learners do.
    """

    def __init__(self, model: nn.Module, lr=1.0, first_order: bool = False,
                 lrs: Optional[Sequence[Tensor]] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MetaSGD: model must be an nn.Module, got {type(model).__name__}")
        params = list(model.parameters())
        if not params:
            raise ValueError(f"MetaSGD: the model ({type(model).__name__}) has no parameters to meta-learn")
        self.module = model
        self.lrs = _rates(params, lr) if lrs is None else _given_rates(params, lrs)
        self.first_order = first_order
        # a model the fused MLP engine serves runs as one fused op (FusedLearner)
        self._fused: Optional[FusedLayers] = None
        self._signature: Optional[tuple] = ()
        self._refresh_fused()

    def clone(self, first_order: Optional[bool] = None) -> "MetaSGD":
        """A learner whose adaptation does not touch this object, but whose gradients flow back to its parameters
        and rates. first_order: the learner's setting (default: this object's). (learn2learn 0.2's
        MetaSGD.clone takes no argument; this one is MAML.clone's.)"""
        if self._signature is not None:
            self._refresh_fused()
        learner = MetaSGD.__new__(MetaSGD)
        nn.Module.__init__(learner)
        # __init__'s checks hold for a clone; its attributes go straight into __dict__ (as MAML.clone). The rates
        # are copied through one autograd node, as the parameters are (clone_module).
        vars(learner).update(lrs=ops.clone_tensors(list(self.lrs)), _fused=self._fused, _signature=None,
                             first_order=self.first_order if first_order is None else first_order)
        learner._modules["module"] = clone_module(self.module)
        return learner

    def adapt(self, loss: Tensor, first_order: Optional[bool] = None) -> None:
        """One inner Meta-SGD step on ``loss``, in place: p <- p - lr_p * dloss/dp for every parameter p of
        ``self.module`` (elementwise), differentiably (through the gradients too, unless first-order)."""
        first_order = self.first_order if first_order is None else first_order
        second_order = not first_order
        if not isinstance(loss, Tensor):
            raise TypeError(f"MetaSGD.adapt: loss must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"MetaSGD.adapt: loss must be a scalar tensor, got shape {list(loss.shape)}")
        lrs = list(self.lrs)
        # A fused model's parameters sit in known slots, in model.parameters() order: no walk over the tree.
        slots = parameter_slots(self.module, self._fused) if self._fused is not None else None
        if slots is not None and len(slots) != len(lrs):
            slots = None  # (a parameter registered outside the layers: take the general path, which names it)
        params = [slot[key] for slot, key in slots] if slots is not None else list(self.module.parameters())
        if len(params) != len(lrs):
            raise ValueError(f"MetaSGD.adapt: the module has {len(params)} parameters but lrs holds {len(lrs)} "
                             "rates (one per parameter, in module.parameters() order); was the module changed "
                             "after the MetaSGD was made?")
        frozen = next((p for p in params if not p.requires_grad), None)
        if frozen is not None:
            raise RuntimeError(f"MetaSGD.adapt: parameter '{self._name_of(frozen)}' does not require grad; "
                               "Meta-SGD adapts every parameter of the module")
        if not loss.requires_grad:
            raise ValueError("MetaSGD.adapt: loss does not depend on the learner's parameters (it does not require "
                             "grad); compute it from the learner's output")
        grads = torch.autograd.grad(loss, params, retain_graph=second_order, create_graph=second_order,
                                    allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError("MetaSGD.adapt: loss does not depend on any parameter of the learner's module; "
                             "compute it from the learner's output (learner(x), not the original model's)")
        unused = next((p for p, g in zip(params, grads) if g is None), None)
        if unused is not None:
            raise RuntimeError(f"MetaSGD.adapt: parameter '{self._name_of(unused)}' was not used to compute the "
                               "loss; Meta-SGD adapts every parameter of the module")
        new_params = _meta_sgd_step(params, grads, lrs)
        if slots is not None:
            for (slot, key), new in zip(slots, new_params):
                slot[key] = new
        else:
            _replace_parameters(self.module, dict(zip(map(id, params), new_params)))


def _meta_sgd_step(params: List[Tensor], grads: Sequence[Tensor], lrs: List[Tensor]) -> List[Tensor]:
    """params[i] - lrs[i] * grads[i] through one ops.task_sgd call (one task: a leading task dimension of 1), which
    differentiates params, grads and the rates."""
    g0 = grads[0]
    rates = [r.to(dtype=g0.dtype, device=g0.device) for r in lrs]
    return [u.squeeze(0) for u in ops.task_sgd(params, [g.unsqueeze(0) for g in grads], rates)]


def _rates(params: List[Tensor], lr) -> nn.ParameterList:
    """learn2learn's default rates: one nn.Parameter per parameter, of its shape, filled with lr."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"MetaSGD: lr must be a finite float or a floating-point scalar tensor, got a "
                             f"{lr.dtype} tensor of shape {list(lr.shape)}")
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr):
        raise ValueError(f"MetaSGD: lr must be a finite number (the rates' initial value), got {lr!r}")
    return nn.ParameterList([nn.Parameter(torch.full_like(p, float(lr), memory_format=torch.contiguous_format)
                                          .detach()) for p in params])


def _given_rates(params: List[Tensor], lrs) -> Sequence[Tensor]:
    """The lrs argument, checked against the model's parameters; registered when it holds nn.Parameters."""
    if isinstance(lrs, Tensor) or not isinstance(lrs, (nn.ParameterList, list, tuple)):
        raise TypeError(f"MetaSGD: lrs must be a list of tensors (one per parameter of the model), got "
                        f"{type(lrs).__name__}")
    lrs_list = list(lrs)
    if len(lrs_list) != len(params):
        raise ValueError(f"MetaSGD: lrs holds {len(lrs_list)} tensors but the model has {len(params)} parameters "
                         "(one rate tensor per parameter, in model.parameters() order)")
    for i, (r, p) in enumerate(zip(lrs_list, params)):
        if not isinstance(r, Tensor):
            raise TypeError(f"MetaSGD: lrs[{i}] must be a tensor, got {type(r).__name__}")
        if not r.is_floating_point():
            raise ValueError(f"MetaSGD: lrs[{i}] must be a floating-point tensor, got {r.dtype}")
        if r.dim() != 0 and r.shape != p.shape:
            raise ValueError(f"MetaSGD: lrs[{i}] has shape {list(r.shape)} but parameter {i} has shape "
                             f"{list(p.shape)}; a rate is of its parameter's shape, or a scalar")
        if r.device.type == "cpu" and not bool(torch.isfinite(r.detach()).all()):
            raise ValueError(f"MetaSGD: lrs[{i}] must be finite")
    if isinstance(lrs, nn.ParameterList):
        return lrs
    if all(isinstance(r, nn.Parameter) for r in lrs_list):
        return nn.ParameterList(lrs_list)  # the same Parameter objects, registered
    return lrs_list
