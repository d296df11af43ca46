"""The fused MLP engine: task-batched MAML of an nn.Sequential of Linear layers on mamlext's fused ops.

All T tasks run in one ``ops.mlp_maml`` call (inner steps, query loss and the exact meta-gradient by the reverse
recursion with analytic Hessian-vector products); ``adapt`` runs ``ops.mlp_loss_grad`` + ``ops.task_sgd``; predict
the layers themselves. Which models it serves is decided in mamlext.engines.mlp_spec.

On the CPU the kernel checks every input as it reads it (shapes, dtypes, class indices, finite values), so the
engine runs no checks of its own before it: ``inputs_checked_by_kernel`` tells the algorithm on top, which then
runs its own checks only to word an error the kernel raised.
"""
import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mamlext import ops, reference
from mamlext._checks import check_class_indices
from mamlext.engines.mlp_spec import MLPSpec, mlp_signature
from mamlext.rates import InnerRates


class FusedMLPEngine:
    name = "fused_mlp"
    signature = staticmethod(mlp_signature)

    def __init__(self, model: nn.Module, spec: MLPSpec, loss: str, owner: str):
        self.model, self.loss, self.owner = model, loss, owner
        self.layers = spec.layers
        self.activation, self.act_param = spec.activation, spec.act_param
        self.codes = ops.mlp_codes(owner, spec.activation, spec.act_param, loss)
        # The parameter objects, in the ops' order: valid as long as the model's signature is (it holds their
        # identities, dtypes, devices and shapes).
        self._params = [p for layer in spec.layers for p in (layer.weight, layer.bias)]

    def params(self) -> List[Tensor]:
        return list(self._params)

    def guard(self):
        return contextlib.nullcontext()  # the fused ops never write into the model

    def inputs_checked_by_kernel(self, x: Tensor) -> bool:
        """Whether mlp_maml checks every input (values included) as it reads them: on the CPU, for non-empty
        inputs (an empty task set or task is the algorithm's to refuse)."""
        return x.device.type == "cpu" and x.numel() > 0

    # --- checks (the algorithm on top checks types, devices and finite values) ------------------------------------

    def check_pair(self, where: str, x: Tensor, y: Tensor, x_name: str, y_name: str) -> None:
        """x [T, K, in], y [T, K, out] (mse) or int64 [T, K] with indices in [0, out) (ce), the model's dtype."""
        in_f, out_f = self.layers[0].in_features, self.layers[-1].out_features
        like = self._params[0]
        if x.dim() != 3:
            raise ValueError(f"{where}: {x_name} must be [T, K, in] = [T, K, {in_f}] (3 dimensions), got "
                             f"{list(x.shape)}")
        if x.shape[2] != in_f:
            raise ValueError(f"{where}: {x_name} must be [T, K, in] with in = {in_f} (the model's in_features), got "
                             f"{list(x.shape)}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{where}: {x_name} must hold T >= 1 tasks of K >= 1 rows, got {list(x.shape)}")
        if x.dtype != like.dtype:
            raise ValueError(f"{where}: {x_name} has dtype {x.dtype} but the model's parameters are {like.dtype}")
        tasks, rows = x.shape[:2]
        if self.loss == "mse":
            if y.shape != (tasks, rows, out_f):
                raise ValueError(f"{where}: {y_name} must be [T, K, out] = {[tasks, rows, out_f]} for loss 'mse' "
                                 f"({x_name} is {list(x.shape)}), got {list(y.shape)}")
            if y.dtype != like.dtype:
                raise ValueError(f"{where}: {y_name} has dtype {y.dtype} but the model's parameters are "
                                 f"{like.dtype} (loss 'mse')")
            return
        if y.dtype != torch.int64:
            raise ValueError(f"{where}: {y_name} must hold int64 class indices for loss 'ce', got dtype {y.dtype}")
        if y.shape != (tasks, rows):
            raise ValueError(f"{where}: {y_name} must be [T, K] = {[tasks, rows]} for loss 'ce' ({x_name} is "
                             f"{list(x.shape)}), got {list(y.shape)}")
        check_class_indices(where, y_name, y, out_f)

    def check_predict_input(self, where: str, x) -> None:
        in_f = self.layers[0].in_features
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != in_f:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{where}: x must be [T, K, in] with in = {in_f}, got {shape}")

    # --- MAML ----------------------------------------------------------------------------------------------------

    def meta_loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, steps: int, rates: InnerRates,
                  step_weights: Tensor, multi_step: bool, first_order: bool, support_weights: Optional[Tensor] = None,
                  query_weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(mean query loss, per-task losses [T]); the mean's backward is the exact meta-gradient."""
        params = self._params
        # Plain MAML's weights on the CPU: the layerwise CUDA kernels then skip the unweighted query passes without
        # reading the weights back from the GPU.
        weights = step_weights if multi_step else ops.last_step_weights(steps, params[0].dtype)
        lrs = rates.of_every_step(params, steps)
        if support_weights is None and query_weights is None:
            return ops.mlp_maml_mean(params, xs, ys, xq, yq, lrs, weights, first_order, *self.codes)
        # the rows' weights: mlp_maml itself (mlp_maml_mean's binding takes none)
        losses = ops.mlp_maml(params, xs, ys, xq, yq, lrs, weights, first_order, self.activation, self.act_param,
                              self.loss, support_weights, query_weights)[0]
        return losses.mean(), losses

    def adapt(self, xs: Tensor, ys: Tensor, steps: int, rates: InnerRates,
              support_weights: Optional[Tensor] = None) -> List[Tensor]:
        params = self._params
        tasks = xs.shape[0]
        with torch.no_grad():
            current = [p.detach().unsqueeze(0).expand(tasks, *p.shape).clone() for p in params]
            for step in range(steps):
                _, grads = ops.mlp_loss_grad(current, xs, ys, self.activation, self.act_param, self.loss,
                                             weights=support_weights)
                current = ops.task_sgd(current, grads, rates.at(step, params))
        return current

    def predict(self, adapted: Sequence[Tensor], x: Tensor) -> Tensor:
        return reference.mlp_forward(list(adapted), x, self.codes[0], self.act_param)
