"""learn2learn 0.2's module utilities (``l2l.clone_module``, ``l2l.update_module``, ``l2l.detach_module``), for code
that writes its own inner loop:

    clone = mamlext.utils.clone_module(model)                  # differentiable copy: gradients flow back to model
    grads = torch.autograd.grad(loss_fn(clone(x), y), clone.parameters(), create_graph=True)
    mamlext.utils.update_module(clone, updates=[-lr * g for g in grads])   # p <- p + u, differentiably
    mamlext.utils.detach_module(clone, keep_requires_grad=True)            # cut it off the graph, in place

The parameters of a module are cloned, and updated, through one autograd node for the whole model
(ops.clone_tensors, ops.sgd_update), as mamlext.MAML's learners are.
"""
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from mamlext import ops
from mamlext.maml import _copy_tree, refresh_flat_weights

__all__ = ["clone_module", "detach_module", "update_module"]


def clone_module(module: nn.Module, memo: Optional[dict] = None) -> nn.Module:
    """A copy of ``module`` whose parameters are ``.clone()``s of the originals, so that the copy's computations
    differentiate back to them (learn2learn.utils.clone_module).

    Submodules are copied recursively (each place a submodule sits gets its own copy, as in learn2learn); a
    parameter held in several places (tied, or shared between submodules) is cloned once and stays shared in the
    copy. Buffers are shared with the original, except those that require grad (e.g. a buffer an update_module
    made from a parameter's graph), which are cloned too. RNNs get their flat weights rebuilt from the clones.
    Anything that is not an nn.Module is returned as it is.

    memo: a dict from original tensors to their clones, filled in here; pass the same dict to clone several modules
    that share parameters so that their copies share the same clones.
    """
    if not isinstance(module, nn.Module):
        return module
    if memo is None:
        memo = {}
    slots: List[Tuple[dict, str, Tensor]] = []
    rnns: List[nn.Module] = []
    clone = _copy_tree(module, slots, rnns)  # shares the original's tensors, in dictionaries of its own
    # The parameters not cloned yet, each once, through one autograd node (mamlext.MAML's learners' clone).
    fresh = list({id(p): p for _, _, p in slots if p not in memo}.values())
    memo.update(zip(fresh, ops.clone_tensors(fresh)))
    for parameters, key, param in slots:
        parameters[key] = memo[param]
    for copy in clone.modules():
        buffers = copy._buffers
        for key, buffer in buffers.items():
            if buffer is not None and buffer.requires_grad:
                if buffer not in memo:
                    memo[buffer] = buffer.clone()
                buffers[key] = memo[buffer]
    for rnn in rnns:
        refresh_flat_weights(rnn)
    return clone


def update_module(module: nn.Module, updates: Optional[Sequence[Tensor]] = None,
                  memo: Optional[dict] = None) -> nn.Module:
    """Replaces each parameter p of ``module`` by ``p + u``, differentiably, in place (learn2learn.update_module):
    u is ``updates[i]`` for the i-th of ``module.parameters()``, or else the tensor in ``p.update`` (buffers with
    an ``update`` attribute are updated the same way). A parameter held in several places is updated once and
    stays shared; the ``update`` attributes are cleared. Returns the module.

    updates: a list with one update (or None, for no update) per parameter; as in learn2learn, a list of another
        length warns and updates the parameters it reaches.
    memo: a dict from original tensors to their updated ones, filled in here.
    """
    if memo is None:
        memo = {}
    if updates is not None:
        params = list(module.parameters())
        updates = list(updates)
        if len(updates) != len(params):
            warnings.warn(f"update_module: the module has {len(params)} parameters but updates holds "
                          f"{len(updates)}; updating the first {min(len(params), len(updates))}", stacklevel=2)
        for p, u in zip(params, updates):
            p.update = u
    # Every place a tensor with an update sits, the tensors in order, and the modules that cache flat weights.
    places: List[Tuple[dict, str, Tensor]] = []
    pending: Dict[int, Tensor] = {}
    rnns: List[nn.Module] = []
    _collect(module, memo, places, pending, rnns)
    if pending:
        memo.update(zip(pending.values(), _add_updates(module, list(pending.values()))))
    for slots, key, tensor in places:
        slots[key] = memo[tensor]
    for rnn in rnns:
        refresh_flat_weights(rnn)
    return module


def _collect(module: nn.Module, memo: dict, places: list, pending: Dict[int, Tensor], rnns: list) -> None:
    for slots in (module._parameters, module._buffers):
        for key, tensor in slots.items():
            if tensor is None:
                continue
            if tensor in memo:
                places.append((slots, key, tensor))
            elif getattr(tensor, "update", None) is not None:
                places.append((slots, key, tensor))
                pending[id(tensor)] = tensor
    for child in module._modules.values():
        if child is not None:
            _collect(child, memo, places, pending, rnns)
    if hasattr(type(module), "flatten_parameters"):
        rnns.append(module)


def _add_updates(module: nn.Module, tensors: List[Tensor]) -> List[Tensor]:
    """tensor + tensor.update for each, clearing the attribute: one ops.sgd_update call when every update is a
    floating tensor of its tensor's shape, dtype and device (the common case), ``t + u`` (which broadcasts) else."""
    updates = [t.update for t in tensors]
    for t in tensors:
        t.update = None
    same = all(isinstance(u, Tensor) and u.shape == t.shape and u.dtype == t.dtype and u.device == t.device
               and t.is_floating_point() for t, u in zip(tensors, updates))
    if same:
        return ops.sgd_update(tensors, updates, -1.0)  # p - (-1) * u: exactly p + u
    out = []
    for t, u in zip(tensors, updates):
        new = t + u
        if new.shape != t.shape:
            raise ValueError(f"update_module: the update of '{_name_of(module, t)}' has shape "
                             f"{list(u.shape)}, which turns the tensor's shape {list(t.shape)} into "
                             f"{list(new.shape)}")
        out.append(new)
    return out


def _name_of(module: nn.Module, tensor: Tensor) -> str:
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return next((name for name, t in named if t is tensor), "?")


def detach_module(module: nn.Module, keep_requires_grad: bool = False) -> None:
    """Cuts the parameters, and the buffers that require grad, of ``module`` off their autograd graph, in place
    (learn2learn.detach_module): each is detached and, unless ``keep_requires_grad``, stops requiring grad
    (with it, what required grad still does, as a new leaf). Tensors keep their identity, so shared parameters stay
    shared; a tensor that is an autograd view (which cannot be detached in place, e.g. an adapted learner's) is
    replaced by its detached copy everywhere it sits. Anything that is not an nn.Module is left alone."""
    if not isinstance(module, nn.Module):
        return
    _detach(module, keep_requires_grad, {})


def _detach(module: nn.Module, keep_requires_grad: bool, views: Dict[int, Tuple[Tensor, Tensor]]) -> None:
    for slots, buffers in ((module._parameters, False), (module._buffers, True)):
        for key, tensor in slots.items():
            if tensor is None or (buffers and not tensor.requires_grad):
                continue
            if id(tensor) in views:
                slots[key] = views[id(tensor)][1]
                continue
            requires_grad = tensor.requires_grad
            if tensor._is_view():
                detached = tensor.detach()
                views[id(tensor)] = (tensor, detached)  # (the original kept alive: its id stays its own)
                slots[key] = detached
            else:
                detached = tensor.detach_()
            if keep_requires_grad and requires_grad:
                detached.requires_grad_()
    for child in module._modules.values():
        if child is not None:
            _detach(child, keep_requires_grad, views)
