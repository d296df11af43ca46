"""ANIL (Raghu, Raghu, Bengio and Vinyals 2020, "Rapid Learning or Feature Reuse?"): MAML whose inner loop adapts
only the head, over a whole batch of tasks at once.

    anil = mamlext.ANIL(backbone, nn.Linear(64, 5), inner_lr=0.4, inner_steps=1, loss="ce")
    loss = anil.meta_loss(xs, ys, xq, yq)   # xs [T, K, *input shape], ys [T, K] int64 (ce) or [T, K, out] (mse)
    loss.backward()                         # meta-gradients reach the backbone and the head (and inner_lrs)
    out = anil.predict(anil.adapt(xs, ys), xq)

The backbone's features of every task are computed once per call by ordinary autograd (vmap over tasks, so that
BatchNorm normalizes each task with its own statistics, as a per-task loop does); the head's inner loop and
second-order meta-gradient run on BatchedMAML's generic engine in memory="graph" mode, which is what lets the
meta-gradient flow back into the features and the backbone (the fused MLP kernels give no gradient to their inputs).
"""
from typing import List, Optional, Sequence, Union

from torch import Tensor, nn

from mamlext.batched import BatchedMAML
from mamlext.engines.generic import GenericEngine, LossFn


class _Head(BatchedMAML):
    """ANIL's head: a BatchedMAML whose errors name ANIL."""
    _display_name = "ANIL"


class ANIL(nn.Module):
    """Args:
        backbone: any nn.Module mapping one task's inputs [K, *input shape] to features [K, F]; meta-learned by the
            outer loop only.
        head: any nn.Module mapping features [K, F] to outputs; adapted in the inner loop.
        inner_lr, inner_steps, first_order, loss, lr_mode, step_weights: as in mamlext.BatchedMAML (for the head).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, loss: Union[str, LossFn] = "ce", lr_mode: str = "fixed",
                 step_weights: Optional[Sequence[float]] = None):
        super().__init__()
        for name, module in (("backbone", backbone), ("head", head)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"ANIL: {name} must be an nn.Module, got {type(module).__name__}")
        self.backbone = backbone
        self.head = _Head(head, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order, loss=loss,
                                lr_mode=lr_mode, step_weights=step_weights, backend="generic", memory="graph")
        self._backbone = GenericEngine(backbone, loss, "ANIL")

    @property
    def inner_lrs(self) -> nn.ParameterList:
        return self.head.inner_lrs

    @property
    def last_task_losses(self) -> Optional[Tensor]:
        return self.head.last_task_losses

    def features(self, x: Tensor, name: str = "x") -> Tensor:
        """The backbone on every task: x [T, K, *input shape] -> [T, K, F]."""
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 1 or x.shape[1] < 1:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"ANIL: {name} must be [T, K, *input shape] with T, K >= 1, got {shape}")
        with self._backbone.guard():
            self._backbone.validate("ANIL.features", x, None)
            return self._backbone.forward_tasks(x)

    def meta_loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        """The mean over tasks of the query loss after adapting the head; its backward puts the exact meta-gradient
        into the backbone's and the head's parameters (and inner_lrs)."""
        if isinstance(xs, Tensor) and isinstance(xq, Tensor) and xs.dim() >= 1 and xq.dim() >= 1 \
                and xs.shape[0] != xq.shape[0]:
            raise ValueError(f"ANIL.meta_loss: xs has T = {xs.shape[0]} tasks but xq has {xq.shape[0]}")
        return self.head.meta_loss(self.features(xs, "xs"), ys, self.features(xq, "xq"), yq)

    def adapt(self, xs: Tensor, ys: Tensor, steps: Optional[int] = None) -> List[Tensor]:
        """The head's per-task adapted parameters (no graph)."""
        return self.head.adapt(self.features(xs, "xs").detach(), ys, steps)

    def predict(self, adapted: Sequence[Tensor], x: Tensor) -> Tensor:
        return self.head.predict(adapted, self.features(x))
