"""The task_sgd benchmark's pieces: parameter shapes of a given total size and the implementations of
``out[i][t] = params[i][t or shared] - lr * grads[i][t]`` it compares.

  fused    mamlext.ops.task_sgd(params, grads, lr)   (the public API, called in default grad mode, as MAML does)
  loop     [p - lr * g for p, g in zip(params, grads)]
  foreach  torch._foreach_* -- per-task params: torch._foreach_add(params, grads, alpha=-lr), one multi-tensor op.
           Shared params need broadcasting, which the foreach ops only do on their per-tensor (slow) path; two
           formulations: "add(expand)" (the expand views made once, outside the timed region, favours foreach) and
           "mul+add_" (out = _foreach_mul(grads, -lr); _foreach_add_(out, params), two passes).
"""
import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

import mamlext

# Widths of consecutive layers relative to each other: uneven, like a real network's.
WIDTH_PATTERN = [1.0, 1.7, 0.6, 1.3, 0.8, 2.1, 0.9, 1.5, 1.1, 0.7]


def layer_shapes(n_tensors: int, per_task_elements: int) -> List[Tuple[int, ...]]:
    """n_tensors shapes, alternating weight matrices [out, in] and bias vectors [out] (a last vector when n is
    odd), whose sizes sum to about per_task_elements."""
    layers = max(1, n_tensors // 2)
    f = [WIDTH_PATTERN[k % len(WIDTH_PATTERN)] for k in range(layers + 1)]
    a = sum(f[k + 1] * f[k] for k in range(layers))
    b = sum(f[k + 1] for k in range(layers)) + (f[-1] if n_tensors % 2 else 0.0)
    c = (-b + math.sqrt(b * b + 4 * a * per_task_elements)) / (2 * a)  # a c^2 + b c = per_task_elements
    widths = [max(1, round(c * fk)) for fk in f]
    shapes = []
    for k in range(layers):
        shapes += [(widths[k + 1], widths[k]), (widths[k + 1],)]
    if n_tensors % 2:
        shapes.append((widths[-1],))
    return shapes[:n_tensors]


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def fmt_size(n: int) -> str:
    exp = round(math.log10(n))
    return f"1e{exp}" if 10**exp == n else str(n)


def random_inputs(shapes: Sequence[Tuple[int, ...]], tasks: int, shared: bool, generator: torch.Generator,
                  dtype: torch.dtype) -> Tuple[List[Tensor], List[Tensor]]:
    """(params, grads) of standard normal values on the generator's device: grads [tasks, *shape], params the same
    or, shared by the tasks, [*shape]."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator, device=generator.device, dtype=dtype)

    params = [rand(*s) if shared else rand(tasks, *s) for s in shapes]
    grads = [rand(tasks, *s) for s in shapes]
    return params, grads


def task_sgd_impls(params: List[Tensor], grads: List[Tensor], lr: float, shared: bool
                   ) -> Tuple[Dict[str, Callable[[], List[Tensor]]], List[str]]:
    """({name: run}, the names of the foreach formulations among them) for "fused", "loop" and the foreach forms
    ("foreach:add" for per-task params; "foreach:add(expand)" and "foreach:mul+add_" for shared ones)."""
    impls = {
        "fused": lambda: mamlext.ops.task_sgd(params, grads, lr),
        "loop": lambda: [p - lr * g for p, g in zip(params, grads)],
    }
    if shared:
        expanded = [p.expand_as(g) for p, g in zip(params, grads)]

        def foreach_mul_add():
            out = torch._foreach_mul(grads, -lr)
            torch._foreach_add_(out, params)
            return out

        foreach = {"foreach:add(expand)": lambda: torch._foreach_add(expanded, grads, alpha=-lr),
                   "foreach:mul+add_": foreach_mul_add}
    else:
        foreach = {"foreach:add": lambda: torch._foreach_add(params, grads, alpha=-lr)}
    impls.update(foreach)
    return impls, list(foreach)
