"""The training loop: the run directory, metrics.jsonl, checkpoints (every ``checkpoint_every`` iterations, at the
end, on Ctrl-C) and exact resume."""
import contextlib
import copy
import datetime
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from mamlext import distributed
from mamlext.train.checkpoints import (CHECKPOINT_NAME, atomic_write_text, checkpoint_path, load_checkpoint,
                                       load_rng_state, restore, rng_state, save_checkpoint)
from mamlext.train.config import RESUME_OVERRIDABLE, ConfigError, check_config, resolve_device, writable_dir
from mamlext.train.evaluation import evaluate_run
from mamlext.train.experiments import build_experiment
from mamlext.train.interrupts import Interrupts
from mamlext.train.memory import check_memory


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
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


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
        atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
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
    interrupts = Interrupts()
    snapshot = None
    optimizer = experiment.optimizer
    try:
        with (open(metrics_path, "a") if main else contextlib.nullcontext()) as metrics_file, interrupts:
            while iteration < c["iterations"]:
                snapshot = rng_state(experiment)  # the state to go back to if this iteration is interrupted
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
                                     **({"return": f"{logged['return_post']:.1f}"} if "return_post" in logged
                                        else {}),
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
                load_rng_state(experiment, snapshot)
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
