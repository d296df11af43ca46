"""A drop-in replacement for learn2learn 0.2's ``l2l.algorithms.MAML``, whose parameter update runs through the
fused ``task_sgd`` op.

    maml = mamlext.MAML(model, lr=0.01)          # was: l2l.algorithms.MAML(model, lr=0.01)
    learner = maml.clone()
    learner.adapt(loss_fn(learner(x_support), y_support))
    loss_fn(learner(x_query), y_query).backward()  # meta-gradient lands in model.parameters()
"""
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from mamlext import ops


def clone_module(module: nn.Module, memo: Optional[Dict[int, Tensor]] = None) -> nn.Module:
    """A copy of ``module`` whose parameters are differentiable clones of the originals (gradients flow back to
    them). Tied parameters stay tied; buffers are shared with the original, as in learn2learn."""
    memo = {} if memo is None else memo
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
        if child is not None:
            clone._modules[key] = clone_module(child, memo)
    if hasattr(clone, "flatten_parameters"):  # RNNs cache flat weights
        clone = clone._apply(lambda x: x)
    return clone


def _replace_parameters(module: nn.Module, updated: Dict[int, Tensor]) -> None:
    """Puts the updated tensors in place of the parameters they replace, everywhere in the module tree."""
    for child in module.modules():
        for key, param in child._parameters.items():
            if param is not None and id(param) in updated:
                child._parameters[key] = updated[id(param)]
    for child in module.modules():
        if hasattr(child, "flatten_parameters"):
            child._apply(lambda x: x)


class MAML(nn.Module):
    """Model-Agnostic Meta-Learning with learn2learn 0.2's interface (``clone``, ``adapt``, ``module``, ``lr``).

    Args:
        model: the module to meta-learn.
        lr: the inner-loop step size: a float, or a scalar tensor (a learnable rate).
        first_order: drop second-order terms (FOMAML).
        allow_unused: allow parameters that the adaptation loss does not use (they are not updated).
            Defaults to ``allow_nograd``.
        allow_nograd: allow parameters with ``requires_grad=False`` (they are not updated).
    """

    def __init__(self, model: nn.Module, lr, first_order: bool = False, allow_unused: Optional[bool] = None,
                 allow_nograd: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAML: model must be an nn.Module, got {type(model).__name__}")
        if next(model.parameters(), None) is None:
            raise ValueError(f"MAML: the model ({type(model).__name__}) has no parameters to meta-learn")
        if isinstance(lr, Tensor) and lr.dim() != 0:
            raise ValueError(f"MAML: lr must be a float or a scalar tensor, got a tensor of shape {list(lr.shape)}")
        self.module = model
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _parameter_names(self) -> Dict[int, str]:
        return {id(p): name for name, p in self.module.named_parameters()}

    def adapt(self, loss: Tensor, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> None:
        """One inner SGD step on ``loss``, in place: ``self.module`` becomes the adapted module."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        second_order = not first_order
        names = self._parameter_names()

        params = list(self.module.parameters())
        frozen = [p for p in params if not p.requires_grad]
        if frozen and not allow_nograd:
            raise RuntimeError(f"MAML.adapt: parameter '{names[id(frozen[0])]}' does not require grad; "
                               "pass allow_nograd=True to leave such parameters unadapted")
        diff_params = [p for p in params if p.requires_grad]
        gradients = torch.autograd.grad(loss, diff_params, retain_graph=second_order, create_graph=second_order,
                                        allow_unused=True)
        unused = [p for p, g in zip(diff_params, gradients) if g is None]
        if unused and not allow_unused:
            raise RuntimeError(f"MAML.adapt: parameter '{names[id(unused[0])]}' was not used to compute the loss; "
                               "pass allow_unused=True to leave unused parameters unadapted")

        to_update: List[Tensor] = [p for p, g in zip(diff_params, gradients) if g is not None]
        step = [g.unsqueeze(0) for g in gradients if g is not None]  # one task: T = 1
        lr = self.lr
        if isinstance(lr, Tensor):
            lr = lr.to(device=step[0].device, dtype=step[0].dtype) if step else lr
        updated = ops.task_sgd(to_update, step, lr) if to_update else []
        _replace_parameters(self.module, {id(p): u.squeeze(0) for p, u in zip(to_update, updated)})

    def clone(self, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> "MAML":
        """A copy whose adaptation does not touch this learner, but whose gradients flow back to it."""
        return MAML(clone_module(self.module), lr=self.lr,
                    first_order=self.first_order if first_order is None else first_order,
                    allow_unused=self.allow_unused if allow_unused is None else allow_unused,
                    allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd)
