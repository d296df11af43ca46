"""The engines that run task-batched MAML, behind one interface, and the one place that picks an engine for a model.

An engine is bound to one model and computes with the model's parameters as they are at each call:

    name                          "fused_mlp" or "generic"
    signature(model) -> tuple     a cheap fingerprint of what the engine derived from the model; when it changes,
                                  the algorithm on top binds a new engine (select_engine)
    params() -> [Tensor]          the meta-parameters, in the engine's order
    guard()                       a context manager around every call (the generic engine's ModelGuard)
    inputs_checked_by_kernel(x)   whether meta_loss's kernel checks every input itself (then the algorithm's own
                                  checks run only to word an error the kernel raised)
    check_pair(where, x, y, ...)  shapes, dtypes and labels of an input pair, errors prefixed with `where`
    check_predict_input(where, x)
    meta_loss(xs, ys, xq, yq, steps, rates, step_weights, multi_step, first_order, support_weights=None,
              query_weights=None) -> (mean, per-task losses)
    adapt(xs, ys, steps, rates, support_weights=None) -> per-task parameters [T, *S_i]
                                  (support_weights, query_weights: [T, K] weights of the loss's rows, e.g. a
                                  policy gradient's advantages; the fused MLP engine takes them, the generic engine
                                  refuses them)
    predict(adapted, x) -> [T, K, *out]

The algorithms (BatchedMAML, ANIL, Reptile, iMAML) own the rates, the step weights and the checks every engine
shares (tensor types, devices, finite values).
"""
from typing import Callable, List, Optional, Sequence, Tuple, Union

from torch import nn

from mamlext.engines.fused_mlp import FusedMLPEngine
from mamlext.engines.generic import GenericEngine, LossFn
from mamlext.engines.mlp_spec import UnsupportedModel, parse_mlp

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


# The engines, tried in order by backend="auto": (name, the backend that selects it explicitly, parser, factory).
_ENGINES: List[Tuple[str, str, Callable, Callable]] = [
    ("fused_mlp", "fused", parse_mlp,
     lambda model, spec, loss, owner, memory, task_chunk: FusedMLPEngine(model, spec, loss, owner)),
    ("generic", "generic", parse_generic,
     lambda model, spec, loss, owner, memory, task_chunk: GenericEngine(model, loss, owner, memory, task_chunk)),
]


def select_engine(model: nn.Module, backend: str, owner: str = "BatchedMAML", loss: Union[str, LossFn] = "mse",
                  engines: Sequence[str] = ("fused_mlp", "generic"), memory: str = "graph",
                  task_chunk: Optional[int] = None):
    """The engine bound to the model for the backend, among the engines the caller can use; the one place that
    decides. owner names the caller in the error messages; memory and task_chunk configure the generic engine."""
    backends = ["auto"] + [b for name, b, _, _ in _ENGINES if name in engines]
    if backend not in backends:
        raise ValueError(f"{owner}: backend must be one of {backends}, got {backend!r}")
    reasons = []
    for name, engine_backend, parse, make in _ENGINES:
        if name not in engines or backend not in ("auto", engine_backend):
            continue
        try:
            spec = parse(model, loss)
        except UnsupportedModel as error:
            if backend != "auto":
                raise ValueError(f"{owner}(backend={backend!r}): the {name} engine cannot serve this model: "
                                 f"{error}") from None
            reasons.append(f"{name}: {error}")
            continue
        return make(model, spec, loss, owner, memory, task_chunk)
    raise ValueError(f"{owner}: no engine serves this model ({'; '.join(reasons)})")
