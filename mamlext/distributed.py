"""Meta-batches split across processes, GPUs and machines with torch.distributed.

Every process (rank) samples the same meta-batch from the shared seed, computes the meta-gradient of its own
slice of the tasks (``task_slice``), and ``all_reduce_meta_grads`` replaces each gradient with the average over
all ranks weighted by their task counts: the meta-loss is a mean over tasks, so that average is the meta-gradient
of the whole meta-batch, as one process would compute it. No task is computed twice, and since the sampling does
not depend on the number of ranks, a checkpoint resumes with any world size.

In your own loop, launched with ``torchrun --nproc_per_node=P my_script.py``:

    from mamlext import distributed
    distributed.init_from_env()                        # the process group torchrun describes (gloo / NCCL)
    device = distributed.local_device(torch.device("cuda"))      # cuda:LOCAL_RANK
    ...
    batch = tasks.sample(T, shots, query)              # the same T tasks on every rank (same seed)
    mine = distributed.task_slice(T)                   # this rank's share
    learner.meta_loss(batch.x_support[mine], batch.y_support[mine],
                      batch.x_query[mine], batch.y_query[mine]).backward()
    distributed.all_reduce_meta_grads(learner, num_tasks=len(range(T)[mine]))
    optimizer.step()                                   # the same step on every rank
    ...
    distributed.shutdown()

Without a process group (one process) every function here is the single-process identity.
"""
import datetime
import gc
import os
from typing import Any, Iterable, List, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

# How long a rank waits in a collective before it gives up (a dead or stuck peer makes the others fail, not hang).
TIMEOUT_ENV = "MAMLEXT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


class PeerLost(RuntimeError):
    """A collective failed: another process of the group died, or did not answer within the timeout."""


def _collective(operation, *args, **kwargs):
    """Runs a torch.distributed collective; a failure (gloo and NCCL raise plain RuntimeErrors) becomes PeerLost."""
    try:
        return operation(*args, **kwargs)
    except RuntimeError as error:
        reason = str(error)
    # raised outside the except block, so the failed collective's frames (holding the group's work) are not kept
    # alive by the new exception: the group can then be freed by shutdown(), not at exit, where gloo may abort
    raise PeerLost(f"rank {rank()} of {world_size()}: {operation.__name__} failed, so another process died or "
                   f"stopped answering within the timeout ({TIMEOUT_ENV}): {reason}")


def launched_world_size() -> int:
    """The number of processes torchrun (or another launcher setting WORLD_SIZE) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(timeout_s: float = None) -> bool:
    """Joins the process group that torchrun's environment describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Backends: gloo for CPU tensors, NCCL for CUDA tensors when CUDA is available. timeout_s (default: the
    MAMLEXT_DIST_TIMEOUT_S environment variable, else 600) bounds every collective. Returns True when it created the
    group (then call ``shutdown()`` at the end), False when one exists already or only one process was launched.
    """
    if dist.is_initialized() or launched_world_size() <= 1:
        return False
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if not timeout_s > 0:
        raise ValueError(f"mamlext.distributed: the timeout must be > 0 seconds, got {timeout_s!r}")
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leaves the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # the group's last references can sit in reference cycles; freed at exit, gloo may abort


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the one process that writes logs and checkpoints."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes this process's GPU, cuda:LOCAL_RANK, when several processes run."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def task_slice(num_tasks: int, rank_: int = None, world_size_: int = None) -> slice:
    """The contiguous tasks of a meta-batch of ``num_tasks`` that rank ``rank_`` (default: this one) computes.

    The ranks' shares differ by at most one task and together cover every task once. ValueError when there are
    fewer tasks than ranks: every rank needs at least one task.
    """
    rank_ = rank() if rank_ is None else rank_
    world_size_ = world_size() if world_size_ is None else world_size_
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"task_slice: num_tasks must be a positive int, got {num_tasks!r}")
    if num_tasks < world_size_:
        raise ValueError(f"a meta-batch of {num_tasks} tasks cannot be split across {world_size_} processes: every "
                         f"process needs at least one task; use a meta-batch of at least {world_size_} tasks or "
                         f"fewer processes")
    if not 0 <= rank_ < world_size_:
        raise ValueError(f"task_slice: rank {rank_} is not in 0..{world_size_ - 1}")
    share, extra = divmod(num_tasks, world_size_)
    start = rank_ * share + min(rank_, extra)
    return slice(start, start + share + (rank_ < extra))


def weighted_average_(tensors: List[Tensor], num_tasks: int) -> int:
    """Replaces, in place, each tensor by the average over the ranks of that tensor weighted by each rank's
    ``num_tasks``: sum_r n_r * t_r / sum_r n_r. Each rank must pass tensors of the same shapes in the same order.
    Returns the total number of tasks. One all-reduce per (device, dtype) of the tensors."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 0:
        raise ValueError(f"num_tasks must be an int >= 0 (this rank's tasks), got {num_tasks!r}")
    if world_size() == 1:
        return num_tasks
    groups = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    total = num_tasks
    for (device, dtype), group in groups.items():
        # the task count travels with the values, so the total is known without a second collective
        weight = torch.tensor([float(num_tasks)], device=device, dtype=dtype)
        flat = torch.cat([t.reshape(-1) * weight for t in group] + [weight])
        _collective(dist.all_reduce, flat)
        total_here = flat[-1]
        if total_here.item() == 0:
            raise ValueError("weighted_average_: no rank has any task (every num_tasks is 0)")
        flat = flat[:-1] / total_here
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        total = int(round(total_here.item()))
    return total


def all_reduce_meta_grads(modules: Union[nn.Module, Iterable[Union[nn.Module, Tensor]]], num_tasks: int) -> int:
    """Averages the meta-gradients over the ranks, weighting each rank's by its number of tasks.

    Call it after ``backward()`` of the mean meta-loss over this rank's ``num_tasks`` tasks and before
    ``optimizer.step()``: every ``.grad`` of the parameters of ``modules`` (a module, or modules and tensors; for
    BatchedMAML its learnable inner rates too) then holds the meta-gradient of the mean over all ranks' tasks.
    Every rank must have gradients for the same parameters. Returns the total number of tasks.
    """
    items = [modules] if isinstance(modules, (nn.Module, Tensor)) else list(modules)
    params, seen = [], set()
    for item in items:
        for p in (item.parameters() if isinstance(item, nn.Module) else [item]):
            if p.grad is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return weighted_average_([p.grad for p in params], num_tasks)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the ranks (a new tensor; ``tensor`` itself with one process), e.g. MAML-TRPO's
    meta-gradient and Fisher-vector products of each rank's share of the tasks."""
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    _collective(dist.all_reduce, total)
    return total


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object, e.g. a run directory chosen from the clock)."""
    if world_size() == 1:
        return obj
    box = [obj]
    _collective(dist.broadcast_object_list, box, src=0)
    return box[0]
