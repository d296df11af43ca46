"""Modules whose layers run as mamlext's fused ops.

    fused = mamlext.nn.FusedMLP.from_sequential(seq)   # the same parameters as seq
    out = fused(x)                                     # x [..., in]: as seq(x), in one op

FusedMLP's forward is one fused op whose backward is one fused op and whose double backward is analytic
(ops.mlp), so ordinary autograd code that differentiates through an inner step (second-order MAML written with
higher, torch.func or by hand) builds a handful of autograd nodes per forward instead of several per layer.
mamlext.MAML runs its learners this way on every model the fused MLP engine serves.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

from torch import Tensor, nn

from mamlext import ops
from mamlext.engines.mlp_spec import UnsupportedModel, global_hooks, module_hooks, parse_mlp


class FusedMLP(nn.Module):
    """Linear layers with one activation between them and none after the last, run as one op (ops.mlp).

    Args:
        layers: the nn.Linear layers (with bias), in order; their parameters are this module's.
        activation: "relu", "leaky_relu", "tanh", "sigmoid", "gelu" (exact) or "elu".
        act_param: negative_slope of leaky_relu (default 0.01), alpha of elu (default 1.0).
    """

    def __init__(self, layers: Sequence[nn.Linear], activation: str = "relu", act_param: Optional[float] = None):
        super().__init__()
        layers = list(layers)
        for i, layer in enumerate(layers):
            if type(layer) is not nn.Linear or layer.bias is None:
                raise ValueError(f"FusedMLP: layers[{i}] must be an nn.Linear with bias, got {layer!r}")
            if i and layer.in_features != layers[i - 1].out_features:
                raise ValueError(f"FusedMLP: layers[{i}] has in_features = {layer.in_features} but layers[{i - 1}] "
                                 f"has out_features = {layers[i - 1].out_features}")
        if not layers:
            raise ValueError("FusedMLP: layers must hold at least one nn.Linear")
        self.layers = nn.ModuleList(layers)
        self.activation, self.act_param, _ = ops.mlp_codes("FusedMLP", activation, act_param, "mse")

    @classmethod
    def from_sequential(cls, model: nn.Sequential) -> "FusedMLP":
        """The FusedMLP of an nn.Sequential of nn.Linear layers with one activation kind between them (the fused
        MLP engine's rule, see mamlext.BatchedMAML), sharing its parameters; ValueError naming the layer else."""
        try:
            spec = parse_mlp(model)
        except UnsupportedModel as error:
            raise ValueError(f"FusedMLP.from_sequential: {error}") from None
        return cls(spec.layers, spec.activation, spec.act_param)

    def forward(self, x: Tensor) -> Tensor:
        return ops.mlp([p for layer in self.layers for p in (layer.weight, layer.bias)], x, self.activation,
                       self.act_param)


class FusedLayers(NamedTuple):
    """Where the Linear layers of a supported nn.Sequential sit (their indices) and its activation, for running
    it (or a clone_module copy of it) through ops.mlp."""
    indices: Tuple[int, ...]
    activation: int
    act_param: float


def fused_layers(model: nn.Module) -> Optional[FusedLayers]:
    """The model's FusedLayers when the fused MLP engine serves it, None otherwise."""
    try:
        spec = parse_mlp(model)
    except UnsupportedModel:
        return None
    ids = [id(layer) for layer in spec.layers]
    indices = tuple(i for i, module in enumerate(model) if id(module) in ids)
    activation, act_param, _ = ops.mlp_codes("FusedMLP", spec.activation, spec.act_param, "mse")
    return FusedLayers(indices, activation, act_param)


def _has_hooks(modules: List[nn.Module]) -> bool:
    return global_hooks() or any(module_hooks(m) for m in modules)


def parameter_slots(model: nn.Module, layers: FusedLayers) -> List[Tuple[dict, str]]:
    """Where the model (or a clone_module copy of it) holds its parameters, in ops.mlp's order: (the Linear
    layer's _parameters, "weight" or "bias"). Every parameter of such a model is in one of them."""
    modules = list(model._modules.values())
    return [(modules[i]._parameters, key) for i in layers.indices for key in ("weight", "bias")]


def run_fused(model: nn.Module, layers: FusedLayers, x: Tensor) -> Optional[Tensor]:
    """model(x) through ops.mlp, with the tensors the model holds now (a learner's adapted ones); None when hooks
    are registered (they must see the layers run one by one)."""
    if _has_hooks([model, *model._modules.values()]):
        return None
    params = [slot[key] for slot, key in parameter_slots(model, layers)]
    return ops.mlp(params, x, layers.activation, layers.act_param)
