"""Checkpoints: the format, atomic writes, and loading with checks that name what is wrong with a file."""
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import Tensor

import mamlext
from mamlext.train.config import TASKS, ConfigError, default_config, is_int

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "mamlext-train-checkpoint"
CHECKPOINT_VERSION = 1


def rng_state(experiment) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "sampler": experiment.sampler_state()}
    if experiment.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(experiment.device)
    return state


def load_rng_state(experiment, state: Dict[str, Any]) -> None:
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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(path: Path, experiment, config: Dict[str, Any], iteration: int, elapsed: float,
                    rng: Optional[Dict[str, Any]] = None, window: Optional[Dict[str, Any]] = None) -> None:
    """window: the metrics.jsonl line in progress (see loop._window), so that a resumed run logs it as an uninterrupted
    one would."""
    atomic_save({
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config, "iteration": iteration,
        "elapsed_s": elapsed, "model": experiment.model.state_dict(), "learner": experiment.learner.state_dict(),
        "optimizer": experiment.optimizer.state_dict(), "rng": rng_state(experiment) if rng is None else rng,
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
    need(is_int(iteration) and iteration >= 0, f"'iteration' must be an integer >= 0, got {iteration!r}")
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
                            and is_int(window.get("iterations")) and window["iterations"] >= 0
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
        load_rng_state(experiment, state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[:2])  # torch's first mismatch
        c = experiment.config
        raise ConfigError(f"{path}: does not fit the {c['task']} model of its config (--hidden {c['hidden']}): "
                          f"{detail}") from None

