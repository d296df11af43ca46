"""A scan over torch.nn's layers: on the generic engine (memory "graph" and "low") and in ANIL (the layer in the
adapted head, and in the backbone), each gives the per-task autograd loop's meta-gradient (float64, rel 1e-8) or
an error, never a silent wrong answer.

vmap differentiates some fused kernels wrongly twice (F.batch_norm, F.instance_norm, F.layer_norm with an affine
weight: their double-backward batching rules); the engine replaces those in its twice-differentiated forwards.
A layer added to PyTorch, or a PyTorch release that changes a batching rule, shows up here. (weight_norm is pinned
against finite differences in test_model_rules.py: PyTorch's own second derivative of it is wrong, so the per-task
loop is no oracle for it.)"""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mamlext
from test_fuzz import assert_unchanged, loop_meta_loss, snapshot

STEPS, LR, TASKS, ROWS, CLASSES = 2, 0.3, 2, 4, 3


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x)[0]


def _upsampled(pool):
    return nn.Sequential(pool, nn.Upsample(scale_factor=2))


# name -> (layer factory, its input: "vector" [K, 4], "sequence" [K, 3, 4] or "image" [K, 2, 4, 4]); the layer keeps
# its input's shape (GLU halves the last dimension).
LAYERS = {
    "LayerNorm": (lambda: nn.LayerNorm(4), "vector"),
    "LayerNorm(no affine)": (lambda: nn.LayerNorm(4, elementwise_affine=False), "vector"),
    "LayerNorm(no bias)": (lambda: nn.LayerNorm(4, bias=False), "vector"),
    "RMSNorm": (lambda: nn.RMSNorm(4), "vector"),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), "vector"),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(4), "vector"),
    "BatchNorm1d(no running stats)": (lambda: nn.BatchNorm1d(4, track_running_stats=False), "vector"),
    "ReLU6": (nn.ReLU6, "vector"), "PReLU": (nn.PReLU, "vector"), "SELU": (nn.SELU, "vector"),
    "CELU": (nn.CELU, "vector"), "GELU(tanh)": (lambda: nn.GELU("tanh"), "vector"), "SiLU": (nn.SiLU, "vector"),
    "Mish": (nn.Mish, "vector"), "Hardswish": (nn.Hardswish, "vector"), "Hardtanh": (nn.Hardtanh, "vector"),
    "Hardsigmoid": (nn.Hardsigmoid, "vector"), "Softplus": (nn.Softplus, "vector"),
    "Softsign": (nn.Softsign, "vector"), "Tanhshrink": (nn.Tanhshrink, "vector"),
    "Softshrink": (nn.Softshrink, "vector"), "Hardshrink": (nn.Hardshrink, "vector"),
    "LogSigmoid": (nn.LogSigmoid, "vector"), "Softmax": (lambda: nn.Softmax(-1), "vector"),
    "LogSoftmax": (lambda: nn.LogSoftmax(-1), "vector"), "Softmin": (lambda: nn.Softmin(-1), "vector"),
    "Threshold": (lambda: nn.Threshold(0.1, 0.0), "vector"), "ELU": (nn.ELU, "vector"),
    "LeakyReLU": (nn.LeakyReLU, "vector"), "Dropout(p=0)": (lambda: nn.Dropout(0.0), "vector"),
    "Dropout": (lambda: nn.Dropout(0.5), "vector"), "GLU": (nn.GLU, "vector"),
    "MultiheadAttention": (SelfAttention, "sequence"),
    "TransformerEncoderLayer": (lambda: nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True),
                                "sequence"),
    "LayerNorm(sequence)": (lambda: nn.LayerNorm(4), "sequence"),
    "InstanceNorm1d": (lambda: nn.InstanceNorm1d(3, affine=True), "sequence"),
    "InstanceNorm1d(running stats)": (lambda: nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
                                      "sequence"),
    "Conv1d": (lambda: nn.Conv1d(3, 3, 3, padding=1), "sequence"),
    "Conv2d": (lambda: nn.Conv2d(2, 2, 3, padding=1), "image"),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(2), "image"),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(2, affine=True), "image"),
    "GroupNorm(image)": (lambda: nn.GroupNorm(1, 2), "image"),
    "LayerNorm(image)": (lambda: nn.LayerNorm([2, 4, 4]), "image"),
    "LocalResponseNorm": (lambda: nn.LocalResponseNorm(2), "image"),
    "MaxPool2d": (lambda: _upsampled(nn.MaxPool2d(2)), "image"),
    "AvgPool2d": (lambda: _upsampled(nn.AvgPool2d(2)), "image"),
    "AdaptiveMaxPool2d": (lambda: _upsampled(nn.AdaptiveMaxPool2d(2)), "image"),
    "LPPool2d": (lambda: _upsampled(nn.LPPool2d(2, 2)), "image"),
    "Upsample(bilinear)": (lambda: nn.Sequential(nn.AvgPool2d(2), nn.Upsample(scale_factor=2, mode="bilinear")),
                           "image"),
    "ReflectionPad2d": (lambda: nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2, 2, 3)), "image"),
    "ReplicationPad2d": (lambda: nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(2, 2, 3)), "image"),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(2, 2, 3, padding=1), "image"),
    "PixelShuffle": (lambda: nn.Sequential(nn.Conv2d(2, 8, 1), nn.PixelShuffle(2), nn.AvgPool2d(2)), "image"),
}
INPUTS = {"vector": (2,), "sequence": (3, 2), "image": (1, 4, 4)}


def backbone_and_head(name):
    """A model around the layer, split into the part before the layer and the rest (ANIL adapts the rest):
    Linear/Conv -> layer -> Tanh -> Linear."""
    factory, kind = LAYERS[name]
    layer = factory()
    if kind == "vector":
        width = 2 if name == "GLU" else 4
        return nn.Linear(2, 4), nn.Sequential(layer, nn.Tanh(), nn.Linear(width, CLASSES))
    if kind == "sequence":
        return nn.Linear(2, 4), nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(12, CLASSES))
    return nn.Conv2d(1, 2, 3, padding=1), nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(32, CLASSES))


def oracle(model, data):
    """The per-task loop's meta-gradient, or the error it raises (a layer PyTorch cannot differentiate twice)."""
    twin = copy.deepcopy(model)
    try:
        loss = loop_meta_loss(twin, lambda i, step: LR, data, STEPS, False, F.cross_entropy, [0.0] * (STEPS - 1) + [1.0])
        return torch.autograd.grad(loss, list(twin.parameters()))
    except RuntimeError as error:
        return error


ALGORITHMS = ("generic graph", "generic low", "ANIL head", "ANIL backbone")


def run(algorithm, backbone, head, data):
    """The meta-gradient of Sequential(backbone, head)'s parameters by the algorithm, on copies."""
    backbone, head = copy.deepcopy(backbone), copy.deepcopy(head)
    model = nn.Sequential(backbone, head)
    if algorithm.startswith("generic"):
        algo = mamlext.BatchedMAML(model, inner_lr=LR, inner_steps=STEPS, loss="ce", backend="generic",
                                   memory=algorithm.split()[1])
    else:
        algo = mamlext.ANIL(backbone, head, inner_lr=LR, inner_steps=STEPS, loss="ce")
    before = snapshot(model)
    algo.meta_loss(*data).backward()
    assert_unchanged(model, before, algorithm)
    return [p.grad for p in model.parameters()]


def anil_oracle(backbone, head, data):
    """ANIL's per-task loop: the backbone's features, then MAML on the head alone."""
    backbone, head = copy.deepcopy(backbone), copy.deepcopy(head)
    xs, ys, xq, yq = data
    features = [torch.stack([backbone(x[t]) for t in range(x.shape[0])]) for x in (xs, xq)]
    try:
        loss = loop_meta_loss(head, lambda i, step: LR, (features[0], ys, features[1], yq), STEPS, False,
                              F.cross_entropy, [0.0] * (STEPS - 1) + [1.0])
        return torch.autograd.grad(loss, [*backbone.parameters(), *head.parameters()])
    except RuntimeError as error:
        return error


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_gives_the_loops_meta_gradient_or_an_error(name, algorithm):
    torch.manual_seed(0)
    backbone, head = backbone_and_head(name)
    backbone, head = backbone.double(), head.double()
    if algorithm == "ANIL backbone":  # the layer in the backbone, a Linear head
        backbone, head = nn.Sequential(backbone, head[:-1]), head[-1:]
    shape = INPUTS[LAYERS[name][1]]
    data = (torch.randn(TASKS, ROWS, *shape, dtype=torch.float64), torch.randint(0, CLASSES, (TASKS, ROWS)),
            torch.randn(TASKS, ROWS, *shape, dtype=torch.float64), torch.randint(0, CLASSES, (TASKS, ROWS)))
    want = oracle(nn.Sequential(backbone, head), data) if algorithm.startswith("generic") \
        else anil_oracle(backbone, head, data)
    if isinstance(want, Exception):  # PyTorch itself cannot differentiate the loop: the engine must refuse too
        with pytest.raises(RuntimeError):
            run(algorithm, backbone, head, data)
        return
    try:
        got = run(algorithm, backbone, head, data)
    except RuntimeError as error:  # refused: the message names the layer's module
        assert "module" in str(error), f"{name}, {algorithm}: {error}"
        assert name == "Dropout", f"{name}, {algorithm}: refused: {error}"  # random: vmap refuses it
        return
    for g, w in zip(got, want):
        scale = max(w.abs().max().item(), 1e-3)
        assert (g - w).abs().max().item() <= 1e-8 * scale, \
            f"{name}, {algorithm}: off by {(g - w).abs().max().item():.3g} (scale {scale:.3g})"
