"""BatchedMAML: MAML over a whole batch of tasks in one call, for models a fused engine supports.

    maml = mamlext.BatchedMAML(nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                                             nn.Linear(40, 1)), inner_lr=0.01, inner_steps=1)
    loss = maml.meta_loss(xs, ys, xq, yq)   # xs [T, K, in], ys [T, K, out] (mse) or [T, K] int64 (ce)
    loss.backward()                         # the exact meta-gradient lands in model.parameters() (and inner_lrs)
    adapted = maml.adapt(xs, ys)            # per-task adapted parameters, [T, *S_i] each
    out = maml.predict(adapted, xq)         # [T, Kq, out]

Engines: "fused_mlp" (ops.mlp_maml) serves an nn.Sequential of nn.Linear layers with one activation kind between
them and the losses "mse" / "ce"; "generic" (mamlext.engines.generic: torch.func over tasks, any nn.Module, any
loss callable) serves every other model.
"""
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from mamlext import ops, reference
from mamlext._mlp_codes import ACTIVATIONS, LOSSES
from mamlext.engines.generic import MEMORY_MODES, GenericEngine, LossFn, generic_signature, load_forward_mode_rules
from mamlext.engines.guard import ModelGuard
from mamlext.engines.mlp_spec import UnsupportedModel, mlp_signature, parse_mlp
from mamlext.rates import LR_MODES, InnerRates

BACKENDS = ("auto", "fused", "generic")


def parse_generic(model: nn.Module, loss: Union[str, LossFn] = "mse") -> None:
    """The generic engine serves any model with floating-point parameters on one device; UnsupportedModel else.
    (Layers that cannot run batched over tasks are found, and named, on the first call: GenericEngine.validate.)"""
    params = list(model.parameters())
    if not params:
        raise UnsupportedModel(None, type(model).__name__, "the model has no parameters to meta-learn")
    if len({p.dtype for p in params}) != 1 or not params[0].dtype.is_floating_point:
        raise UnsupportedModel(None, type(model).__name__, f"the parameters must all have one floating-point dtype, "
                               f"got {sorted({str(p.dtype) for p in params})}")
    if len({p.device for p in params}) != 1:
        raise UnsupportedModel(None, type(model).__name__, "the parameters must all be on one device")


# The engines, tried in order by backend="auto"; each is (name, backend that selects it explicitly, parser).
_ENGINES: List[Tuple[str, str, Callable[..., object]]] = [("fused_mlp", "fused", parse_mlp),
                                                          ("generic", "generic", parse_generic)]


def select_engine(model: nn.Module, backend: str, owner: str = "BatchedMAML", loss: Union[str, LossFn] = "mse",
                  engines: Sequence[str] = ("fused_mlp", "generic")) -> Tuple[str, object]:
    """(engine name, its parsed view of the model) for the backend, among the engines the caller can use; the one
    place that decides. owner names the caller in the error messages."""
    backends = ["auto"] + [b for name, b, _ in _ENGINES if name in engines]
    if backend not in backends:
        raise ValueError(f"{owner}: backend must be one of {backends}, got {backend!r}")
    reasons = []
    for name, engine_backend, parse in _ENGINES:
        if name not in engines or backend not in ("auto", engine_backend):
            continue
        try:
            return name, parse(model, loss)
        except UnsupportedModel as error:
            if backend != "auto":
                raise ValueError(f"{owner}(backend={backend!r}): the {name} engine cannot serve this model: "
                                 f"{error}") from None
            reasons.append(f"{name}: {error}")
    raise ValueError(f"{owner}: no engine serves this model ({'; '.join(reasons)})")


class TaskBatchedAlgorithm(nn.Module):
    """What the task-batched algorithms share (BatchedMAML, algorithms.iMAML): the model binding to an engine, the
    input checks and predict. Subclasses set ``loss``, call _bind_model and use ``_check_pair``; error messages name
    the subclass. ``_engines`` lists the engines the subclass can run on."""

    _engines: Tuple[str, ...] = ("fused_mlp",)

    def _bind_model(self, model: nn.Module, backend: str) -> None:
        """Selects the engine for the model (the ValueError of select_engine) and keeps its view of the model:
        engine, model, backend and, for the fused MLP engine, activation, act_param, _layers; for the generic engine,
        _generic (a GenericEngine)."""
        self.engine, spec = select_engine(model, backend, owner=self._owner, loss=self.loss, engines=self._engines)
        self.model = model
        self._backend = backend
        self._signature = self._signature_of(model)
        if self.engine == "fused_mlp":
            self.activation, self.act_param = spec.activation, spec.act_param
            self._layers = spec.layers
            self._generic = None
            self._mlp_codes = ops.mlp_codes(self._owner, self.activation, self.act_param, self.loss)
        else:
            self.activation = self.act_param = self._layers = None
            self._generic = GenericEngine(model, self.loss, self._owner)

    def _signature_of(self, model: nn.Module) -> tuple:
        return mlp_signature(model) if self.engine == "fused_mlp" else generic_signature(model)

    @property
    def backend(self) -> str:
        return self._backend

    def _current_engine(self) -> None:
        """Re-binds the engine when the model changed since the last call (a layer replaced or added, a dtype
        changed, a hook or parametrization registered): every call computes the model as it is now."""
        if self._signature_of(self.model) == self._signature:
            return
        self._bind_model(self.model, self._backend)
        params = self._params()
        if not self._rates.fit(params):
            raise ValueError(f"{self._owner}: the model's parameters changed since it was built, but "
                             f"lr_mode={self.lr_mode!r} learns a rate for each parameter it had; build a new "
                             f"{self._owner} for the changed model")
        weights = getattr(self, "step_weights", None)
        if weights is not None and (weights.dtype, weights.device) != (params[0].dtype, params[0].device):
            self.step_weights = weights.to(device=params[0].device, dtype=params[0].dtype)

    # The name error messages give; algorithms built on a BatchedMAML of their own (ANIL, Reptile) set theirs.
    _display_name: Optional[str] = None

    @property
    def _owner(self) -> str:
        return self._display_name or type(self).__name__

    def _params(self) -> List[Tensor]:
        if self._generic is not None:
            return self._generic.params()
        return [p for layer in self._layers for p in (layer.weight, layer.bias)]

    @property
    def inner_lr(self) -> float:
        """The inner step size (of lr_mode "fixed"; the initial value of learned rates). Read by every call, so an
        assignment takes effect at the next one."""
        return self._rates.value

    @inner_lr.setter
    def inner_lr(self, value: float) -> None:
        self._rates.value = float(value)

    def _first_param(self) -> Tensor:
        """The first parameter: the model's dtype and device (cheaper than _params()[0], which reads every layer's
        attributes)."""
        return self._generic.params()[0] if self._generic is not None else self._layers[0].weight

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # --- input checks ---------------------------------------------------------------------------------------------

    def _check_support_query(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> None:
        """meta_loss's inputs: each pair fits the model, and support and query hold the same tasks."""
        self._check_pair("meta_loss", xs, ys, "xs", "ys", finite=False)
        self._check_pair("meta_loss", xq, yq, "xq", "yq", finite=False)
        if xq.shape[0] != xs.shape[0]:
            raise ValueError(f"{self._owner}.meta_loss: xs has T = {xs.shape[0]} tasks but xq has {xq.shape[0]} "
                             f"(xs {list(xs.shape)}, xq {list(xq.shape)})")
        self._check_finite("meta_loss", (("xs", xs), ("ys", ys), ("xq", xq), ("yq", yq)))

    def _check_finite(self, method: str, named: Sequence[Tuple[str, Tensor]]) -> None:
        """The floating-point tensors of named hold no nan or inf: one pass over all of them (a check per tensor
        costs as much as a small meta-iteration's kernel), then a search for the culprit to name it."""
        floats = [(name, t) for name, t in named if t.is_floating_point()]
        if not floats or bool(torch.isfinite(torch.cat([t.reshape(-1) for _, t in floats])).all()):
            return
        for name, t in floats:
            if not torch.isfinite(t).all():
                raise ValueError(f"{self._owner}.{method}: {name} holds non-finite values (nan or inf)")

    def _check_pair(self, method: str, x: Tensor, y: Tensor, x_name: str, y_name: str, finite: bool = True) -> None:
        """An input pair of `method`: tensors on the model's device, shaped for the engine (_check_shapes_mlp /
        _check_shapes_generic), class indices within the model's outputs, and (unless the caller checks that for
        all its inputs at once) finite."""
        like = self._first_param()
        for name, t in ((x_name, x), (y_name, y)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{self._owner}.{method}: {name} must be a tensor, got {type(t).__name__}")
            if t.device != like.device:
                raise ValueError(f"{self._owner}.{method}: {name} is on {t.device} but the model is on {like.device}")
        if self._generic is None:
            self._check_shapes_mlp(method, x, y, x_name, y_name, like)
        else:
            self._check_shapes_generic(method, x, y, x_name, y_name, like)
        if finite:
            self._check_finite(method, ((x_name, x), (y_name, y)))
        if self._generic is None:
            out_f = self._layers[-1].out_features
        else:
            out_shape = self._generic.validate(method, x, y)
            out_f = None if out_shape is None else out_shape[-1]  # None: not a tensor, for a loss callable
            if self.loss == "mse" and tuple(y.shape[1:]) != out_shape:
                raise ValueError(f"{self._owner}.{method}: {y_name} must be shaped like the model's output for loss "
                                 f"'mse', [T, *output shape] = {[x.shape[0], *out_shape]} ({x_name} is "
                                 f"{list(x.shape)}), got {list(y.shape)}")
        if self.loss == "ce":
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= out_f:
                raise ValueError(f"{self._owner}.{method}: {y_name} holds the class index "
                                 f"{low if low < 0 else high}, outside [0, {out_f}) (the model has {out_f} outputs)")

    def _check_shapes_mlp(self, method: str, x: Tensor, y: Tensor, x_name: str, y_name: str, like: Tensor) -> None:
        """The fused MLP engine's view: x [T, K, in], y [T, K, out] (mse) or int64 [T, K] (ce), the model's dtype."""
        in_f, out_f = self._layers[0].in_features, self._layers[-1].out_features
        if x.dim() != 3:
            raise ValueError(f"{self._owner}.{method}: {x_name} must be [T, K, in] = [T, K, {in_f}] (3 dimensions), "
                             f"got {list(x.shape)}")
        if x.shape[2] != in_f:
            raise ValueError(f"{self._owner}.{method}: {x_name} must be [T, K, in] with in = {in_f} (the model's "
                             f"in_features), got {list(x.shape)}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{self._owner}.{method}: {x_name} must hold T >= 1 tasks of K >= 1 rows, "
                             f"got {list(x.shape)}")
        if x.dtype != like.dtype:
            raise ValueError(f"{self._owner}.{method}: {x_name} has dtype {x.dtype} but the model's parameters are "
                             f"{like.dtype}")
        tasks, rows = x.shape[:2]
        if self.loss == "mse":
            if y.shape != (tasks, rows, out_f):
                raise ValueError(f"{self._owner}.{method}: {y_name} must be [T, K, out] = {[tasks, rows, out_f]} for "
                                 f"loss 'mse' ({x_name} is {list(x.shape)}), got {list(y.shape)}")
            if y.dtype != like.dtype:
                raise ValueError(f"{self._owner}.{method}: {y_name} has dtype {y.dtype} but the model's parameters "
                                 f"are {like.dtype} (loss 'mse')")
        else:
            if y.dtype != torch.int64:
                raise ValueError(f"{self._owner}.{method}: {y_name} must hold int64 class indices for loss 'ce', "
                                 f"got dtype {y.dtype}")
            if y.shape != (tasks, rows):
                raise ValueError(f"{self._owner}.{method}: {y_name} must be [T, K] = {[tasks, rows]} for loss 'ce' "
                                 f"({x_name} is {list(x.shape)}), got {list(y.shape)}")

    def _check_shapes_generic(self, method: str, x: Tensor, y: Tensor, x_name: str, y_name: str,
                              like: Tensor) -> None:
        """The generic engine's view: x [T, K, *in], y [T, K, *out] (mse: like the model's output; ce: int64
        [T, K]; a loss callable: any tensor with T leading), the model's dtype. (_check_pair then runs one task
        through the model on the first call of each input shape: GenericEngine.validate.)"""
        if x.dim() < 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{self._owner}.{method}: {x_name} must be [T, K, *input shape] with T >= 1 tasks of "
                             f"K >= 1 examples, got {list(x.shape)}")
        if x.dtype != like.dtype:
            raise ValueError(f"{self._owner}.{method}: {x_name} has dtype {x.dtype} but the model's parameters are "
                             f"{like.dtype}")
        tasks, rows = x.shape[:2]
        if y.dim() < 1 or y.shape[0] != tasks:
            raise ValueError(f"{self._owner}.{method}: {y_name} must hold the same T = {tasks} tasks as {x_name} "
                             f"({list(x.shape)}), got {list(y.shape)}")
        if isinstance(self.loss, str) and (y.dim() < 2 or y.shape[1] != rows):
            raise ValueError(f"{self._owner}.{method}: {y_name} must be [T, K, ...] with K = {rows} like {x_name} "
                             f"({list(x.shape)}), got {list(y.shape)}")
        if self.loss == "ce" and (y.dtype != torch.int64 or y.dim() != 2):
            raise ValueError(f"{self._owner}.{method}: {y_name} must be int64 class indices [T, K] = {[tasks, rows]} "
                             f"for loss 'ce', got {y.dtype} {list(y.shape)}")
        if self.loss == "mse" and y.dtype != like.dtype:
            raise ValueError(f"{self._owner}.{method}: {y_name} has dtype {y.dtype} but the model's parameters are "
                             f"{like.dtype} (loss 'mse')")

    def predict(self, adapted: Sequence[Tensor], x: Tensor) -> Tensor:
        """Each task's model output with its adapted parameters: x [T, K, *in] -> [T, K, *out]."""
        self._current_engine()
        params = self._params()
        adapted = list(adapted)
        if len(adapted) != len(params):
            raise ValueError(f"{self._owner}.predict: adapted must hold one tensor per parameter ({len(params)}), "
                             f"got {len(adapted)}")
        if self._generic is not None:
            if not isinstance(x, Tensor) or x.dim() < 2:
                shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{self._owner}.predict: x must be [T, K, *input shape], got {shape}")
        elif not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != self._layers[0].in_features:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self._owner}.predict: x must be [T, K, in] with in = {self._layers[0].in_features}, "
                             f"got {shape}")
        tasks = x.shape[0]
        for i, (a, p) in enumerate(zip(adapted, params)):
            if not isinstance(a, Tensor) or list(a.shape) != [tasks, *p.shape]:
                shape = list(a.shape) if isinstance(a, Tensor) else type(a).__name__
                raise ValueError(f"{self._owner}.predict: adapted[{i}] must be [T, *S_{i}] = {[tasks, *p.shape]} "
                                 f"(T from x), got {shape}")
            if a.device != x.device or a.dtype != x.dtype:
                raise ValueError(f"{self._owner}.predict: adapted[{i}] is {a.dtype} on {a.device} but x is "
                                 f"{x.dtype} on {x.device}")
        if self._generic is not None:
            with ModelGuard(self.model):
                return self._generic.predict(adapted, x)
        return reference.mlp_forward(adapted, x, ACTIVATIONS[self.activation], self.act_param)


def _fixed_setting(name: str) -> property:
    """A setting fixed at construction (other state is built from it): reading it is free, assigning it says so."""

    def read(self):
        return self.__dict__["_" + name]

    def refuse(self, value):
        raise AttributeError(f"{self._owner}.{name} is fixed when it is built (its rates, step weights and engine "
                             f"follow from it); build a new {self._owner}(..., {name}={value!r}) instead")
    return property(read, refuse)


class BatchedMAML(TaskBatchedAlgorithm):
    """MAML over a batch of T tasks at once, with exact (second-order unless first_order) meta-gradients.

    Args:
        model: any nn.Module. An nn.Sequential of nn.Linear layers (with bias) with one activation kind between them
            (ReLU, LeakyReLU, Tanh, Sigmoid, GELU(approximate='none') or ELU) and none after the last runs on the
            fused MLP kernels; every other model on the generic engine (mamlext.engines.generic).
        inner_lr: the inner SGD step size (the initial value of the learnable rates).
        inner_steps: N, the number of inner SGD steps of meta_loss (and adapt's default).
        first_order: drop the second-order terms (FOMAML).
        loss: "mse" (ys [T, K, out]), "ce" (ys [T, K] int64 class indices) or, on the generic engine, a callable
            ``loss_fn(output, target) -> scalar``: one task's mean loss (output [K, ...], target one task's ys).
        lr_mode: "fixed" (inner_lr, not learned); "per_layer_step" (MAML++ LSLR: a learnable rate per parameter
            tensor per step, ``inner_lrs[i]`` of shape [N]); "per_param" (Meta-SGD: a learnable rate per
            parameter element, ``inner_lrs[i]`` shaped like the parameter, the same at every step).
        step_weights: MAML++ multi-step loss: N weights of the query loss after each inner step (a buffer);
            default plain MAML, [0, ..., 0, 1].
        backend: "auto" (the fused engine where it serves the model, else the generic engine), "fused" (the fused
            MLP engine, else ValueError naming the layer) or "generic".
        memory: the generic engine's way to the second-order meta-gradient: "graph" (autograd through the unrolled
            inner loop: fastest for few steps) or "low" (the reverse recursion with Hessian-vector products,
            recomputing activations: memory does not grow with inner_steps; no gradient reaches the inputs). The
            fused engine never builds a graph, whatever this says.
        task_chunk: memory="low" only: run the tasks in chunks of this many, so that peak memory follows the chunk,
            not T (a time-for-memory trade: fewer tasks per batched call); default all T at once.

    The generic engine normalizes BatchNorm layers with each task's own batch statistics in every forward (inner
    steps and query) and never updates their running statistics; see mamlext.engines.generic.
    """

    _engines = ("fused_mlp", "generic")

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False,
                 loss: Union[str, LossFn] = "mse", lr_mode: str = "fixed",
                 step_weights: Optional[Sequence[float]] = None, backend: str = "auto", memory: str = "graph",
                 task_chunk: Optional[int] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self._owner}: model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss) and loss not in LOSSES:
            raise ValueError(f"{self._owner}: loss must be one of {list(LOSSES)} or a callable "
                             f"loss_fn(output, target), got {loss!r}")
        if lr_mode not in LR_MODES:
            raise ValueError(f"{self._owner}: lr_mode must be one of {list(LR_MODES)}, got {lr_mode!r}")
        if memory not in MEMORY_MODES:
            raise ValueError(f"{self._owner}: memory must be one of {list(MEMORY_MODES)}, got {memory!r}")
        if task_chunk is not None and (isinstance(task_chunk, bool) or not isinstance(task_chunk, int)
                                       or task_chunk < 1 or memory != "low"):
            raise ValueError(f"{self._owner}: task_chunk must be None or an int >= 1, with memory='low', got "
                             f"task_chunk={task_chunk!r} with memory={memory!r}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"{self._owner}: inner_steps must be an int >= 1, got {inner_steps!r}")
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)) or not math.isfinite(inner_lr):
            raise ValueError(f"{self._owner}: inner_lr must be a finite float, got {inner_lr!r}")
        self.__dict__.update(_loss=loss, _inner_steps=inner_steps, _memory=memory, _task_chunk=task_chunk)
        self._bind_model(model, backend)
        if abs(inner_lr) > torch.finfo(self._first_param().dtype).max:
            raise ValueError(f"{self._owner}: inner_lr must be finite in the model's dtype "
                             f"{self._first_param().dtype}, got {inner_lr!r}")
        if memory == "low":  # also for the fused engine: a changed model may move to the generic engine
            load_forward_mode_rules()
        self._rates = InnerRates(lr_mode, float(inner_lr), inner_steps, self._params())
        self.inner_lrs = self._rates.tensors
        self.first_order = bool(first_order)
        self._multi_step = step_weights is not None
        self.last_task_losses: Optional[Tensor] = None

        params = self._params()
        like = params[0]
        if step_weights is None:
            weights = torch.zeros(inner_steps, dtype=like.dtype, device=like.device)
            weights[-1] = 1.0
        else:
            weights = torch.as_tensor(step_weights, dtype=torch.float64).to(dtype=like.dtype, device=like.device)
            if weights.shape != (inner_steps,):
                raise ValueError(f"{self._owner}: step_weights must hold inner_steps = {inner_steps} weights, got "
                                 f"shape {list(weights.shape)}")
            if not torch.isfinite(weights).all():
                raise ValueError(f"{self._owner}: step_weights must be finite")
        self.register_buffer("step_weights", weights)

    loss = _fixed_setting("loss")
    inner_steps = _fixed_setting("inner_steps")
    memory = _fixed_setting("memory")
    task_chunk = _fixed_setting("task_chunk")

    @property
    def lr_mode(self) -> str:
        return self._rates.mode

    @lr_mode.setter
    def lr_mode(self, mode: str) -> None:
        _fixed_setting("lr_mode").fset(self, mode)

    # --- MAML ----------------------------------------------------------------------------------------------------

    def meta_loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        """The mean over tasks of the query loss after the inner loop (MAML++: the step_weights-weighted sum of the
        query losses after each step). Its backward puts the exact meta-gradient into model.parameters() and
        inner_lrs (no gradient flows to the data). The per-task losses are kept in ``last_task_losses``.

        xs [T, K, in], ys [T, K, out] (mse) or [T, K] int64 (ce); xq [T, Kq, in], yq likewise."""
        self._current_engine()
        if self._generic is None:
            return self._meta_loss(xs, ys, xq, yq)
        with ModelGuard(self.model):
            return self._meta_loss(xs, ys, xq, yq)

    def _meta_loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        self._check_support_query(xs, ys, xq, yq)
        weights = self.step_weights if self._multi_step else None
        params = self._params()
        if self._generic is None:
            losses, _, _ = ops.mlp_maml(params, xs, ys, xq, yq, self._rates.of_every_step(params, self.inner_steps),
                                        self.step_weights, self.first_order, *self._mlp_codes)
        elif self.memory == "graph":
            losses = self._generic.task_losses_graph(xs, ys, xq, yq, self.inner_steps, self._rates, weights,
                                                     self.first_order)
        else:
            if any(t.requires_grad for t in (xs, ys, xq, yq)):
                raise ValueError(f"{self._owner}.meta_loss: memory='low' gives no gradient to the inputs, but one of "
                                 "xs, ys, xq, yq requires grad; use memory='graph' to differentiate w.r.t. the data")
            mean, losses = self._generic.meta_loss_low(xs, ys, xq, yq, self.inner_steps, self._rates, weights,
                                                       self.first_order, self.task_chunk)
            self.last_task_losses = losses.detach()
            return mean
        self.last_task_losses = losses.detach()
        return losses.mean()

    def adapt(self, xs: Tensor, ys: Tensor, steps: Optional[int] = None) -> List[Tensor]:
        """Per-task adapted parameters after `steps` (default inner_steps) inner SGD steps on the support set:
        P tensors [T, *S_i], without a graph (for evaluation). per_layer_step rates beyond inner_steps stay at the
        last step's rate."""
        self._current_engine()
        steps = self.inner_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{self._owner}.adapt: steps must be an int >= 0, got {steps!r}")
        if self._generic is not None:
            with ModelGuard(self.model):
                self._check_pair("adapt", xs, ys, "xs", "ys")
                return self._generic.adapt(xs, ys, steps, self._rates)
        self._check_pair("adapt", xs, ys, "xs", "ys")
        params = self._params()
        tasks = xs.shape[0]
        with torch.no_grad():
            current = [p.detach().unsqueeze(0).expand(tasks, *p.shape).clone() for p in params]
            for step in range(steps):
                _, grads = ops.mlp_loss_grad(current, xs, ys, self.activation, self.act_param, self.loss)
                current = ops.task_sgd(current, grads, self._rates.at(step, params))
        return current

    def extra_repr(self) -> str:
        engine = f"activation={self.activation!r}" if self._generic is None else f"memory={self.memory!r}"
        return (f"engine={self.engine!r}, {engine}, loss={self.loss!r}, "
                f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, first_order={self.first_order}, "
                f"lr_mode={self.lr_mode!r}")
