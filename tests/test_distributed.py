"""mamlext.distributed and `torchrun -m mamlext train`: 2 gloo processes on the CPU give the single-process
meta-gradient and training; a meta-batch smaller than the world, and a dead or stalled rank, fail clearly."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from mamlext import BatchedMAML, MAML, distributed
from mamlext.data import SinusoidTasks
from mamlext.models import sine_mlp
from mamlext.train import load_checkpoint, make_config, train

ROOT = Path(__file__).resolve().parents[1]
TASKS, SHOTS = 5, 4  # 5 tasks over 2 ranks: an uneven split (3 + 2)
CHILD_TIMEOUT_S = 120  # no test waits longer than this on a child process


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --- the tasks of a meta-batch ---------------------------------------------------------------------------------------

def test_task_slices_cover_every_task_once_and_differ_by_at_most_one():
    for tasks in range(1, 10):
        for world in range(1, tasks + 1):
            shares = [range(tasks)[distributed.task_slice(tasks, r, world)] for r in range(world)]
            assert [t for share in shares for t in share] == list(range(tasks))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="a meta-batch of 3 tasks cannot be split across 4 processes"):
        distributed.task_slice(3, 0, 4)
    assert distributed.task_slice(7) == slice(0, 7)  # no process group: one process computes everything


# --- the meta-gradient -----------------------------------------------------------------------------------------------

def _meta_gradient(engine, shard=slice(None)):
    """The learner after backward of the mean meta-loss over the tasks ``shard`` of one fixed float64 meta-batch."""
    torch.manual_seed(0)
    model = sine_mlp(8).double()
    batch = SinusoidTasks(seed=1, dtype=torch.float64).sample(TASKS, SHOTS)
    if engine == "fused":  # Meta-SGD: the learnable per-parameter rates get gradients too
        learner = BatchedMAML(model, inner_lr=0.05, inner_steps=2, lr_mode="per_param")
        learner.meta_loss(*(data[shard] for data in batch[:4])).backward()
        return learner
    learner = MAML(model, lr=0.05)
    tasks = range(TASKS)[shard]
    for t in tasks:
        clone = learner.clone()
        clone.adapt(F.mse_loss(clone(batch.x_support[t]), batch.y_support[t]))
        (F.mse_loss(clone(batch.x_query[t]), batch.y_query[t]) / len(tasks)).backward()
    return learner


def _gradient_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.init_from_env(timeout_s=60)
    try:
        for engine in ("fused", "generic"):
            shard = distributed.task_slice(TASKS)
            learner = _meta_gradient(engine, shard)
            total = distributed.all_reduce_meta_grads(learner, num_tasks=len(range(TASKS)[shard]))
            grads = [p.grad for p in learner.parameters()]
            torch.save({"total": total, "grads": grads, "shard": (shard.start, shard.stop)},
                       Path(out_dir) / f"{engine}-{rank}.pt")
    finally:
        distributed.shutdown()


def test_two_gloo_processes_give_the_single_process_meta_gradient(tmp_path):
    mp.spawn(_gradient_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for engine in ("fused", "generic"):
        expected = [p.grad for p in _meta_gradient(engine).parameters()]
        assert len(expected) == (12 if engine == "fused" else 6)  # fused: 6 tensors + their 6 learnable rates
        ranks = [torch.load(tmp_path / f"{engine}-{r}.pt", weights_only=True) for r in range(2)]
        assert [r["shard"] for r in ranks] == [(0, 3), (3, 5)] and all(r["total"] == TASKS for r in ranks)
        for rank in ranks:
            for got, want in zip(rank["grads"], expected, strict=True):
                assert got.dtype == torch.float64
                assert (got - want).norm() <= 1e-6 * want.norm(), engine


# --- training through the CLI ----------------------------------------------------------------------------------------

SINE = ["--meta-batch", "5", "--hidden", "8", "--dtype", "float64", "--device", "cpu", "--log-every", "1",
        "--no-eval", "--no-progress"]


def _torchrun(*args, **env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mamlext", *args], cwd=ROOT, env=_child_env(**env), capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)


def _parameters(run_dir):
    return load_checkpoint(run_dir)["learner"]


@pytest.mark.slow
def test_torchrun_training_matches_one_process_and_resumes_with_another_world_size(tmp_path):
    def run_config(iterations):
        return make_config("sine", iterations=iterations, meta_batch=5, hidden=8, dtype="float64", device="cpu",
                           log_every=1)

    train(run_config(5), out=tmp_path / "one", progress=False, evaluate=False)
    two = _torchrun("train", "sine", "--iterations", "5", "--out", str(tmp_path / "two"), *SINE)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("run directory:") == 1  # rank 0 alone prints
    one_params, two_params = _parameters(tmp_path / "one"), _parameters(tmp_path / "two")
    assert one_params.keys() == two_params.keys()
    for name in one_params:
        assert torch.allclose(two_params[name], one_params[name], rtol=1e-3, atol=1e-6), name
    one_log, two_log = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                        for run in ("one", "two"))
    assert [m["iteration"] for m in two_log] == [1, 2, 3, 4, 5]  # one metrics line per iteration, not per rank
    for a, b in zip(one_log, two_log):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9)  # the loss of all 5 tasks, not of rank 0's 3

    # 3 iterations on 2 processes, then resumed to 5 on 1 process: the checkpoint does not depend on the world size
    cut = _torchrun("train", "sine", "--iterations", "3", "--out", str(tmp_path / "cut"), *SINE)
    assert cut.returncode == 0, cut.stderr
    train(resume=tmp_path / "cut", overrides={"iterations": 5}, progress=False, evaluate=False)
    resumed = _parameters(tmp_path / "cut")
    for name in one_params:
        assert torch.allclose(resumed[name], one_params[name], rtol=1e-6, atol=1e-12), name


NAV = ["--meta-batch", "5", "--episodes", "2", "--horizon", "10", "--hidden", "8", "--dtype", "float64",
       "--device", "cpu", "--log-every", "1", "--no-eval", "--no-progress"]


@pytest.mark.slow
def test_torchrun_nav_matches_one_process(tmp_path):
    """MAML-TRPO: the ranks sample their shares of the tasks with the single process's noise and all-reduce the
    meta-gradient, every Fisher-vector product and the line search's losses: the same steps. The products agree with
    one process's to rounding (tests/test_rl.py, test_meta_products_of_task_shards_sum_to_the_whole), but conjugate
    gradient on the damped Fisher (damping 1e-5) amplifies that rounding to ~1e-7 relative per meta-update, hence
    the tolerance here."""
    config = make_config("nav", iterations=3, meta_batch=5, episodes=2, horizon=10, hidden=8, dtype="float64",
                         device="cpu", log_every=1)
    train(config, out=tmp_path / "one", progress=False, evaluate=False)
    two = _torchrun("train", "nav", "--iterations", "3", "--out", str(tmp_path / "two"), *NAV)
    assert two.returncode == 0, two.stderr
    one_params, two_params = _parameters(tmp_path / "one"), _parameters(tmp_path / "two")
    assert one_params.keys() == two_params.keys()
    for name in one_params:
        assert torch.allclose(two_params[name], one_params[name], rtol=1e-3, atol=1e-6), name
    one_log, two_log = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                        for run in ("one", "two"))
    assert [m["iteration"] for m in two_log] == [1, 2, 3]
    assert any(m["step_fraction"] > 0 for m in one_log)  # TRPO moved the policy
    for a, b in zip(one_log, two_log):
        assert b["step_fraction"] == a["step_fraction"]
        for key in ("loss", "return_pre", "return_post", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-12), key


def test_a_meta_batch_smaller_than_the_world_is_a_clear_error(tmp_path):
    result = _torchrun("train", "sine", "--iterations", "2", "--out", str(tmp_path / "run"),
                       *[a if a != "5" else "1" for a in SINE])
    assert result.returncode != 0
    assert "--meta-batch 1: a meta-batch of 1 tasks cannot be split across 2 processes" in result.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --- a rank that dies or stalls ---------------------------------------------------------------------------------------

# Runs the CLI as one rank; rank 1 exits abruptly (or stalls forever) at its third training step.
RANK_SCRIPT = """
import os, sys, time
from mamlext import train
from mamlext.__main__ import main

step, calls = train.SineExperiment.train_step, []

def failing_step(self):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        if sys.argv[1] == "exits":
            os._exit(3)
        time.sleep(3600)
    return step(self)

train.SineExperiment.train_step = failing_step
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("failure", ["exits", pytest.param("stalls", marks=pytest.mark.slow)])
def test_a_rank_that_dies_or_stalls_makes_the_other_exit_with_an_error(tmp_path, failure):
    port = _free_port()
    args = [sys.executable, "-c", RANK_SCRIPT, failure, "train", "sine", "--iterations", "50",
            "--out", str(tmp_path / "run"), *SINE]
    ranks = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_child_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                                             MASTER_PORT=port, MAMLEXT_DIST_TIMEOUT_S=6))
             for r in range(2)]
    try:
        _, err = ranks[0].communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert ranks[0].returncode == 1, err
    assert "the processes of the run lost each other" in err
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]  # rank 0 got no further than rank 1
