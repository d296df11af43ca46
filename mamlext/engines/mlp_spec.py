"""Which models the fused MLP engine serves, decided in one place: parse_mlp (the engine's view of a model, or
UnsupportedModel naming the first layer it cannot serve) and mlp_signature (a cheap fingerprint of everything
parse_mlp's answer depends on, so that an engine re-derives its view exactly when the model changed).

The fused kernels compute Linear layers with one activation kind between them from the layers' plain parameters;
anything that changes what a layer computes or observes refuses the model, so that it runs as it is on the
generic engine (BatchedMAML) or through its own forward (mamlext.MAML): forward and backward hooks (the module's
or global), parametrizations and weight_norm, subclasses of the layer types, more than MAX_LAYERS Linear layers.
"""
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from mamlext._mlp_codes import MAX_LAYERS

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL = nn.modules.module
_GLOBAL_HOOKS = (_GLOBAL._global_forward_hooks, _GLOBAL._global_forward_pre_hooks, _GLOBAL._global_backward_hooks,
                 _GLOBAL._global_backward_pre_hooks)


def global_hooks() -> bool:
    """Whether a global module hook (nn.modules.module.register_module_*_hook) is installed."""
    return any(_GLOBAL_HOOKS)


def module_hooks(module: nn.Module) -> bool:
    """Whether the module itself has a forward, forward-pre, backward or backward-pre hook."""
    state = module.__dict__
    return any(state.get(name) for name in _HOOKS)


class UnsupportedModel(Exception):
    """Why an engine cannot serve a model: the layer index and type, and the reason."""

    def __init__(self, index: Optional[int], kind: str, reason: str):
        self.index, self.kind, self.reason = index, kind, reason
        where = f"layer {index} ({kind})" if index is not None else kind
        super().__init__(f"{where}: {reason}")


class MLPSpec(NamedTuple):
    layers: List[nn.Linear]
    activation: str
    act_param: float


def _activation_of(module: nn.Module) -> Optional[Tuple[str, float]]:
    """(name, act_param) of a supported activation module, None for any other module. Exact types only: a
    subclass may compute something else."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu", 0.0
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is nn.Tanh:
        return "tanh", 0.0
    if kind is nn.Sigmoid:
        return "sigmoid", 0.0
    if kind is nn.GELU:
        if module.approximate != "none":
            raise UnsupportedModel(None, "GELU", f"approximate={module.approximate!r} is not supported, only "
                                   "the exact GELU (approximate='none')")
        return "gelu", 0.0
    if kind is nn.ELU:
        return "elu", float(module.alpha)
    return None


def parse_mlp(model: nn.Module, loss: Union[str, object] = "mse") -> MLPSpec:
    """The fused MLP engine's view of the model, or UnsupportedModel naming the first layer it cannot serve."""
    if not isinstance(loss, str):
        raise UnsupportedModel(None, "loss", "a loss callable needs the generic engine (the fused MLP engine has "
                               "'mse' and 'ce')")
    if type(model) is not nn.Sequential:
        raise UnsupportedModel(None, type(model).__name__, "the fused MLP engine needs an nn.Sequential of "
                               "nn.Linear layers with activations between them")
    modules = list(model)
    if not modules:
        raise UnsupportedModel(None, "Sequential", "the model is empty")
    if global_hooks():
        raise UnsupportedModel(None, "Sequential", "a global module hook is installed; the fused MLP kernels do "
                               "not run the layers one by one, so hooks would not see them")
    if module_hooks(model):
        raise UnsupportedModel(None, "Sequential", "it has a hook; the fused MLP kernels do not run the model's "
                               "own forward, so hooks would not see it")
    layers: List[nn.Linear] = []
    activation: Optional[Tuple[str, float]] = None
    owner_of: Dict[int, int] = {}  # id of a parameter -> index of the first layer holding it
    for index, module in enumerate(modules):
        kind = type(module).__name__
        expect_linear = index % 2 == 0
        if module_hooks(module):
            raise UnsupportedModel(index, kind, "it has a hook; the fused MLP kernels do not run the layers one by "
                                   "one, so hooks would not see them")
        if torch.nn.utils.parametrize.is_parametrized(module) or module._modules:
            raise UnsupportedModel(index, kind, "it is parametrized (or has submodules); the fused MLP kernels "
                                   "compute the layer from its plain parameters")
        if type(module) is nn.Linear:
            if not expect_linear:
                raise UnsupportedModel(index, kind, "two Linear layers in a row: an activation must sit "
                                       "between Linear layers")
            if set(module._parameters) != {"weight", "bias"} or module._buffers:
                raise UnsupportedModel(index, kind, "its parameters are not just weight and bias (e.g. weight_norm's "
                                       "weight_g / weight_v); the fused MLP kernels compute the layer from those two")
            if module.bias is None:
                raise UnsupportedModel(index, kind, "a Linear layer without bias is not supported")
            for name in ("weight", "bias"):
                first = owner_of.setdefault(id(getattr(module, name)), index)
                if first != index:
                    raise UnsupportedModel(index, kind, f"its {name} is also layer {first}'s (a module used twice "
                                           "or a tied parameter); the fused MLP kernels need every layer to have "
                                           "parameters of its own")
            if layers and module.in_features != layers[-1].out_features:
                raise UnsupportedModel(index, kind, f"in_features = {module.in_features} but the previous Linear "
                                       f"has out_features = {layers[-1].out_features}")
            layers.append(module)
            continue
        try:
            found = _activation_of(module)
        except UnsupportedModel as error:
            raise UnsupportedModel(index, kind, error.reason) from None
        if found is None:
            raise UnsupportedModel(index, kind, "unsupported layer type; supported: Linear and one of "
                                   "ReLU, LeakyReLU, Tanh, Sigmoid, GELU(approximate='none'), ELU between them")
        if expect_linear:
            where = "as the first layer" if index == 0 else "right after another activation"
            raise UnsupportedModel(index, kind, f"an activation {where}: activations must sit between Linear layers")
        if index == len(modules) - 1:
            raise UnsupportedModel(index, kind, "an activation after the last Linear layer is not supported (the "
                                   "model must end with a Linear layer; put the activation in the loss)")
        if activation is not None and found != activation:
            raise UnsupportedModel(index, kind, f"all activations must be the same kind; this one is {found} "
                                   f"but an earlier one is {activation}")
        activation = found
    if len(layers) > MAX_LAYERS:
        raise UnsupportedModel(None, "Sequential", f"{len(layers)} Linear layers; the fused MLP kernels take at most "
                               f"{MAX_LAYERS}")
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    if {p.dtype for p in params} - {torch.float32, torch.float64} or len({p.dtype for p in params}) != 1:
        raise UnsupportedModel(None, "Sequential", f"the parameters must all be float32 or all float64, got "
                               f"{sorted({str(p.dtype) for p in params})}")
    if len({p.device for p in params}) != 1:
        raise UnsupportedModel(None, "Sequential", "the parameters must all be on one device")
    name, act_param = activation if activation is not None else ("relu", 0.0)  # one layer: no activation
    return MLPSpec(layers, name, act_param)


def mlp_signature(model: nn.Module) -> tuple:
    """A fingerprint of what parse_mlp's answer depends on: the model's type and hooks, the global hooks, each
    child's identity, type, hooks, submodules, buffers and activation settings, the identity of each child's
    parameters, and the first parameter's dtype and device (the kernels refuse parameters of mixed dtypes or
    devices, and shapes that do not chain, by name). Equal fingerprints give equal answers; computing one costs a
    few microseconds, a fraction of parse_mlp."""
    state = model.__dict__
    parts = [type(model), global_hooks(), module_hooks(model)]
    first = None
    for child in state["_modules"].values():
        c = child.__dict__
        params = c["_parameters"]
        if first is None and params:
            first = next(iter(params.values()))
        parts.append((id(child), type(child), module_hooks(child), bool(c["_modules"]), bool(c["_buffers"]),
                      c.get("negative_slope"), c.get("alpha"), c.get("approximate"),
                      *[(key, id(p)) for key, p in params.items()]))
    if first is not None:
        parts.append((first.dtype, first.device))
    return tuple(parts)
