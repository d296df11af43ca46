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
"""
import contextlib
import copy
import datetime
import json
import math
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

import mamlext
from mamlext import distributed
from mamlext.batched import BatchedMAML
from mamlext.data import SinusoidTasks
from mamlext.maml import MAML
from mamlext.models import conv4, sine_mlp

TASKS = ("sine", "omniglot")
# The algorithms `train` drives (ANIL, iMAML and Reptile are classes to use in one's own loop, see README).
ALGOS = ("maml", "fomaml", "metasgd")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "mamlext-train-checkpoint"
CHECKPOINT_VERSION = 1

# Which --algo each task's engine drives. The sinusoid MLP runs on BatchedMAML's fused engine (Meta-SGD is its
# lr_mode="per_param"); the conv net runs on mamlext.MAML one task at a time (faster on a CPU than the generic
# engine).
SUPPORTED_ALGOS = {"sine": ("maml", "fomaml", "metasgd"), "omniglot": ("maml", "fomaml")}

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

# What may change when a run is resumed (everything else must stay as saved, or the run would not continue exactly).
RESUME_OVERRIDABLE = ("iterations", "checkpoint_every", "log_every", "device", "eval_tasks", "eval_seed",
                      "plot_tasks")


# What torch.manual_seed accepts (a negative seed means 2**64 + seed).
SEED_RANGE = (-2**63, 2**64 - 1)

# The sizes that memory_estimate depends on, named when a run would not fit.
SIZE_OPTIONS = {"sine": ("hidden", "meta_batch", "shots", "query", "inner_steps"),
                "omniglot": ("hidden", "ways", "shots", "query", "inner_steps")}


class ConfigError(ValueError):
    """A bad command-line argument (train, eval, bench) or run file: the message names it."""


# --- configuration ----------------------------------------------------------------------------------------------------

def default_config(task: str, ways: Optional[int] = None) -> Dict[str, Any]:
    """The defaults of a task (omniglot: the paper's for ``ways``, 5-way's for other ways)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    if task == "sine":
        return copy.deepcopy(SINE_DEFAULTS)
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value, flag: str, low: int = 1, high: Optional[int] = None) -> None:
    """ConfigError naming ``flag`` unless ``value`` is an integer from ``low`` to ``high`` (None: no upper bound)."""
    if not _is_int(value) or value < low or (high is not None and value > high):
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
                 "log_every", "eval_tasks"):
        _int(config, name)
    _int(config, "seed", 0, SEED_RANGE[1])
    if config.get("eval_seed") is not None:
        _int(config, "eval_seed", *SEED_RANGE)
    for name in ("inner_lr", "meta_lr"):
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


def memory_estimate(config: Dict[str, Any]) -> int:
    """Roughly the bytes a meta-iteration needs at once: the parameters with their gradient and Adam's two moments,
    each task's adapted copy of them and the hidden activations of every inner step (kept for the meta-gradient).
    Sine runs its whole meta-batch at once; omniglot one task at a time. Good for refusing absurd sizes, not for
    planning a run."""
    c = config
    h, steps = c["hidden"], c["inner_steps"] + 1
    if c["task"] == "sine":  # 1-h-h-1 MLP
        params, tasks = h * h + 4 * h + 1, c["meta_batch"]
        activations = tasks * (c["shots"] + c["query"]) * 2 * h * steps
    else:  # Conv4 (3x3 convolutions, batch norm) on 28x28 images: the first layer's outputs dominate
        params, tasks = 27 * h * h + 21 * h + c["ways"] * (h + 1), 1
        activations = c["ways"] * (c["shots"] + c["query"]) * h * 28 * 28 * 2 * steps
    return DTYPES[c["dtype"]].itemsize * (params * (4 + tasks) + activations)


def available_memory(device: torch.device) -> Optional[int]:
    """Free bytes for the run: the GPU's free memory, or Linux's MemAvailable; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(config: Dict[str, Any], device: torch.device) -> None:
    """ConfigError naming the sizes when the run would need more memory than the device has free (it would fail to
    allocate, or crawl in swap, only after building the model)."""
    need, free = memory_estimate(config), available_memory(device)
    if free is not None and need > free:
        sizes = ", ".join(f"--{name.replace('_', '-')} {config[name]}" for name in SIZE_OPTIONS[config["task"]])
        raise ConfigError(f"{sizes}: training would need about {need / 2**30:,.1f} GiB of memory, more than the "
                          f"{free / 2**30:,.1f} GiB free on {device}")


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


# --- the experiments ------------------------------------------------------------------------------------------------

class SineExperiment:
    """Finn et al.'s sinusoid regression on BatchedMAML's fused MLP engine: a whole meta-batch per call."""

    task_shard = slice(None)  # the tasks of each meta-batch this process computes (all but under torchrun)

    def __init__(self, config: Dict[str, Any], device: torch.device, progress: bool = True):
        self.config, self.device, self.dtype = config, device, DTYPES[config["dtype"]]
        torch.manual_seed(config["seed"])
        self.model = sine_mlp(config["hidden"]).to(device=device, dtype=self.dtype)
        self.learner = BatchedMAML(self.model, inner_lr=config["inner_lr"], inner_steps=config["inner_steps"],
                                   first_order=config["first_order"], loss="mse",
                                   lr_mode="per_param" if config["algo"] == "metasgd" else "fixed")
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=config["meta_lr"])
        self.tasks = SinusoidTasks(seed=config["seed"], dtype=self.dtype, device=device)

    def train_step(self) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Samples a meta-batch and puts the meta-gradient into the parameters; returns the (detached) meta-loss."""
        c = self.config
        batch = self.tasks.sample(c["meta_batch"], c["shots"], c["query"])
        xs, ys, xq, yq = (data[self.task_shard] for data in batch[:4])
        loss = self.learner.meta_loss(xs, ys, xq, yq)
        loss.backward()
        return loss.detach(), {}

    def sampler_state(self):
        return self.tasks.generator.get_state()

    def load_sampler_state(self, state) -> None:
        self.tasks.generator.set_state(state)

    def evaluate(self, tasks: int, seed: int, out_dir: Optional[Path] = None, progress: bool = True):
        from mamlext import evaluate
        c = self.config
        rows = evaluate.evaluate_sine(self.learner, tasks=tasks, shots=c["eval_shots"], steps=c["eval_steps"],
                                      query=c["eval_query"], seed=seed, dtype=self.dtype, device=self.device)
        result = {"task": "sine", "tasks": tasks, "seed": seed, "rows": rows}
        if out_dir is not None and c["plot_tasks"] > 0:
            path = Path(out_dir) / "sine_adaptation.png"
            evaluate.plot_sine(self.learner, path, tasks=c["plot_tasks"], shots=min(c["eval_shots"]),
                               steps=max(c["eval_steps"]), seed=seed, dtype=self.dtype, device=self.device)
            result["plot"] = str(path)
        return result

    @staticmethod
    def report(result) -> str:
        from mamlext import evaluate
        return evaluate.format_sine_table(result["rows"], tasks=result["tasks"])


def _import_omniglot():
    try:
        from mamlext.data import Omniglot, TaskSampler
    except ImportError as error:
        raise ConfigError(f"train omniglot: the Omniglot loader (mamlext.data.Omniglot, TaskSampler) is not "
                          f"available in this checkout: {error}") from None
    return Omniglot, TaskSampler


class OmniglotExperiment:
    """N-way K-shot Omniglot with Conv4 on mamlext.MAML, one task at a time (on the CPU faster than the generic
    engine's batched convolutions)."""

    task_shard = slice(None)  # the tasks of each meta-batch this process computes (all but under torchrun)

    def __init__(self, config: Dict[str, Any], device: torch.device, progress: bool = True):
        self.config, self.device, self.dtype = config, device, DTYPES[config["dtype"]]
        self.progress = progress
        Omniglot, TaskSampler = _import_omniglot()
        self._TaskSampler = TaskSampler
        c = config
        common = dict(cache_dir=c["cache_dir"], progress=progress)
        self.train_set = self._dataset(Omniglot, "train", c["train_alphabets"], common)
        self.test_set = self._dataset(Omniglot, "test", c["test_alphabets"], common)
        overlap = set(self.train_set.alphabets) & set(self.test_set.alphabets)
        if overlap:
            raise ConfigError(f"the test alphabets {sorted(overlap)} are also training alphabets: pass "
                              "--train-alphabets / --test-alphabets that do not overlap")
        for name, dataset in (("train", self.train_set), ("test", self.test_set)):
            if c["ways"] > dataset.num_classes:
                raise ConfigError(f"--ways {c['ways']} is larger than the {dataset.num_classes} classes of the "
                                  f"{name} alphabets ({', '.join(dataset.alphabets)})")
            per_class = dataset.images.shape[1]
            if c["shots"] + c["query"] > per_class:
                raise ConfigError(f"--shots {c['shots']} + --query {c['query']} = {c['shots'] + c['query']} images per "
                                  f"class, but the {name} classes hold {per_class}")
        torch.manual_seed(c["seed"])
        self.model = conv4(c["ways"], in_channels=self.train_set.images.shape[2], hidden=c["hidden"],
                           image_size=self.train_set.images.shape[-1]).to(device=device, dtype=self.dtype)
        self.learner = MAML(self.model, lr=c["inner_lr"], first_order=c["first_order"])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c["meta_lr"])
        self.sampler = TaskSampler(self.train_set, c["ways"], c["shots"], c["query"], c["meta_batch"], seed=c["seed"],
                                   device=device)

    def _dataset(self, Omniglot, split, alphabets, common):
        try:
            if alphabets:
                return Omniglot(self.config["data"], split="all", alphabets=list(alphabets), **common)
            return Omniglot(self.config["data"], split=split, **common)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"Omniglot ({split} set): {error}") from None

    def _adapted(self, x_support: Tensor, y_support: Tensor, steps: int, first_order: Optional[bool] = None) -> MAML:
        learner = self.learner.clone(first_order=first_order)
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(x_support), y_support))
        return learner

    def train_step(self) -> Tuple[Tensor, Dict[str, Tensor]]:
        c = self.config
        batch = self.sampler.sample()
        tasks = range(batch.x_support.shape[0])[self.task_shard]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        for t in tasks:
            xs, xq = batch.x_support[t].to(self.dtype), batch.x_query[t].to(self.dtype)
            learner = self._adapted(xs, batch.y_support[t], c["inner_steps"])
            logits = learner(xq)
            loss = F.cross_entropy(logits, batch.y_query[t])
            (loss / len(tasks)).backward()
            total += loss.detach()
            correct += (logits.detach().argmax(1) == batch.y_query[t]).double().mean()
        return total / len(tasks), {"accuracy": correct / len(tasks)}

    def sampler_state(self):
        return self.sampler.state_dict()

    def load_sampler_state(self, state) -> None:
        self.sampler.load_state_dict(state)

    def evaluate(self, tasks: int, seed: int, out_dir: Optional[Path] = None, progress: bool = True):
        from mamlext import evaluate
        c = self.config
        sampler = self._TaskSampler(self.test_set, c["ways"], c["shots"], c["query"], min(tasks, 20), seed=seed,
                                    device=self.device)
        accuracies = evaluate.evaluate_classification(
            lambda xs, ys: self._adapted(xs.to(self.dtype), ys, c["test_steps"], first_order=True),
            sampler, tasks, dtype=self.dtype, progress=progress)
        mean, ci95 = evaluate.mean_ci95(accuracies)
        return {"task": "omniglot", "tasks": tasks, "seed": seed, "ways": c["ways"], "shots": c["shots"],
                "test_steps": c["test_steps"], "accuracy": mean, "ci95": ci95,
                "test_alphabets": list(self.test_set.alphabets), "train_alphabets": list(self.train_set.alphabets)}

    @staticmethod
    def report(result) -> str:
        return (f"Omniglot {result['ways']}-way {result['shots']}-shot, {result['tasks']} test tasks from alphabets "
                f"never trained on ({', '.join(result['test_alphabets'])}), {result['test_steps']} inner steps: "
                f"accuracy {100 * result['accuracy']:.2f}% ± {100 * result['ci95']:.2f}% (95% CI)")


EXPERIMENTS = {"sine": SineExperiment, "omniglot": OmniglotExperiment}


def build_experiment(config: Dict[str, Any], device: torch.device, progress: bool = True):
    return EXPERIMENTS[config["task"]](config, device, progress=progress)


# --- checkpoints ------------------------------------------------------------------------------------------------------

def _rng_state(experiment) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "sampler": experiment.sampler_state()}
    if experiment.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(experiment.device)
    return state


def _load_rng_state(experiment, state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    experiment.load_sampler_state(state["sampler"])
    if experiment.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], experiment.device)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then os.replace: a reader sees the old or the new file,
    never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(path: Path, experiment, config: Dict[str, Any], iteration: int, elapsed: float,
                    rng: Optional[Dict[str, Any]] = None, window: Optional[Dict[str, Any]] = None) -> None:
    """window: the metrics.jsonl line in progress (see _window), so that a resumed run logs it as an uninterrupted
    one would."""
    atomic_save({
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config, "iteration": iteration,
        "elapsed_s": elapsed, "model": experiment.model.state_dict(), "learner": experiment.learner.state_dict(),
        "optimizer": experiment.optimizer.state_dict(), "rng": _rng_state(experiment) if rng is None else rng,
        "window": window, "mamlext_version": mamlext.__version__, "torch_version": str(torch.__version__),
    }, path)


def checkpoint_path(path) -> Path:
    """A run directory's checkpoint, or the checkpoint file itself; FileNotFoundError names what is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def load_checkpoint(path) -> Dict[str, Any]:
    path = checkpoint_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (torch's message, which suggests weights_only=False, would mislead here)
        raise ConfigError(f"{path}: corrupt, or not a mamlext checkpoint (torch.load cannot read it)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: not a mamlext training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path}: checkpoint version {state.get('version')} is not supported (this mamlext "
                         f"reads version {CHECKPOINT_VERSION})")
    _check_fields(path, state)
    return state


def _check_fields(path: Path, state: Dict[str, Any]) -> None:
    """ConfigError naming ``path`` when a field of the checkpoint is missing or of the wrong type (a damaged or
    edited file), which would crash the run later or continue it from nonsense (a negative iteration, say). The
    config's values are checked by check_config."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"{path}: malformed mamlext checkpoint: {what}")

    for key in ("config", "model", "learner", "optimizer", "rng"):
        need(isinstance(state.get(key), dict), f"{key!r} is missing or not a dict")
    iteration = state.get("iteration")
    need(_is_int(iteration) and iteration >= 0, f"'iteration' must be an integer >= 0, got {iteration!r}")
    need(isinstance(state.get("elapsed_s", 0.0), (int, float)), "'elapsed_s' is not a number")
    need(isinstance(state["rng"].get("torch"), Tensor) and "sampler" in state["rng"],
         "'rng' lacks the torch or the task sampler's state")
    task = state["config"].get("task")
    need(task in TASKS, f"the config's task {task!r} is not one of {', '.join(TASKS)}")
    missing = sorted(set(default_config(task)) - set(state["config"]))
    need(not missing, f"the config lacks {', '.join(missing)}")
    window = state.get("window")  # None in checkpoints written before windows were saved
    need(window is None or (isinstance(window, dict) and isinstance(window.get("sums"), dict)
                            and all(isinstance(v, float) for v in window["sums"].values())
                            and _is_int(window.get("iterations")) and window["iterations"] >= 0
                            and isinstance(window.get("seconds"), float)),
         "'window' is not {sums, iterations, seconds}")


def restore(experiment, state: Dict[str, Any], path: Path) -> None:
    """Loads a checkpoint (from ``path``) into the experiment built from its config; ConfigError when its tensors do
    not fit that model (an edited config, or a damaged file)."""
    try:
        experiment.learner.load_state_dict(state["learner"])
        experiment.optimizer.load_state_dict(state["optimizer"])
        for group in experiment.optimizer.param_groups:  # load_state_dict checks the counts, not the shapes
            for param in group["params"]:
                for name, value in experiment.optimizer.state[param].items():
                    if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                        raise ValueError(f"the optimizer's {name} has shape {list(value.shape)}, its parameter "
                                         f"{list(param.shape)}")
        _load_rng_state(experiment, state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[:2])  # torch's first mismatch
        c = experiment.config
        raise ConfigError(f"{path}: does not fit the {c['task']} model of its config (--hidden {c['hidden']}): "
                          f"{detail}") from None


# --- the training loop ----------------------------------------------------------------------------------------------

class _Interrupts:
    """Ctrl-C during training. While the optimizer updates the parameters and the iteration's metrics are recorded
    (phase 'step') the SIGINT is held back until both are complete, so the state is never half-updated; elsewhere it
    raises KeyboardInterrupt at once. Installed only in the main thread."""

    def __init__(self):
        self.phase = "idle"
        self.pending = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def _handler(self, signum, frame):
        if self.phase == "step":
            self.pending = True
            return
        raise KeyboardInterrupt

    def check(self):
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def _run_name(config: Dict[str, Any]) -> str:
    if config["task"] == "omniglot":
        return f"omniglot-{config['ways']}w{config['shots']}s"
    return config["task"]


def new_run_dir(config: Dict[str, Any], root: str = "runs") -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{_run_name(config)}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return path


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drops the metrics logged after ``iteration`` (the resumed run logs them again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("iteration", 0) <= iteration:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    _atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def eval_seed(config: Dict[str, Any]) -> int:
    """The evaluation tasks' seed: far from the training sampler's, so the tasks are new ones (modulo 2**64, as
    torch takes seeds, so that a --seed near the top of SEED_RANGE has one too)."""
    return config["eval_seed"] if config.get("eval_seed") is not None else (config["seed"] + 1_000_003) % 2**64


def _window(sums: Dict[str, Tensor], iterations: int, start: float, local_tasks: int) -> Dict[str, Any]:
    """The logging window so far, for the checkpoint: each metric's sum over the window's iterations (averaged over
    the ranks' tasks: a collective under torchrun), the iterations and the seconds."""
    sums = {key: value.clone() for key, value in sums.items()}
    distributed.weighted_average_(list(sums.values()), local_tasks)
    return {"sums": {key: value.item() for key, value in sums.items()}, "iterations": iterations,
            "seconds": time.perf_counter() - start}


def train(config: Optional[Dict[str, Any]] = None, out=None, resume=None, progress: bool = True,
          evaluate: bool = True, callback: Optional[Callable[[int, Optional[Dict[str, Any]]], None]] = None,
          overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Runs (or resumes) a meta-training run; returns {"run_dir", "iteration", "eval" (or None), "elapsed_s"}.

    config: from make_config (ignored with resume, which takes the checkpoint's). out: the run directory (default
    runs/<name>-<timestamp>). resume: a run directory or checkpoint file. overrides: with resume, new values of
    RESUME_OVERRIDABLE options (e.g. more iterations). callback(iteration, logged_metrics_or_None) runs after each
    iteration. KeyboardInterrupt saves a checkpoint (of the last complete iteration) and is raised again.

    Launched by torchrun with several processes, it joins their process group (mamlext.distributed.init_from_env)
    unless one exists, splits every meta-batch across the ranks, and leaves the group at the end if it joined it.
    """
    joined = distributed.init_from_env()
    try:
        return _train(config, out, resume, progress, evaluate, callback, overrides)
    finally:
        if joined:
            distributed.shutdown()


def _train(config, out, resume, progress, evaluate, callback, overrides) -> Dict[str, Any]:
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    state = None
    if resume is not None:
        ckpt = checkpoint_path(resume)
        state = load_checkpoint(ckpt)
        config = copy.deepcopy(state["config"])
        bad = sorted(set(overrides) - set(RESUME_OVERRIDABLE))
        if bad:
            raise ConfigError(f"--resume continues the saved run exactly; these options cannot change: "
                              f"{', '.join('--' + b.replace('_', '-') for b in bad)} (changeable: "
                              f"{', '.join('--' + r.replace('_', '-') for r in RESUME_OVERRIDABLE)})")
        config.update(overrides)
        check_config(config)
        if config["iterations"] < state["iteration"]:
            raise ConfigError(f"--iterations {config['iterations']} is below the checkpoint's iteration "
                              f"{state['iteration']}")
        if out is not None and Path(out).resolve() != ckpt.parent.resolve():
            raise ConfigError("--out cannot be combined with --resume: a resumed run continues in its own directory "
                              f"({ckpt.parent})")
        run_dir = ckpt.parent
    else:
        if config is None:
            raise ConfigError("train: give a config (make_config) or resume")
        check_config(config)
        run_dir = Path(out) if out is not None else distributed.broadcast_from_main(new_run_dir(config))
        if (run_dir / CHECKPOINT_NAME).exists():
            raise ConfigError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, or another "
                              "--out")
    try:
        task_shard = distributed.task_slice(config["meta_batch"])
    except ValueError as error:
        raise ConfigError(f"--meta-batch {config['meta_batch']}: {error}") from None
    main = distributed.is_main()  # only rank 0 writes the run directory, prints and evaluates
    progress = progress and main
    device = distributed.local_device(resolve_device(config["device"]))
    config["device"] = str(device)
    check_memory(config, device)
    experiment = build_experiment(config, device, progress=progress)
    experiment.task_shard = task_shard
    local_tasks = len(range(config["meta_batch"])[task_shard])
    iteration, elapsed_before, resumed_window = 0, 0.0, None
    if state is not None:
        restore(experiment, state, ckpt)
        iteration, elapsed_before = state["iteration"], state.get("elapsed_s", 0.0)
        resumed_window = state.get("window")  # None from a checkpoint written before windows were saved
        del state
    metrics_path = run_dir / "metrics.jsonl"
    ckpt_path = run_dir / CHECKPOINT_NAME
    if main:
        writable_dir(run_dir, "--out" if resume is None else "--resume")
        _atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
        if resume is not None:
            _truncate_metrics(metrics_path, iteration)
    c = config
    start = time.perf_counter()

    def elapsed():
        return elapsed_before + time.perf_counter() - start

    if main:
        world = distributed.world_size()
        print(f"run directory: {run_dir}  ({'resumed at iteration ' + str(iteration) if resume is not None else 'new'})"
              + (f"; {world} processes share each meta-batch" if world > 1 else ""), flush=True)
    from tqdm import tqdm

    bar = tqdm(total=c["iterations"], initial=iteration, desc=f"train {_run_name(c)}", unit="it", dynamic_ncols=True,
               disable=not progress, mininterval=0.5)
    # the metrics.jsonl line in progress: sums over its iterations (a resumed run's from the checkpoint)
    carried = resumed_window or {"sums": {}, "iterations": 0, "seconds": 0.0}
    sums = {key: torch.tensor(value, dtype=torch.float64, device=device) for key, value in carried["sums"].items()}
    window_start, window_iters = time.perf_counter() - carried["seconds"], carried["iterations"]
    interrupts = _Interrupts()
    snapshot = None
    model, optimizer = experiment.model, experiment.optimizer
    try:
        with (open(metrics_path, "a") if main else contextlib.nullcontext()) as metrics_file, interrupts:
            while iteration < c["iterations"]:
                snapshot = _rng_state(experiment)  # the state to go back to if this iteration is interrupted
                interrupts.phase = "compute"
                optimizer.zero_grad(set_to_none=True)
                loss, extra = experiment.train_step()
                distributed.all_reduce_meta_grads(experiment.learner, local_tasks)
                interrupts.phase = "step"
                optimizer.step()
                iteration += 1
                for key, value in (("loss", loss), *extra.items()):
                    sums[key] = sums[key] + value if key in sums else value.detach().double().clone()
                window_iters += 1
                logged = None
                if iteration % c["log_every"] == 0 or iteration == c["iterations"]:
                    now = time.perf_counter()
                    distributed.weighted_average_(list(sums.values()), local_tasks)  # the ranks' tasks together
                    logged = {"iteration": iteration}
                    logged.update({k: v.item() / window_iters for k, v in sums.items()})
                    logged["tasks_per_s"] = window_iters * c["meta_batch"] / max(now - window_start, 1e-9)
                    logged["elapsed_s"] = round(elapsed(), 3)
                    if not all(math.isfinite(v) for k, v in logged.items() if k != "iteration"):
                        logged["nonfinite"] = True
                    if main:
                        metrics_file.write(json.dumps(logged) + "\n")
                        metrics_file.flush()
                    bar.set_postfix({"loss": f"{logged['loss']:.4f}",
                                     **({"acc": f"{logged['accuracy']:.3f}"} if "accuracy" in logged else {}),
                                     "tasks/s": f"{logged['tasks_per_s']:.0f}"}, refresh=False)
                    sums, window_start, window_iters = {}, now, 0
                interrupts.phase = "idle"
                interrupts.check()
                bar.update(1)
                if iteration % c["checkpoint_every"] == 0 or iteration == c["iterations"]:
                    window = _window(sums, window_iters, window_start, local_tasks)  # on every rank
                    if main:
                        interrupts.phase = "saving"
                        save_checkpoint(ckpt_path, experiment, c, iteration, elapsed(), window=window)
                        interrupts.phase = "idle"
                if callback is not None:
                    callback(iteration, logged)
                interrupts.check()
            if main and (iteration == 0 or not ckpt_path.exists()):  # the loop ran no iteration
                save_checkpoint(ckpt_path, experiment, c, iteration, elapsed(), window=resumed_window)
    except KeyboardInterrupt:
        bar.close()
        if not main:
            raise
        phase = interrupts.phase
        interrupts.phase = "idle"
        if phase == "step":
            print(f"\ninterrupted while the optimizer was updating the parameters: not saving a half-updated state; "
                  f"the last checkpoint ({ckpt_path}) stays", flush=True)
        else:
            rng = None
            if phase == "compute":  # the iteration in progress is dropped: rewind its task sampling
                rng = snapshot
                _load_rng_state(experiment, snapshot)
            # under torchrun the other ranks' sums are out of reach here: the resumed run starts a new window
            window = _window(sums, window_iters, window_start, local_tasks) if distributed.world_size() == 1 else None
            save_checkpoint(ckpt_path, experiment, c, iteration, elapsed(), rng=rng, window=window)
            print(f"\ninterrupted: saved the checkpoint of iteration {iteration} to {ckpt_path}; continue with\n"
                  f"  python -m mamlext train --resume {run_dir}", flush=True)
        raise
    bar.close()
    total = elapsed()
    result = {"run_dir": str(run_dir), "iteration": iteration, "elapsed_s": total, "eval": None}
    if not main:
        return result
    print(f"trained {iteration} iterations in {total:.1f} s; checkpoint: {ckpt_path}", flush=True)
    if evaluate:
        result["eval"] = evaluate_run(experiment, c, run_dir, progress=progress)
    return result


def evaluate_run(experiment, config: Dict[str, Any], out_dir: Optional[Path], tasks: Optional[int] = None,
                 seed: Optional[int] = None, progress: bool = True, write: bool = True) -> Dict[str, Any]:
    """Evaluates on new tasks, prints the report, and (write) saves eval.json / eval.txt in out_dir."""
    tasks = config["eval_tasks"] if tasks is None else tasks
    seed = eval_seed(config) if seed is None else seed
    start = time.perf_counter()
    result = experiment.evaluate(tasks, seed, out_dir=out_dir if write else None, progress=progress)
    result["eval_s"] = round(time.perf_counter() - start, 2)
    text = experiment.report(result)
    print(text, flush=True)
    if "plot" in result:
        print(f"plot of adapted curves: {result['plot']}", flush=True)
    if write and out_dir is not None:
        _atomic_write_text(Path(out_dir) / "eval.json", json.dumps(result, indent=2) + "\n")
        _atomic_write_text(Path(out_dir) / "eval.txt", text + "\n")
    return result


def load_run(checkpoint, device: Optional[str] = None, progress: bool = True):
    """(experiment with the checkpoint's state, config, state) for evaluation."""
    path = checkpoint_path(checkpoint)
    state = load_checkpoint(path)
    config = copy.deepcopy(state["config"])
    if device is not None:
        config["device"] = device
    elif str(config["device"]).startswith("cuda") and not torch.cuda.is_available():
        config["device"] = "cpu"
    check_config(config)
    device_ = resolve_device(config["device"])
    config["device"] = str(device_)
    experiment = build_experiment(config, device_, progress=progress)
    restore(experiment, state, path)
    return experiment, config, state


def parameters_of(experiment) -> List[Tensor]:
    return [p.detach().clone() for p in experiment.learner.parameters()]
