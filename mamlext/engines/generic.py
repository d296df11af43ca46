"""The generic engine: task-batched MAML for any nn.Module, through torch.func.

All T tasks of a meta-batch run together: ``torch.func.vmap`` over tasks of ``functional_call(model, θ_t, x_t)``
(PyTorch's batching rules turn a convolution with per-task weights into one grouped convolution), with the inner
SGD update of every task and parameter in one ``ops.task_sgd`` call. Two ways to the exact meta-gradient:

- ``memory="graph"``: autograd differentiates through the unrolled inner loop (``vmap(grad)`` inside an ordinary
  autograd graph). Fastest for few steps; the graph holds every step's activations.
- ``memory="low"``: the inner loop runs without a graph and keeps only the per-step parameters θ_k; the
  meta-gradient comes from the reverse recursion v_k = v_{k+1} - H(θ_k)(α_k ⊙ v_{k+1}) (+ w_k ∇L_query(θ_k) for a
  multi-step loss), with each Hessian-vector product by forward-over-reverse differentiation (``jvp`` of ``grad``)
  that recomputes the activations, and the combine step in the fused ``ops.maml_reverse_step``. The activations of
  only one step are alive at a time, so memory does not grow with the number of inner steps beyond the θ_k.

Normalization layers: BatchNorm and InstanceNorm normalize every forward (inner steps and query) with the
statistics of the task's own data, as the MAML paper does, and never read or update running statistics (in eval
mode the running statistics are used, read-only). ``torch.func.vmap`` differentiates the fused kernels of
``F.batch_norm``, ``F.instance_norm`` and ``F.layer_norm`` (with an affine weight) wrongly twice (their
double-backward batching rules; functorch issue 534; measured here: 1e-2 to 10 relative error in the
meta-gradient, while differentiating them once under vmap is exact), so in the forwards that are differentiated
twice — the support gradients of second-order MAML — those functionals are replaced by the same normalization
composed from primitive ops, which vmap differentiates exactly; every other forward keeps the native kernels,
several times faster. tests/test_layer_scan.py checks torch.nn's layers for this, in every engine mode. Modules
that change their buffers in the forward in another way, and layers vmap cannot batch, raise an error naming the
module on the first call.
"""
import importlib
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from mamlext import ops
from mamlext._checks import check_class_indices
from mamlext.engines.guard import ModelGuard
from mamlext.rates import InnerRates, rate_times

LossFn = Callable[[Tensor, Tensor], Tensor]


def _mse(output: Tensor, target: Tensor) -> Tensor:
    """F.mse_loss's value, from primitive ops: forward-over-reverse differentiation through F.mse_loss itself fails
    in PyTorch ("ZeroTensors are immutable"), and memory="low" needs it."""
    return (output - target).square().mean()


BUILTIN_LOSSES: Dict[str, LossFn] = {"mse": _mse, "ce": F.cross_entropy}
MEMORY_MODES = ("graph", "low")


def _scale_shift(x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Optional[Tensor], bias: Optional[Tensor],
                 affine_shape: Sequence[int]) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, with x - mean formed first as the native kernels do, so that
    a constant input gives exactly the bias (a ReLU after it then sees the same side of its kink)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.reshape(affine_shape)
    if bias is None:
        return (x - mean) * scale
    return torch.addcmul(bias.reshape(affine_shape), x - mean, scale)


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """F.batch_norm's value without touching the running statistics: per channel (dimension 1), over the batch."""
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training or running_mean is None:
        var, mean = torch.var_mean(input, [0] + list(range(2, input.dim())), unbiased=False, keepdim=True)
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    return _scale_shift(input, mean, var, eps, weight, bias, shape)


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                   momentum=0.1, eps=1e-5):
    """F.instance_norm's value without touching the running statistics: per sample and channel."""
    shape = [1, -1] + [1] * (input.dim() - 2)
    if use_input_stats or running_mean is None:
        var, mean = torch.var_mean(input, list(range(2, input.dim())), unbiased=False, keepdim=True)
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    return _scale_shift(input, mean, var, eps, weight, bias, shape)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm's value: over the last len(normalized_shape) dimensions."""
    dims = list(range(input.dim() - len(normalized_shape), input.dim()))
    var, mean = torch.var_mean(input, dims, unbiased=False, keepdim=True)
    return _scale_shift(input, mean, var, eps, weight, bias, list(normalized_shape))


def _weight_norm(v, g, dim=0):
    """torch._weight_norm's value (weight_norm and its parametrization): g * v / ||v||, the norm over every
    dimension but dim (over all of them for dim = -1)."""
    dims = list(range(v.dim())) if dim == -1 else [d for d in range(v.dim()) if d != dim]
    return v * (g * v.square().sum(dims, keepdim=True).rsqrt())  # (vector_norm's double backward under vmap is
    # wrong too)


# The functionals that torch.func differentiates wrongly twice under vmap (the double-backward batching rules of
# F.batch_norm, F.instance_norm and F.layer_norm's fused kernels: tests/test_layer_scan.py over torch.nn's layers,
# and functorch issue 534 for batch_norm) or not at all by forward-over-reverse (torch._weight_norm has no
# forward-mode formula), each with the same function composed from primitive ops, which torch.func differentiates
# exactly.
_EXACT_TWINS = {F.batch_norm: _batch_norm, F.instance_norm: _instance_norm, F.layer_norm: _layer_norm,
                torch._weight_norm: _weight_norm}


class _NormalizationFromPrimitives(TorchFunctionMode):
    """While active, the functionals of _EXACT_TWINS run as their twins composed from primitive ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        twin = _EXACT_TWINS.get(func)
        if twin is not None:
            return twin(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _slot_paths(model: nn.Module, kind: str) -> Dict[str, List[str]]:
    """For each parameter (kind "_parameters") or buffer ("_buffers") of the model, by the name named_parameters() /
    named_buffers() give it: the paths that reach it through distinct (module, attribute) slots.

    functional_call must substitute every slot once: a tied weight (one tensor in two modules) needs both of its
    paths, a module used twice (one slot at two paths) only one; given both, functional_call leaves the substitute
    in the module for good."""
    first_name: Dict[int, str] = {}
    paths: Dict[str, List[str]] = {}
    seen = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for key, tensor in getattr(module, kind).items():
            if tensor is None or (id(module), key) in seen:
                continue
            seen.add((id(module), key))
            path = f"{prefix}.{key}" if prefix else key
            paths.setdefault(first_name.setdefault(id(tensor), path), []).append(path)
    return paths


class _ModuleTracker:
    """Knows which of the model's modules is running, to name it when a forward fails, and which of them changed
    one of their own buffers (in place, or by assigning a new tensor to it)."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): name or type(model).__name__ for name, m in model.named_modules()}
        self.stack: List[nn.Module] = []
        self.mutated: List[Tuple[nn.Module, str]] = []
        self._buffers_before: Dict[int, Dict[str, Tuple[Tensor, int]]] = {}

    def describe(self, module: nn.Module) -> str:
        return f"module '{self.names[id(module)]}' ({type(module).__name__})"

    def _pre(self, module, args):
        if id(module) in self.names:
            self.stack.append(module)
            self._buffers_before[id(module)] = {n: (b, b._version) for n, b in module.named_buffers(recurse=False)}

    def _post(self, module, args, output):
        if id(module) not in self.names:
            return
        self.stack.pop()
        before = self._buffers_before.pop(id(module))
        after = dict(module.named_buffers(recurse=False))
        for name in sorted(before.keys() | after.keys()):
            old, version = before.get(name, (None, None))
            if after.get(name) is not old or old._version != version:
                self.mutated.append((module, name))

    def __enter__(self):
        self._handles = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                         nn.modules.module.register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False


def generic_signature(model: nn.Module) -> tuple:
    """A fingerprint of what GenericEngine caches about the model (its modules, their parameter and buffer slots
    with dtype, device and shape): when it changes, the engine is built anew."""
    parts = []
    for module in model.modules():
        state = module.__dict__
        parts.append((id(module), type(module),
                      *[(key, id(t), t.dtype, t.device, t.shape) for kind in ("_parameters", "_buffers")
                        for key, t in state[kind].items() if t is not None]))
    return tuple(parts)


class GenericEngine:
    """MAML's pieces for one model: per-task losses, the inner loop, the meta-gradient in both memory modes.
    The algorithm on top owns the rates and the step weights and checks types, devices and finite values; owner
    names it in errors."""

    name = "generic"
    signature = staticmethod(generic_signature)

    def __init__(self, model: nn.Module, loss: Union[str, LossFn], owner: str, memory: str = "graph",
                 task_chunk: Optional[int] = None):
        self.model = model
        self.owner = owner
        self.loss = loss
        self.memory, self.task_chunk = memory, task_chunk
        self.loss_fn = BUILTIN_LOSSES[loss] if isinstance(loss, str) else loss
        self.custom_loss = not isinstance(loss, str)
        self.names = [name for name, _ in model.named_parameters()]
        self._param_paths = _slot_paths(model, "_parameters")
        self._buffer_paths = _slot_paths(model, "_buffers")
        self._validated = set()  # input signatures whose first forward passed the checks
        self.output_shapes: Dict[tuple, Optional[Tuple[int, ...]]] = {}

    def params(self) -> List[Tensor]:
        return [p for _, p in self.model.named_parameters()]

    def guard(self) -> ModelGuard:
        return ModelGuard(self.model)  # the engine's forwards put per-task tensors into the model's slots

    def inputs_checked_by_kernel(self, x: Tensor) -> bool:
        return False

    # --- checks (the algorithm on top checks types, devices and finite values) ------------------------------------

    def check_pair(self, where: str, x: Tensor, y: Tensor, x_name: str, y_name: str) -> None:
        """x [T, K, *in], y [T, K, *out] (mse: shaped like the model's output; ce: int64 [T, K] with indices within
        the outputs; a loss callable: any tensor with T leading), the model's dtype. Runs one task through the
        model on the first call of each input shape (validate)."""
        like = self.params()[0]
        if x.dim() < 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{where}: {x_name} must be [T, K, *input shape] with T >= 1 tasks of K >= 1 examples, "
                             f"got {list(x.shape)}")
        if x.dtype != like.dtype:
            raise ValueError(f"{where}: {x_name} has dtype {x.dtype} but the model's parameters are {like.dtype}")
        tasks, rows = x.shape[:2]
        if y.dim() < 1 or y.shape[0] != tasks:
            raise ValueError(f"{where}: {y_name} must hold the same T = {tasks} tasks as {x_name} ({list(x.shape)}), "
                             f"got {list(y.shape)}")
        if isinstance(self.loss, str) and (y.dim() < 2 or y.shape[1] != rows):
            raise ValueError(f"{where}: {y_name} must be [T, K, ...] with K = {rows} like {x_name} "
                             f"({list(x.shape)}), got {list(y.shape)}")
        if self.loss == "ce" and (y.dtype != torch.int64 or y.dim() != 2):
            raise ValueError(f"{where}: {y_name} must be int64 class indices [T, K] = {[tasks, rows]} for loss 'ce', "
                             f"got {y.dtype} {list(y.shape)}")
        if self.loss == "mse" and y.dtype != like.dtype:
            raise ValueError(f"{where}: {y_name} has dtype {y.dtype} but the model's parameters are {like.dtype} "
                             "(loss 'mse')")
        out_shape = self.validate(where, x, y)
        if self.loss == "mse" and tuple(y.shape[1:]) != out_shape:
            raise ValueError(f"{where}: {y_name} must be shaped like the model's output for loss 'mse', "
                             f"[T, *output shape] = {[tasks, *out_shape]} ({x_name} is {list(x.shape)}), got "
                             f"{list(y.shape)}")
        if self.loss == "ce":
            check_class_indices(where, y_name, y, out_shape[-1])

    def check_predict_input(self, where: str, x) -> None:
        if not isinstance(x, Tensor) or x.dim() < 2:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{where}: x must be [T, K, *input shape], got {shape}")

    def _buffers(self, exact: bool) -> Dict[str, Optional[Tensor]]:
        """The buffers for one of the engine's forwards: copies, so that the model's own never change, and None for
        BatchNorm's and InstanceNorm's num_batches_tracked, which makes them skip counting (an in-place update that
        torch.func transforms refuse on a captured tensor). For a native forward (not exact), also None for the
        running statistics of those layers in training mode, which makes them use batch statistics without updating
        anything."""
        dropped = set()
        for prefix, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm and InstanceNorm
                names = ("num_batches_tracked",) if exact or not module.training else (
                    "num_batches_tracked", "running_mean", "running_var")
                dropped.update(f"{prefix}.{name}" if prefix else name for name in names)
        return {name: None if name in dropped else b.clone() for name, b in self.model.named_buffers()}

    def _output(self, params: Sequence[Tensor], buffers: Dict[str, Optional[Tensor]], x: Tensor,
                exact: bool) -> Tensor:
        """One task's output (vmapped over tasks by the callers). exact: F.batch_norm from primitive ops, for the
        forwards that are differentiated twice under vmap (where PyTorch's batch_norm rule is wrong); otherwise the
        native kernels, which vmap gets right to first order and which are several times faster."""
        mapping = {path: tensor for name, tensor in buffers.items() for path in self._buffer_paths.get(name, [name])}
        mapping.update((path, tensor) for name, tensor in zip(self.names, params) for path in self._param_paths[name])
        if exact:
            with _NormalizationFromPrimitives():
                return functional_call(self.model, mapping, (x,), tie_weights=False)
        return functional_call(self.model, mapping, (x,), tie_weights=False)

    def _loss_exact(self, params, buffers, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self._output(params, buffers, x, exact=True), y)

    def _loss_native(self, params, buffers, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self._output(params, buffers, x, exact=False), y)

    # --- the first call of each input signature: can the model be batched, does it keep its buffers -------------

    def validate(self, where: str, x: Tensor, y: Optional[Tensor]) -> Optional[Tuple[int, ...]]:
        """Runs one task through the model as the engine will (vmap over tasks) with the module tracker; returns
        the shape of one task's output, [K, ...] (None for an output that is not a tensor, which only a loss
        callable can take). Names the module when a forward fails or changes a buffer; `where` ("Owner.method")
        prefixes the errors about the call's inputs."""
        signature = (tuple(x.shape[1:]), x.dtype, x.device)
        if signature in self._validated:
            return self.output_shapes[signature]
        params = self.params()
        tracker = _ModuleTracker(self.model)
        try:
            with tracker, torch.no_grad():
                out = vmap(self._output, in_dims=(None, None, 0, None))(params, self._buffers(True), x[:1], True)
        except Exception as error:
            where = tracker.describe(tracker.stack[-1]) if tracker.stack else "the model"
            raise RuntimeError(f"{self.owner}(generic engine): {where} cannot run batched over tasks "
                               f"(torch.func.vmap of its forward failed): {type(error).__name__}: {error}") from error
        if tracker.mutated:
            module, buffer = tracker.mutated[0]
            raise RuntimeError(f"{self.owner}(generic engine): {tracker.describe(module)} changes its buffer "
                               f"{buffer!r} in its forward; the generic engine cannot batch a module whose buffers "
                               "change under the inner loop (only the running statistics of BatchNorm and "
                               "InstanceNorm are handled)")
        if isinstance(out, Tensor):
            if out.dim() < 2:
                raise RuntimeError(f"{self.owner}(generic engine): the model's output per task must be [K, ...] with "
                                   f"one row per example, got shape {list(out.shape[1:])} for {where}'s input "
                                   f"{list(x.shape[1:])}")
            shape: Optional[Tuple[int, ...]] = tuple(out.shape[1:])
        elif self.custom_loss:  # a tuple, a dict...: the loss callable takes it as it is
            shape = None
        else:
            raise RuntimeError(f"{self.owner}(generic engine): the model returns a {type(out).__name__}, but the "
                               "losses 'mse' and 'ce' need a tensor output; pass a loss callable "
                               "loss_fn(output, target) that takes the model's output as it is")
        if self.custom_loss and y is not None:
            with torch.no_grad():
                value = self.loss_fn(torch.utils._pytree.tree_map(lambda t: t[0], out), y[0])
            if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point():
                got = f"a tensor of shape {list(value.shape)} and dtype {value.dtype}" if isinstance(value, Tensor) \
                    else type(value).__name__
                raise ValueError(f"{where}: the loss callable must return one task's mean loss as a "
                                 f"floating-point scalar (a 0-dimensional tensor), got {got}")
        self._validated.add(signature)
        self.output_shapes[signature] = shape
        return shape

    # --- the inner loop ------------------------------------------------------------------------------------------

    def _support_grads(self, theta: Sequence[Tensor], shared: bool, x: Tensor, y: Tensor,
                       exact: bool = False) -> List[Tensor]:
        """Every task's loss gradient at its parameters (θ shared by all tasks, or [T, *S_i]); exact when the
        gradient is to be differentiated again."""
        loss = self._loss_exact if exact else self._loss_native
        dims = None if shared else 0
        return list(vmap(grad(loss), in_dims=(dims, None, 0, 0))(list(theta), self._buffers(exact), x, y))

    def _task_losses(self, theta: Sequence[Tensor], shared: bool, x: Tensor, y: Tensor) -> Tensor:
        dims = None if shared else 0
        return vmap(self._loss_native, in_dims=(dims, None, 0, 0))(list(theta), self._buffers(False), x, y)

    def _refuse_row_weights(self, method: str, *weights: Optional[Tensor]) -> None:
        if any(w is not None for w in weights):
            raise ValueError(f"{self.owner}.{method}: support_weights and query_weights (weights of the loss's rows) "
                             f"run on the fused MLP engine only, not on the generic engine that serves this model")

    def adapt(self, xs: Tensor, ys: Tensor, steps: int, rates: InnerRates,
              support_weights: Optional[Tensor] = None) -> List[Tensor]:
        """Per-task parameters after `steps` inner SGD steps, without a graph: P tensors [T, *S_i]."""
        self._refuse_row_weights("adapt", support_weights)
        params = self.params()
        theta = [p.detach() for p in params]
        shared = True
        with torch.no_grad():
            for step in range(steps):
                g = self._support_grads(theta, shared, xs, ys)
                theta = ops.task_sgd(theta, g, rates.at(step, params))
                shared = False
        if shared:  # no step: every task keeps θ
            theta = [p.unsqueeze(0).expand(xs.shape[0], *p.shape).clone() for p in theta]
        return theta

    def predict(self, adapted: Sequence[Tensor], x: Tensor) -> Tensor:
        return vmap(self._output, in_dims=(0, None, 0, None))(list(adapted), self._buffers(False), x, False)

    def forward_tasks(self, x: Tensor) -> Tensor:
        """The model with its own parameters on every task's inputs, x [T, K, ...] -> [T, K, ...], each task
        normalized by its own batch statistics; differentiable by ordinary autograd (ANIL's backbone)."""
        return vmap(self._output, in_dims=(None, None, 0, None))(self.params(), self._buffers(False), x, False)

    # --- meta-gradients ------------------------------------------------------------------------------------------

    def meta_loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, steps: int, rates: InnerRates,
                  step_weights: Tensor, multi_step: bool, first_order: bool, support_weights: Optional[Tensor] = None,
                  query_weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(mean query loss, per-task losses [T]) in the engine's memory mode; the mean's backward is the exact
        meta-gradient."""
        self._refuse_row_weights("meta_loss", support_weights, query_weights)
        weights = step_weights if multi_step else None
        if self.memory == "graph":
            losses = self.task_losses_graph(xs, ys, xq, yq, steps, rates, weights, first_order)
            return losses.mean(), losses
        if any(t.requires_grad for t in (xs, ys, xq, yq)):
            raise ValueError(f"{self.owner}.meta_loss: memory='low' gives no gradient to the inputs, but one of "
                             "xs, ys, xq, yq requires grad; use memory='graph' to differentiate w.r.t. the data")
        return self.meta_loss_low(xs, ys, xq, yq, steps, rates, weights, first_order, self.task_chunk)

    def task_losses_graph(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, steps: int,
                          rates: InnerRates, step_weights: Optional[Tensor], first_order: bool) -> Tensor:
        """Per-task (weighted) query losses [T] with the whole unrolled inner loop in the autograd graph."""
        params = self.params()
        theta, shared = params, True
        losses = None
        for step in range(steps):
            g = self._support_grads(theta, shared, xs, ys, exact=not first_order)
            if first_order:
                g = [gi.detach() for gi in g]
            theta, shared = ops.task_sgd(theta, g, rates.at(step, params)), False
            if step_weights is not None or step == steps - 1:
                query = self._task_losses(theta, shared, xq, yq)
                weighted = query if step_weights is None else step_weights[step] * query
                losses = weighted if losses is None else losses + weighted
        return losses

    def meta_loss_low(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, steps: int,
                      rates: InnerRates, step_weights: Optional[Tensor], first_order: bool,
                      task_chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """(mean query loss with the meta-gradient as its backward, per-task losses [T]); see the module docstring.
        task_chunk: run the tasks in chunks of this many (peak memory grows with it), all at once when None."""
        params = self.params()
        learnable = rates.learnable(params)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*params, *learnable))
        tasks = xs.shape[0]
        weights = [None] * (steps - 1) + [1.0] if step_weights is None else list(step_weights.unbind())
        chunk = tasks if task_chunk is None else task_chunk
        losses, meta_grads, lr_grads = [], None, None
        with torch.no_grad():  # only the meta-gradients are kept: constant in the number of steps and tasks
            for begin in range(0, tasks, chunk):
                part = slice(begin, begin + chunk)
                chunk_losses, chunk_meta, chunk_lr = _low_memory_tasks(
                    self, xs[part], ys[part], xq[part], yq[part], steps, rates, weights, first_order, needs_grad,
                    params, learnable, tasks)
                losses.append(chunk_losses)
                if needs_grad:
                    meta_grads = chunk_meta if meta_grads is None else [a + b for a, b in zip(meta_grads, chunk_meta)]
                    lr_grads = chunk_lr if lr_grads is None else [a + b for a, b in zip(lr_grads, chunk_lr)]
            task_losses = torch.cat(losses)
            mean = task_losses.mean()
        if not needs_grad:
            return mean, task_losses
        return ops.with_task_gradients(mean, [*params, *learnable], [*meta_grads, *lr_grads]), task_losses


def load_forward_mode_rules() -> None:
    """torch.func.jvp imports its decompositions on first use (scripting some 20 functions, ~0.1 s); memory="low"
    loads them when the engine is built, so that an interrupt of the first call never cuts that import short."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PyTorch's own torch.jit.script deprecation notice
        importlib.import_module("torch._decomp.decompositions_for_jvp")


def _low_memory_tasks(engine: GenericEngine, xs, ys, xq, yq, steps, rates: InnerRates, weights, first_order,
                      needs_grad, params, learnable, total_tasks):
    """memory="low" for the tasks of xs..yq (all, or one chunk): (per-task losses, and when needs_grad the sums over
    these tasks of the meta-gradients and rate gradients of mean-over-total_tasks query loss, else None, None)."""
    # The inner loop, keeping θ_0 .. θ_{N-1} (θ_0 shared by all tasks) and the query terms.
    thetas, theta = [], params
    for step in range(steps):
        thetas.append(theta)
        g = engine._support_grads(theta, step == 0, xs, ys)
        theta = ops.task_sgd(theta, g, rates.at(step, params))
    query_value_grad = vmap(grad_and_value(engine._loss_native), in_dims=(0, None, 0, 0))

    def query_term(theta_k, weight):
        q_grad, q_loss = query_value_grad(list(theta_k), engine._buffers(False), xq, yq)
        return [weight * g / total_tasks for g in q_grad], weight * q_loss

    v, task_losses = query_term(theta, weights[-1])
    for step in range(steps - 1):  # the multi-step loss's other terms (their gradients are added on the way back)
        if weights[step] is not None:
            task_losses = task_losses + weights[step] * engine._task_losses(thetas[step + 1], False, xq, yq)
    if not needs_grad:
        return task_losses, None, None

    # The reverse recursion from θ_N back to θ_0.
    want_lr = rates.learned
    lr_grads = [torch.zeros_like(r) for r in learnable]

    def grad_and_hvp(theta_task, u, buffers, x, y):  # support gradient and H u, by forward-over-reverse, exact
        return jvp(lambda t: grad(engine._loss_exact)(t, buffers, x, y), (theta_task,), (u,))

    hvp = vmap(grad_and_hvp, in_dims=(0, 0, None, 0, 0))
    hvp_shared = vmap(grad_and_hvp, in_dims=(None, 0, None, 0, 0))
    exact_buffers = engine._buffers(True)
    for step in reversed(range(steps)):
        theta_k, shared = thetas[step], step == 0
        if first_order:  # no Hessian term; the support gradient only for the rates
            hv = [torch.zeros_like(vi) for vi in v]
            g = engine._support_grads(theta_k, shared, xs, ys) if want_lr else []
        else:
            try:
                g, hv = (hvp_shared if shared else hvp)(list(theta_k), rate_times(rates.at(step, params), v),
                                                        exact_buffers, xs, ys)
            except RuntimeError as error:
                raise RuntimeError(f"{engine.owner}(generic engine, memory='low'): the Hessian-vector product "
                                   "(forward-mode over reverse-mode differentiation of the support loss) failed: "
                                   f"{error}. Some PyTorch ops lack forward-mode AD through their backward (e.g. "
                                   "F.mse_loss: write it as (out - y).square().mean()); or use memory='graph'"
                                   ) from error
            g, hv = list(g), list(hv)
        v, step_lr_grads = ops.maml_reverse_step(v, hv, g if want_lr else [], sum_tasks=shared)
        if want_lr:
            rates.accumulate(lr_grads, step, step_lr_grads)
        if step > 0 and weights[step - 1] is not None:
            v = [vi + qi for vi, qi in zip(v, query_term(theta_k, weights[step - 1])[0])]
    return task_losses, v, lr_grads
