"""Training configuration: each task's defaults (the paper's settings), make_config, and the checks that refuse a bad
option with a message naming it."""
import copy
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

TASKS = ("sine", "omniglot", "nav", "cheetah-vel", "cheetah-dir")
RL_TASKS = ("nav", "cheetah-vel", "cheetah-dir")
# The algorithms `train` drives (ANIL, iMAML and Reptile are classes to use in one's own loop, see README).
ALGOS = ("maml", "fomaml", "metasgd")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Which --algo each task's engine drives. The sinusoid MLP runs on BatchedMAML's fused engine (Meta-SGD is its
# lr_mode="per_param"); the conv net runs on mamlext.MAML one task at a time (faster on a CPU than the generic
# engine).
SUPPORTED_ALGOS = {"sine": ("maml", "fomaml", "metasgd"), "omniglot": ("maml", "fomaml"),
                   **{task: ("maml", "fomaml", "metasgd") for task in RL_TASKS}}

# Finn et al. 2017: sinusoid regression (section 5.1): 1-40-40-1 ReLU, K=10 support + 10 query, one inner step,
# Adam 1e-3, meta-batch 25, 70,000 meta-iterations (the command in the README of the paper's code, cbfinn/maml).
# The inner step size: the paper's text says alpha = 0.01, but its code (main.py, flag update_lr) defaults to 1e-3
# and the sinusoid command does not override it; measured here (seed 0, 600 tasks, K=5), alpha = 0.001 reproduces
# the paper's K=5 numbers (about 0.62 / 0.30 / 0.26 after 1 / 5 / 10 steps) while alpha = 0.01 matches only the
# one-step number (about 0.65) and diverges on some tasks after 5-10 steps. --inner-lr 0.01 gives the paper's text.
DEFAULT_SINE_ITERATIONS = 70000
SINE_DEFAULTS: Dict[str, Any] = dict(
    task="sine", algo="maml", first_order=False, iterations=DEFAULT_SINE_ITERATIONS, meta_batch=25, shots=10,
    query=10, inner_lr=0.001, inner_steps=1, meta_lr=1e-3, hidden=40, seed=0, dtype="float32", device=None,
    checkpoint_every=5000, log_every=250, eval_tasks=600, eval_shots=[5, 10, 20], eval_steps=[1, 5, 10],
    eval_query=100, eval_seed=None, plot_tasks=4)

# Finn et al. 2017, appendix A.1: 5-way: alpha 0.4, 1 inner step, meta-batch 32, 3 steps at test; 20-way: alpha 0.1,
# 5 inner steps (at test too), meta-batch 16; Adam 1e-3; 60,000 meta-iterations. 15 query images per class.
OMNIGLOT_DEFAULTS: Dict[str, Any] = dict(
    task="omniglot", algo="maml", first_order=False, iterations=60000, ways=5, shots=1, query=15, meta_lr=1e-3,
    hidden=64, seed=0, dtype="float32", device=None, checkpoint_every=500, log_every=10, eval_tasks=600,
    eval_seed=None, data=None, train_alphabets=None, test_alphabets=None, cache_dir=None)
OMNIGLOT_BY_WAYS = {5: dict(inner_lr=0.4, inner_steps=1, meta_batch=32, test_steps=3),
                    20: dict(inner_lr=0.1, inner_steps=5, meta_batch=16, test_steps=5)}

# Finn et al. 2017, section 5.3, 2D navigation (the paper's code, cbfinn/maml_rl maml_trpo_point.py): a 2-100-100-2
# ReLU Gaussian policy, 20 episodes of 100 steps per task, meta-batch 20, one policy-gradient step with alpha = 0.5,
# TRPO with max KL 0.01, gamma 0.99, GAE lambda 1 on rllab's linear feature baseline; at test 40 goals, 40 episodes
# per gradient step, 3 steps (alpha, then alpha / 2).
NAV_DEFAULTS: Dict[str, Any] = dict(
    task="nav", algo="maml", first_order=False, iterations=100, meta_batch=20, episodes=20, horizon=100,
    inner_lr=0.5, hidden=100, gamma=0.99, gae_lambda=1.0, max_kl=0.01, seed=0, dtype="float32", device=None,
    checkpoint_every=10, log_every=1, eval_tasks=40, eval_episodes=40, test_steps=3, eval_seed=None, plot_tasks=2)

# Section 5.3's locomotion: HalfCheetah with a goal velocity or direction, 2-100-100 ReLU Gaussian policy, episodes of
# 200 steps, 20 per task, alpha = 0.1, meta-batch 40 (the paper's code and tristandeleu/pytorch-maml-rl's configs);
# needs gymnasium's MuJoCo (the "rl" extra).
CHEETAH_DEFAULTS: Dict[str, Any] = dict(NAV_DEFAULTS, iterations=500, meta_batch=40, horizon=200, inner_lr=0.1,
                                        eval_episodes=20, plot_tasks=0)

# What may change when a run is resumed (everything else must stay as saved, or the run would not continue exactly).
RESUME_OVERRIDABLE = ("iterations", "checkpoint_every", "log_every", "device", "eval_tasks", "eval_seed",
                      "plot_tasks")

# What torch.manual_seed accepts (a negative seed means 2**64 + seed).
SEED_RANGE = (-2**63, 2**64 - 1)


class ConfigError(ValueError):
    """A bad command-line argument (train, eval, bench) or run file: the message names it."""


def default_config(task: str, ways: Optional[int] = None) -> Dict[str, Any]:
    """The defaults of a task (omniglot: the paper's for ``ways``, 5-way's for other ways)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    if task == "sine":
        return copy.deepcopy(SINE_DEFAULTS)
    if task in RL_TASKS:
        return copy.deepcopy(dict(NAV_DEFAULTS if task == "nav" else CHEETAH_DEFAULTS, task=task))
    config = copy.deepcopy(OMNIGLOT_DEFAULTS)
    ways = config["ways"] if ways is None else ways
    config.update(OMNIGLOT_BY_WAYS.get(ways, OMNIGLOT_BY_WAYS[5 if ways < 20 else 20]))
    config["ways"] = ways
    return config


def make_config(task: str, **overrides) -> Dict[str, Any]:
    """The task's defaults with ``overrides`` (None values are ignored), checked: ConfigError names a bad one."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = default_config(task, overrides.get("ways"))
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ConfigError(f"train {task} has no option {', '.join('--' + u.replace('_', '-') for u in unknown)}")
    config.update(overrides)
    if config["algo"] == "fomaml":
        config["first_order"] = True
    check_config(config)
    return config


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value, flag: str, low: int = 1, high: Optional[int] = None) -> None:
    """ConfigError naming ``flag`` unless ``value`` is an integer from ``low`` to ``high`` (None: no upper bound)."""
    if not is_int(value) or value < low or (high is not None and value > high):
        expected = f">= {low}" if high is None else f"from {low} to {high}"
        raise ConfigError(f"{flag} must be an integer {expected}, got {value!r}")


def _int(config, name, low=1, high=None):
    check_int(config[name], f"--{name.replace('_', '-')}", low, high)


def _positive(config, name):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value!r}")


def check_config(config: Dict[str, Any]) -> None:
    task = config["task"]
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    algo = config["algo"]
    if algo not in ALGOS:
        raise ConfigError(f"unknown --algo {algo!r}; the algorithms are {', '.join(ALGOS)}")
    if algo not in SUPPORTED_ALGOS[task]:
        raise ConfigError(f"--algo {algo}: `train {task}` does not drive it (its Conv4 trains on mamlext.MAML, "
                          f"which does {' and '.join(SUPPORTED_ALGOS[task])}); use --algo maml or fomaml, or "
                          "mamlext.BatchedMAML with lr_mode='per_param' on the generic engine in your own loop")
    if config["algo"] == "maml" and config["first_order"]:
        config["algo"] = "fomaml"
    for name in ("iterations", "meta_batch", "shots", "query", "inner_steps", "hidden", "checkpoint_every",
                 "log_every", "eval_tasks", "episodes", "horizon", "eval_episodes"):
        if name in config:  # each task's defaults say which options it has
            _int(config, name)
    _int(config, "seed", 0, SEED_RANGE[1])
    if config.get("eval_seed") is not None:
        _int(config, "eval_seed", *SEED_RANGE)
    for name in ("inner_lr", "meta_lr", "max_kl"):
        if name in config:
            _positive(config, name)
    if config["dtype"] not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {config['dtype']!r}")
    if config["device"] is not None:
        resolve_device(config["device"])
    if task == "sine":
        for name in ("eval_shots", "eval_steps"):
            values = config[name]
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "eval_shots"
                                                                                        else 0) for v in values):
                raise ConfigError(f"--{name.replace('_', '-')} must be a non-empty list of integers "
                                  f"(>= {1 if name == 'eval_shots' else 0}), got {values!r}")
        _int(config, "eval_query")
        _int(config, "plot_tasks", low=0)
    elif task in RL_TASKS:
        _int(config, "test_steps", low=0)
        _int(config, "plot_tasks", low=0)
        for name in ("gamma", "gae_lambda"):
            value = config[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a number from 0 to 1, got {value!r}")
    else:
        _int(config, "ways", low=2)
        _int(config, "test_steps", low=0)
        if not config["data"]:
            raise ConfigError("train omniglot needs --data DIR: a folder holding the Omniglot archives "
                              "(images_background*.zip / images_evaluation*.zip) or their extracted folders")
        data = config["data"]
        for path in (data if isinstance(data, (list, tuple)) else [data]):
            if not Path(path).exists():
                raise ConfigError(f"--data {path}: no such file or directory")
        train_a, test_a = config["train_alphabets"], config["test_alphabets"]
        if train_a and test_a and set(train_a) & set(test_a):
            raise ConfigError(f"--train-alphabets and --test-alphabets share {sorted(set(train_a) & set(test_a))}: "
                              "the test alphabets must be ones the model never saw")


def resolve_device(name: Optional[str]) -> torch.device:
    """--device: cpu or cuda[:N]; None means cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be cpu or cuda, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no GPU is visible to torch (torch.cuda.is_available() is False)")
    return device


def set_threads(threads: Optional[int]) -> None:
    """--threads: torch's CPU threads (None: leave torch's default), at most one per CPU."""
    if threads is not None:
        check_int(threads, "--threads", 1, os.cpu_count() or 1)
        torch.set_num_threads(threads)


def writable_dir(path, flag: str) -> Path:
    """Creates the folder ``path`` (the value of ``flag``) if needed and writes a temporary file in it, so a folder
    that cannot take the files is refused before the work, not after it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise ConfigError(f"{flag} {path}: cannot write files there ({error.strerror or error})") from None
    return path

