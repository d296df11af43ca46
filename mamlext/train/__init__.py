"""Meta-training runs: ``python -m mamlext train sine|omniglot`` (and the run directory, checkpoints and resume).

    from mamlext.train import make_config, train
    result = train(make_config("sine", iterations=1000), out="runs/mine")

A run directory holds
    config.json       the full configuration (everything needed to rebuild the run)
    metrics.jsonl     one JSON object per logged iteration (loss, accuracy, tasks/s, elapsed seconds)
    checkpoint.pt     the latest checkpoint, written atomically (temp file + os.replace) every ``checkpoint_every``
                      iterations, at the end, and on Ctrl-C: model, learner (learnable rates), optimizer, RNG states
                      (torch, the task sampler), the iteration and the metrics.jsonl line in progress
    eval.json         the evaluation after training (and eval.txt, its table; sine: sine_adaptation.png)

``train(config, resume=RUN_DIR_OR_CHECKPOINT)`` continues a run exactly: an interrupted and resumed run ends with
bitwise the same parameters as an uninterrupted one (same device, same build).

Under torchrun (``torchrun --nproc_per_node=P -m mamlext train ...``) every process samples the same meta-batches,
computes the meta-gradient of its share of the tasks, and the shares are averaged (mamlext.distributed); only rank 0
writes the run directory, prints and evaluates. The checkpoint does not depend on the number of processes.

Modules: config (defaults and checks), memory (size checks), experiments (sine, omniglot), checkpoints, evaluation
(after training, and ``python -m mamlext eval``), interrupts (Ctrl-C), loop (train).
"""
from mamlext.train.checkpoints import load_checkpoint
from mamlext.train.config import (ALGOS, DEFAULT_SINE_ITERATIONS, DTYPES, SEED_RANGE, TASKS, ConfigError, check_int,
                                  make_config, set_threads, writable_dir)
from mamlext.train.evaluation import load_run, run_eval
from mamlext.train.experiments import SineExperiment
from mamlext.train.loop import train
from mamlext.train.memory import available_memory, check_memory, memory_estimate

__all__ = ["ALGOS", "DEFAULT_SINE_ITERATIONS", "DTYPES", "SEED_RANGE", "TASKS", "ConfigError", "SineExperiment",
           "available_memory", "check_int", "check_memory", "load_checkpoint", "load_run", "make_config",
           "memory_estimate", "run_eval", "set_threads", "train", "writable_dir"]
