"""From a per-task loop's data to the batched engine's: stack_tasks."""
from typing import Iterable, Sequence, Tuple

import torch
from torch import Tensor

TASK_TENSORS = ("xs", "ys", "xq", "yq")


def stack_tasks(tasks: Iterable[Sequence[Tensor]]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (xs, ys, xq, yq) of each task, as a per-task loop takes them, stacked into the [T, ...] tensors that
    mamlext.BatchedMAML takes: xs [T, K, ...], ys [T, K, ...], xq [T, Kq, ...], yq [T, Kq, ...].

    Every task must have the same shapes, dtypes and device tensor by tensor; the error names the task and the
    tensor that differ."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("stack_tasks: tasks is empty; expected at least one (xs, ys, xq, yq)")
    for t, task in enumerate(tasks):
        if isinstance(task, Tensor) or not isinstance(task, Sequence) or len(task) != 4:
            raise ValueError(f"stack_tasks: task {t} must be a tuple (xs, ys, xq, yq) of 4 tensors, got "
                             f"{type(task).__name__}{f' of length {len(task)}' if isinstance(task, Sequence) else ''}")
        for name, value, first in zip(TASK_TENSORS, task, tasks[0]):
            if not isinstance(value, Tensor):
                raise TypeError(f"stack_tasks: task {t}'s {name} must be a tensor, got {type(value).__name__}")
            if (value.shape, value.dtype, value.device) != (first.shape, first.dtype, first.device):
                raise ValueError(f"stack_tasks: task {t}'s {name} is {list(value.shape)} {value.dtype} on "
                                 f"{value.device} but task 0's is {list(first.shape)} {first.dtype} on "
                                 f"{first.device}; every task must have the same shapes")
    xs, ys, xq, yq = (torch.stack([task[i] for task in tasks]) for i in range(4))
    return xs, ys, xq, yq
