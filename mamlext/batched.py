"""BatchedMAML: MAML over a whole batch of tasks in one call, on the engine that serves the model.

    maml = mamlext.BatchedMAML(nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                                             nn.Linear(40, 1)), inner_lr=0.01, inner_steps=1)
    loss = maml.meta_loss(xs, ys, xq, yq)   # xs [T, K, in], ys [T, K, out] (mse) or [T, K] int64 (ce)
    loss.backward()                         # the exact meta-gradient lands in model.parameters() (and inner_lrs)
    adapted = maml.adapt(xs, ys)            # per-task adapted parameters, [T, *S_i] each
    out = maml.predict(adapted, xq)         # [T, Kq, out]

Engines (mamlext.engines): "fused_mlp" (ops.mlp_maml) serves an nn.Sequential of nn.Linear layers with one
activation kind between them and the losses "mse" / "ce"; "generic" (torch.func over tasks, any nn.Module, any
loss callable) serves every other model. The engine is re-selected whenever the model changed since the last call.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from mamlext._mlp_codes import OUTPUT_LOSSES
from mamlext.engines import BACKENDS, select_engine  # noqa: F401  (BACKENDS: the backends this version has)
from mamlext.engines.generic import MEMORY_MODES, LossFn, load_forward_mode_rules
from mamlext.rates import LR_MODES, InnerRates


class TaskBatchedAlgorithm(nn.Module):
    """What the task-batched algorithms share (BatchedMAML, algorithms.iMAML): the engine bound to the model (and
    bound anew when the model changed), the checks every engine shares, predict. Subclasses set ``_loss`` (and for
    BatchedMAML ``_memory``, ``_task_chunk``) and call _bind_model; error messages name the subclass.
    ``_engines`` lists the engines the subclass can run on."""

    _engines: Tuple[str, ...] = ("fused_mlp",)
    # The name error messages give; algorithms built on a BatchedMAML of their own (ANIL, Reptile) set theirs.
    _display_name: Optional[str] = None

    @property
    def _owner(self) -> str:
        return self._display_name or type(self).__name__

    def _bind_model(self, model: nn.Module, backend: str) -> None:
        """Binds the engine that serves the model (select_engine's ValueError else) and notes its signature."""
        options = self.__dict__
        engine = select_engine(model, backend, owner=self._owner, loss=options["_loss"], engines=self._engines,
                               memory=options.get("_memory", "graph"), task_chunk=options.get("_task_chunk"))
        self.__dict__.update(_engine=engine, _backend=backend, _signature=engine.signature(model))
        self.model = model

    def _current_engine(self):
        """The engine for the model as it is now: bound anew when the model changed since the last call (a layer
        replaced or added, a dtype changed, a hook or parametrization registered)."""
        engine = self._engine
        if engine.signature(self.model) == self._signature:
            return engine
        self._bind_model(self.model, self._backend)
        params = self._engine.params()
        if not self._rates.fit(params):
            raise ValueError(f"{self._owner}: the model's parameters changed since it was built, but "
                             f"lr_mode={self.lr_mode!r} learns a rate for each parameter it had; build a new "
                             f"{self._owner} for the changed model")
        weights = getattr(self, "step_weights", None)
        if weights is not None and (weights.dtype, weights.device) != (params[0].dtype, params[0].device):
            self.step_weights = weights.to(device=params[0].device, dtype=params[0].dtype)
        return self._engine

    # What the engine derived from the model.
    engine = property(lambda self: self._engine.name, doc="the engine's name: 'fused_mlp' or 'generic'")
    backend = property(lambda self: self._backend, doc="the backend asked for at construction")
    loss = property(lambda self: self._loss)
    activation = property(lambda self: getattr(self._engine, "activation", None),
                          doc="the fused MLP engine's activation (None on the generic engine)")
    act_param = property(lambda self: getattr(self._engine, "act_param", None))
    _layers = property(lambda self: getattr(self._engine, "layers", None))

    def _params(self) -> List[Tensor]:
        return self._engine.params()

    @property
    def inner_lr(self) -> float:
        """The inner step size (of lr_mode "fixed"; the initial value of learned rates). Read by every call, so an
        assignment takes effect at the next one."""
        return self._rates.value

    @inner_lr.setter
    def inner_lr(self, value: float) -> None:
        self._rates.value = float(value)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # --- the checks every engine shares (the engine checks shapes, dtypes and labels: check_pair) ----------------

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
        """An input pair of `method`: tensors on the model's device, shaped for the engine (its check_pair), and
        (unless the caller checks that for all its inputs at once) finite."""
        device = self._engine.params()[0].device
        for name, t in ((x_name, x), (y_name, y)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{self._owner}.{method}: {name} must be a tensor, got {type(t).__name__}")
            if t.device != device:
                raise ValueError(f"{self._owner}.{method}: {name} is on {t.device} but the model is on {device}")
        self._engine.check_pair(f"{self._owner}.{method}", x, y, x_name, y_name)
        if finite:
            self._check_finite(method, ((x_name, x), (y_name, y)))

    def predict(self, adapted: Sequence[Tensor], x: Tensor) -> Tensor:
        """Each task's model output with its adapted parameters: x [T, K, *in] -> [T, K, *out]."""
        engine = self._current_engine()
        params = engine.params()
        adapted = list(adapted)
        if len(adapted) != len(params):
            raise ValueError(f"{self._owner}.predict: adapted must hold one tensor per parameter ({len(params)}), "
                             f"got {len(adapted)}")
        engine.check_predict_input(f"{self._owner}.predict", x)
        tasks = x.shape[0]
        for i, (a, p) in enumerate(zip(adapted, params)):
            if not isinstance(a, Tensor) or list(a.shape) != [tasks, *p.shape]:
                shape = list(a.shape) if isinstance(a, Tensor) else type(a).__name__
                raise ValueError(f"{self._owner}.predict: adapted[{i}] must be [T, *S_{i}] = {[tasks, *p.shape]} "
                                 f"(T from x), got {shape}")
            if a.device != x.device or a.dtype != x.dtype:
                raise ValueError(f"{self._owner}.predict: adapted[{i}] is {a.dtype} on {a.device} but x is "
                                 f"{x.dtype} on {x.device}")
        with engine.guard():
            return engine.predict(adapted, x)


def _refuse_setting(owner: str, name: str, value) -> None:
    raise AttributeError(f"{owner}.{name} is fixed when it is built (its rates, step weights and engine follow from "
                         f"it); build a new {owner}(..., {name}={value!r}) instead")


def _fixed_setting(name: str) -> property:
    """A setting fixed at construction (other state is built from it): reading it is free, assigning it says so."""
    return property(lambda self: self.__dict__["_" + name],
                    lambda self, value: _refuse_setting(self._owner, name, value))


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
        if not callable(loss) and loss not in OUTPUT_LOSSES:
            raise ValueError(f"{self._owner}: loss must be one of {list(OUTPUT_LOSSES)} or a callable "
                             f"loss_fn(output, target), got {loss!r} (a Gaussian policy's loss, whose log_std is a "
                             f"parameter outside the model, runs on mamlext.ops.mlp_maml(loss='gaussian') or "
                             f"mamlext.rl)")
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
        dtype = self._params()[0].dtype
        if abs(inner_lr) > torch.finfo(dtype).max:
            raise ValueError(f"{self._owner}: inner_lr must be finite in the model's dtype {dtype}, got {inner_lr!r}")
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
        _refuse_setting(self._owner, "lr_mode", mode)

    # --- MAML ----------------------------------------------------------------------------------------------------

    def meta_loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, support_weights: Optional[Tensor] = None,
                  query_weights: Optional[Tensor] = None) -> Tensor:
        """The mean over tasks of the query loss after the inner loop (MAML++: the step_weights-weighted sum of the
        query losses after each step). Its backward puts the exact meta-gradient into model.parameters() and
        inner_lrs (no gradient flows to the data). The per-task losses are kept in ``last_task_losses``.

        xs [T, K, in], ys [T, K, out] (mse) or [T, K] int64 (ce); xq [T, Kq, in], yq likewise.
        support_weights [T, K], query_weights [T, Kq] (optional, fused MLP engine): each row's loss times its weight
        before the mean, as mamlext.ops.mlp_maml; with "ce" and advantages as weights, the inner step is a
        categorical policy's policy-gradient step and the meta-loss its query surrogate."""
        engine = self._current_engine()
        args = (xs, ys, xq, yq, self._inner_steps, self._rates, self.step_weights, self._multi_step, self.first_order)
        row_weights = dict(support_weights=support_weights, query_weights=query_weights)
        if isinstance(xs, Tensor) and isinstance(xq, Tensor) and engine.inputs_checked_by_kernel(xs) \
                and xq.numel() > 0:
            try:  # the kernel checks every input as it reads it; this class's checks only word what it refused
                mean, losses = engine.meta_loss(*args, **row_weights)
            except (ValueError, TypeError, RuntimeError):
                self._check_support_query(xs, ys, xq, yq)
                self._check_row_weights("meta_loss", (("support_weights", support_weights, xs),
                                                      ("query_weights", query_weights, xq)))
                raise
        else:
            with engine.guard():
                self._check_support_query(xs, ys, xq, yq)
                self._check_row_weights("meta_loss", (("support_weights", support_weights, xs),
                                                      ("query_weights", query_weights, xq)))
                mean, losses = engine.meta_loss(*args, **row_weights)
        self.last_task_losses = losses.detach()
        return mean

    def _check_row_weights(self, method: str, named: Sequence[Tuple[str, Optional[Tensor], Tensor]]) -> None:
        """Each (name, weights, x) with weights given: a finite tensor [T, K] of x's rows, in the model's dtype and on
        its device."""
        like = self._engine.params()[0]
        for name, w, x in named:
            if w is None:
                continue
            if not isinstance(w, Tensor):
                raise TypeError(f"{self._owner}.{method}: {name} must be a tensor or None, got {type(w).__name__}")
            if list(w.shape) != list(x.shape[:2]):
                raise ValueError(f"{self._owner}.{method}: {name} must be [T, K] = {list(x.shape[:2])} (one weight per "
                                 f"row), got {list(w.shape)}")
            if (w.dtype, w.device) != (like.dtype, like.device):
                raise ValueError(f"{self._owner}.{method}: {name} must have the model's dtype {like.dtype} on "
                                 f"{like.device}, got {w.dtype} on {w.device}")
            self._check_finite(method, ((name, w),))

    def adapt(self, xs: Tensor, ys: Tensor, steps: Optional[int] = None,
              support_weights: Optional[Tensor] = None) -> List[Tensor]:
        """Per-task adapted parameters after `steps` (default inner_steps) inner SGD steps on the support set:
        P tensors [T, *S_i], without a graph (for evaluation). per_layer_step rates beyond inner_steps stay at the
        last step's rate. support_weights: as in meta_loss."""
        engine = self._current_engine()
        steps = self._inner_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{self._owner}.adapt: steps must be an int >= 0, got {steps!r}")
        with engine.guard():
            self._check_pair("adapt", xs, ys, "xs", "ys")
            self._check_row_weights("adapt", (("support_weights", support_weights, xs),))
            return engine.adapt(xs, ys, steps, self._rates, support_weights=support_weights)

    def extra_repr(self) -> str:
        engine = f"activation={self.activation!r}" if self.engine == "fused_mlp" else f"memory={self.memory!r}"
        return (f"engine={self.engine!r}, {engine}, loss={self.loss!r}, "
                f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, first_order={self.first_order}, "
                f"lr_mode={self.lr_mode!r}")
