"""MLPs and random task batches shared by the tests of the fused MLP engines."""
import torch
from torch import nn

ACT_MODULES = {"relu": lambda: nn.ReLU(), "leaky_relu": lambda: nn.LeakyReLU(0.1), "tanh": lambda: nn.Tanh(),
               "sigmoid": lambda: nn.Sigmoid(), "gelu": lambda: nn.GELU(), "elu": lambda: nn.ELU(0.7)}


def mlp(widths, act):
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i + 2 < len(widths):
            layers.append(ACT_MODULES[act]())
    return nn.Sequential(*layers)


def make_tasks(widths, tasks, shots, queries, loss, dtype, device, gen):
    def pair(rows):
        x = torch.randn(tasks, rows, widths[0], generator=gen, dtype=torch.float64)
        if loss == "mse":
            y = torch.randn(tasks, rows, widths[-1], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        else:
            y = torch.randint(0, widths[-1], (tasks, rows), generator=gen).to(device)
        return x.to(device=device, dtype=dtype), y
    return (*pair(shots), *pair(queries))
