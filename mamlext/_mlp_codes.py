"""Integer codes of the fused MLP ops' activation and loss arguments: the only place they are defined in Python.

They must agree with the enums in csrc/common/activations.h and csrc/common/losses.h.
"""
ACTIVATIONS = {"relu": 0, "leaky_relu": 1, "tanh": 2, "sigmoid": 3, "gelu": 4, "elu": 5}
LOSSES = {"mse": 0, "ce": 1, "gaussian": 2}
# The losses with a parameter of their own after the layers' (gaussian: the log standard deviations [out]), and
# those of a model's output alone (what a model-level learner such as BatchedMAML takes by name).
LOSSES_WITH_PARAM = ("gaussian",)
OUTPUT_LOSSES = ("mse", "ce")

ACTIVATION_NAMES = {code: name for name, code in ACTIVATIONS.items()}
LOSS_NAMES = {code: name for name, code in LOSSES.items()}

# act_param when none is given: nn.LeakyReLU's negative_slope and nn.ELU's alpha; ignored by the others.
DEFAULT_ACT_PARAM = {"relu": 0.0, "leaky_relu": 0.01, "tanh": 0.0, "sigmoid": 0.0, "gelu": 0.0, "elu": 1.0}

# The most Linear layers the fused MLP kernels take (kMlpMaxLayers, csrc/common/mlp_passes.h).
MAX_LAYERS = 16
