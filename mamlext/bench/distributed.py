"""Meta-training throughput with the meta-batch split across 1 and several CPU processes (torch.distributed, gloo):
`python -m mamlext bench --distributed P` and benchmarks/bench_distributed.py.

Workload: Finn et al.'s sinusoid regression, MLP 1-40-40-1 ReLU, T = 1000 tasks per meta-batch, K = 10 support +
10 query points, N = 1 inner step (second order), float32, the fused engine (mamlext.BatchedMAML). One timed
iteration is what `torchrun -m mamlext train sine` does per meta-iteration: every rank samples the meta-batch,
computes the meta-gradient of its share of the tasks (mamlext.distributed.task_slice), the shares are averaged
(all_reduce_meta_grads) and Adam steps. Each process runs with `threads` torch threads (default 1), so P processes
use P cores: on a machine with P free cores, 1 process x 1 thread against P processes x 1 thread is the fair
comparison. Rank 0 times blocks of iterations (every iteration ends in an all-reduce, so rank 0's clock covers the
slowest rank); tasks/s = T / median seconds per iteration; scaling = tasks/s with P processes / tasks/s with 1.

From code: ``run(world_sizes=(1, 2)) -> dict``, ready for JSON.
"""
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from mamlext import BatchedMAML, distributed
from mamlext.bench.common import ForeignLoad, machine_info, noisy, summary, wait_quiet
from mamlext.data import SinusoidTasks
from mamlext.models import sine_mlp

SHOTS = QUERIES = 10
HIDDEN = 40
INNER_LR, META_LR = 0.001, 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tasks, inner_steps, threads, warmup, blocks, iters_per_block, out_path):
    torch.set_num_threads(threads)
    if world > 1:  # a spawned child: the environment torchrun would give it
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        distributed.init_from_env(timeout_s=300)
    try:
        torch.manual_seed(0)
        learner = BatchedMAML(sine_mlp(HIDDEN), inner_lr=INNER_LR, inner_steps=inner_steps)
        optimizer = torch.optim.Adam(learner.parameters(), lr=META_LR)
        sampler = SinusoidTasks(seed=0)
        shard = distributed.task_slice(tasks)
        local_tasks = len(range(tasks)[shard])

        def step():
            optimizer.zero_grad(set_to_none=True)
            batch = sampler.sample(tasks, SHOTS, QUERIES)
            learner.meta_loss(*(data[shard] for data in batch[:4])).backward()
            distributed.all_reduce_meta_grads(learner, local_tasks)
            optimizer.step()

        for _ in range(warmup):
            step()
        times = []
        for _ in range(blocks):
            start = time.perf_counter()
            for _ in range(iters_per_block):
                step()
            times.append((time.perf_counter() - start) / iters_per_block)
        if rank == 0:
            Path(out_path).write_text(json.dumps({"times_s": times, "local_tasks": local_tasks}))
    finally:
        distributed.shutdown()


def _children_cpu_s() -> float:
    times = os.times()
    return times.children_user + times.children_system


def measure(world_size, tasks=1000, inner_steps=1, threads=1, warmup=3, blocks=8, iters_per_block=5):
    """Seconds per meta-iteration (summary over blocks) with the meta-batch split across world_size processes."""
    load, children_before, start = ForeignLoad(), _children_cpu_s(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = Path(tmp) / "times.json"
        args = (world_size, _free_port(), tasks, inner_steps, threads, warmup, blocks, iters_per_block, str(out_path))
        if world_size == 1:
            _worker(0, *args)
        else:
            mp.spawn(_worker, args=args, nprocs=world_size, join=True)
        result = json.loads(out_path.read_text())
    # CPUs that other programs used meanwhile: ForeignLoad counts this process's own time; the ranks it spawned
    # (their CPU time is the children's, once joined) are ours too
    foreign = load.cpus()
    if foreign is not None:
        foreign = max(0.0, foreign - (_children_cpu_s() - children_before) / (time.perf_counter() - start))
    timing = summary(result["times_s"])
    return {"world_size": world_size, "threads_per_process": threads, "tasks_per_process_max": result["local_tasks"],
            "tasks_per_s": tasks / (timing["median_ms"] / 1e3), **timing, "foreign_load_cpus": foreign,
            "noisy": noisy(foreign)}


def run(world_sizes=(1, 2), tasks=1000, inner_steps=1, threads=1, warmup=3, blocks=8, iters_per_block=5,
        quiet_wait_s=10.0, progress=True):
    """Tasks per second for each world size and the scaling against the first; a dict ready for JSON."""
    if not world_sizes or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in world_sizes):
        raise ValueError(f"world_sizes must be positive ints, got {world_sizes!r}")
    if max(world_sizes) > tasks:
        raise ValueError(f"tasks={tasks} cannot be split across {max(world_sizes)} processes")
    from tqdm import tqdm

    previous_threads = torch.get_num_threads()
    rows = []
    try:
        for world in tqdm(world_sizes, desc="distributed bench", unit="case", disable=not progress):
            wait_quiet(quiet_wait_s)  # the machine may be shared: start each case on idle cores if it gets idle
            rows.append(measure(world, tasks, inner_steps, threads, warmup, blocks, iters_per_block))
    finally:
        torch.set_num_threads(previous_threads)
    base = rows[0]["tasks_per_s"]
    for row in rows:
        row["scaling"] = row["tasks_per_s"] / base
    return {
        "benchmark": "distributed",
        "workload": {"task": "sine", "mlp": f"1-{HIDDEN}-{HIDDEN}-1", "tasks": tasks, "shots": SHOTS,
                     "query": QUERIES, "inner_steps": inner_steps, "first_order": False, "dtype": "float32",
                     "engine": "fused (BatchedMAML)", "backend": "gloo", "device": "cpu"},
        "machine": machine_info(torch.device("cpu"), threads_per_process=threads),
        "rows": rows,
        "scaling": {f"{row['world_size']}_vs_{rows[0]['world_size']}": row["scaling"] for row in rows[1:]},
    }


def describe(result) -> str:
    """One line per world size: tasks/s, ms per iteration, scaling and the CPUs other programs used meanwhile."""
    lines = []
    for row in result["rows"]:
        load = ("other programs' CPU use unknown" if row["foreign_load_cpus"] is None
                else f"other programs used {row['foreign_load_cpus']:.2f} CPUs meanwhile")
        lines.append(f"{row['world_size']} process(es) x {row['threads_per_process']} thread(s): "
                     f"{row['tasks_per_s']:,.0f} tasks/s (median {row['median_ms']:.2f} ms/iteration, IQR "
                     f"{row['iqr_ms']:.2f} ms), scaling {row['scaling']:.2f}x; {load}"
                     f"{' (NOISY)' if row['noisy'] else ''}")
    return "\n".join(lines)
