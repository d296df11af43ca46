"""The models of Finn et al. 2017's experiments: the sinusoid MLP and the Omniglot Conv4."""
from torch import nn


def sine_mlp(hidden: int = 40) -> nn.Sequential:
    """The sinusoid regressor: 1-hidden-hidden-1 with ReLU (1-40-40-1 in the paper). An nn.Sequential of Linear
    layers, so BatchedMAML's fused MLP engine serves it."""
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"sine_mlp: hidden must be an int >= 1, got {hidden!r}")
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def conv4(ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> nn.Sequential:
    """The Omniglot classifier of MAML: 4 x [Conv2d 3x3 (padding 1), BatchNorm2d, ReLU, MaxPool2d(2)], then a
    Linear layer to ``ways`` logits. BatchNorm uses the statistics of the batch it sees (transductive, as in the
    paper's code) and keeps no running statistics, so a model in train or eval mode computes the same thing.

    28x28 inputs end up 1x1 after four 2x2 poolings (28 -> 14 -> 7 -> 3 -> 1), so the head is Linear(hidden, ways).
    """
    for name, value, low in (("ways", ways, 2), ("in_channels", in_channels, 1), ("hidden", hidden, 1),
                             ("image_size", image_size, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"conv4: {name} must be an int >= {low}, got {value!r}")
    layers = []
    channels = in_channels
    for _ in range(4):
        layers += [nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                   nn.BatchNorm2d(hidden, track_running_stats=False),
                   nn.ReLU(),
                   nn.MaxPool2d(2)]
        channels = hidden
    layers += [nn.Flatten(), nn.Linear(hidden * (image_size // 16) ** 2, ways)]
    return nn.Sequential(*layers)
