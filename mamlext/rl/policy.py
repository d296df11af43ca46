"""Policies for meta-RL: an MLP whose output is a diagonal Gaussian's mean (with a learned, state-independent log
standard deviation) or a categorical distribution's logits, and the task-batched math of their loss, gradient,
Hessian-vector product and Fisher-vector product (mamlext.rl.passes).

A policy's parameters are a list ``[W_0, b_0, ..., W_{L-1}, b_{L-1}]`` (+ ``[log_std]`` for the Gaussian), as
``policy.param_list()`` gives them; in the task-batched math each entry is either shared by the T tasks (the policy's
own shape) or per task (a leading dimension T), like the fused MLP ops' parameters.
"""
import math
from typing import List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor, nn

ACTIVATIONS = ("relu", "tanh")
DISTRIBUTIONS = ("gaussian", "categorical")


class PolicySpec(NamedTuple):
    """What the task-batched math needs to know of a policy: the layer widths (observation width first, action
    width last), the hidden activation and the action distribution."""
    widths: Tuple[int, ...]
    activation: str
    distribution: str

    @property
    def layers(self) -> int:
        return len(self.widths) - 1

    @property
    def action_dim(self) -> int:
        return self.widths[-1]

    def shapes(self) -> List[Tuple[int, ...]]:
        """The parameters' shapes, in order."""
        shapes: List[Tuple[int, ...]] = []
        for fan_in, fan_out in zip(self.widths[:-1], self.widths[1:]):
            shapes += [(fan_out, fan_in), (fan_out,)]
        if self.distribution == "gaussian":
            shapes.append((self.action_dim,))
        return shapes


def _check_widths(name: str, observation_dim: int, action_dim: int, hidden: Sequence[int]) -> Tuple[int, ...]:
    widths = (observation_dim, *hidden, action_dim)
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise ValueError(f"{name}: observation_dim, hidden sizes and action_dim must be integers >= 1, got "
                         f"observation_dim={observation_dim!r}, hidden={tuple(hidden)!r}, action_dim={action_dim!r}")
    return widths


class _MLPPolicy(nn.Module):
    distribution = ""

    def __init__(self, observation_dim: int, action_dim: int, hidden: Sequence[int], activation: str):
        super().__init__()
        name = type(self).__name__
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        widths = _check_widths(name, observation_dim, action_dim, hidden)
        self.spec = PolicySpec(widths, activation, self.distribution)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        # rllab's and pytorch-maml-rl's initialisation: Xavier-uniform weights, zero biases
        for layer in self.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def param_list(self) -> List[nn.Parameter]:
        """The parameters in the order of the task-batched math (``parameters()`` lists log_std first)."""
        params = [p for layer in self.layers for p in (layer.weight, layer.bias)]
        return params + ([self.log_std] if self.spec.distribution == "gaussian" else [])

    def network(self, observations: Tensor) -> Tensor:
        h = observations
        act = torch.relu if self.spec.activation == "relu" else torch.tanh
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i + 1 < len(self.layers):
                h = act(h)
        return h


class GaussianMLPPolicy(_MLPPolicy):
    """A diagonal Gaussian policy: mean = MLP(observation), log standard deviation a learned vector (rllab's
    GaussianMLPPolicy with a state-independent std, the MAML paper's policy). ``init_std`` as rllab (1.0)."""

    distribution = "gaussian"

    def __init__(self, observation_dim: int, action_dim: int, hidden: Sequence[int] = (100, 100),
                 activation: str = "relu", init_std: float = 1.0):
        super().__init__(observation_dim, action_dim, hidden, activation)
        if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"GaussianMLPPolicy: init_std must be a finite number > 0, got {init_std!r}")
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(init_std)))

    def forward(self, observations: Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.network(observations), self.log_std.exp())


class CategoricalMLPPolicy(_MLPPolicy):
    """A categorical policy over ``num_actions`` discrete actions: logits = MLP(observation)."""

    distribution = "categorical"

    def __init__(self, observation_dim: int, num_actions: int, hidden: Sequence[int] = (100, 100),
                 activation: str = "relu"):
        super().__init__(observation_dim, num_actions, hidden, activation)

    def forward(self, observations: Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.network(observations))
