"""Meta-training runs: ``python -m mamlext train sine|omniglot`` (mamlext.train.loop, for now the whole of it)."""
from mamlext.train.loop import (ALGOS, DEFAULT_SINE_ITERATIONS, DTYPES, SEED_RANGE, TASKS, ConfigError, SineExperiment,
                                available_memory, check_int, check_memory, checkpoint_path, evaluate_run,
                                load_checkpoint, load_run, make_config, memory_estimate, set_threads, train,
                                writable_dir)

__all__ = ["ALGOS", "DEFAULT_SINE_ITERATIONS", "DTYPES", "SEED_RANGE", "TASKS", "ConfigError", "SineExperiment",
           "available_memory", "check_int", "check_memory", "checkpoint_path", "evaluate_run", "load_checkpoint",
           "load_run", "make_config", "memory_estimate", "set_threads", "train", "writable_dir"]
