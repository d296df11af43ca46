"""Evaluating a run on new tasks: after training, or rebuilt from its checkpoint (``python -m mamlext eval``)."""
import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from mamlext.train.checkpoints import atomic_write_text, checkpoint_path, load_checkpoint, restore
from mamlext.train.config import SEED_RANGE, check_config, check_int, resolve_device, writable_dir
from mamlext.train.experiments import build_experiment


def eval_seed(config: Dict[str, Any]) -> int:
    """The evaluation tasks' seed: far from the training sampler's, so the tasks are new ones (modulo 2**64, as
    torch takes seeds, so that a --seed near the top of SEED_RANGE has one too)."""
    return config["eval_seed"] if config.get("eval_seed") is not None else (config["seed"] + 1_000_003) % 2**64


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
        print(f"plot of the adapted models: {result['plot']}", flush=True)
    if write and out_dir is not None:
        atomic_write_text(Path(out_dir) / "eval.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(Path(out_dir) / "eval.txt", text + "\n")
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



def run_eval(checkpoint, tasks: Optional[int] = None, seed: Optional[int] = None, device: Optional[str] = None,
             out: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """``python -m mamlext eval CHECKPOINT``: rebuilds the run from its checkpoint and evaluates it on new tasks
    (the run's evaluation seed unless ``seed``). Writes eval.json / eval.txt (and the sine plot) into ``out`` if
    given. ConfigError names a bad argument."""
    if tasks is not None:
        check_int(tasks, "--tasks")
    if seed is not None:
        check_int(seed, "--seed", *SEED_RANGE)
    experiment, config, state = load_run(checkpoint, device=device, progress=progress)
    print(f"checkpoint {checkpoint_path(checkpoint)}: {config['task']}, iteration {state['iteration']} of "
          f"{config['iterations']}", flush=True)
    out_dir = None if out is None else writable_dir(out, "--out")
    result = evaluate_run(experiment, config, out_dir, tasks=tasks, seed=seed, progress=progress,
                          write=out_dir is not None)
    result["iteration"] = state["iteration"]
    return result
