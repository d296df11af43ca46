"""Command line: python -m mamlext info | demo | train | eval | bench"""
import argparse
import json
import re
import sys


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): exit status 2 and "PROG: error: MESSAGE", the form
    of every other bad argument's message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _print_info(as_json: bool) -> None:
    from mamlext import backend_info

    info = backend_info()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    print(f"mamlext {info['mamlext_version']}, torch {info['torch_version']} (CUDA {info['torch_cuda']})")
    if info["extension_loaded"]:
        print(f"compiled extension: loaded (built against torch {info['extension_built_with_torch']}"
              f"{', debug build' if info['debug_build'] else ''})")
    else:
        print(f"compiled extension: NOT loaded: {info['extension_error']}")
    print(f"CPU kernels:  {yes(info['cpu_kernels'])}")
    print(f"CUDA kernels: {yes(info['cuda_kernels'])}"
          + (f" (archs {', '.join(info['cuda_archs'])})" if info["cuda_kernels"] else ""))
    print(f"GPU visible:  {', '.join(info['gpus']) if info['gpu_visible'] else 'no'}")
    for device, backend in info["backend"].items():
        print(f"ops on {device:4s} -> {backend}")
    cpu_only = [op for op, devices in info["op_kernels"].items() if devices == ["cpu"]]
    if info["cuda_kernels"] and cpu_only:
        print(f"CPU kernels only (plain PyTorch on CUDA): {', '.join(cpu_only)}")


def _int_list(text: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def _name_list(text: str):
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated alphabet names, got {text!r}")
    return values


# argparse dest -> config key, for every train option that goes into the config
_TRAIN_OPTIONS = ("algo", "first_order", "iterations", "meta_batch", "shots", "query", "inner_lr", "inner_steps",
                  "test_steps", "meta_lr", "hidden", "seed", "dtype", "device", "checkpoint_every", "log_every",
                  "eval_tasks", "eval_seed", "eval_shots", "eval_steps", "eval_query", "plot_tasks", "data", "ways",
                  "train_alphabets", "test_alphabets", "cache_dir", "episodes", "horizon", "max_kl", "eval_episodes")


def _add_train_parser(commands) -> argparse.ArgumentParser:
    from mamlext.train import ALGOS, DEFAULT_SINE_ITERATIONS, DTYPES, TASKS

    train = commands.add_parser(
        "train", help="meta-train: sine (Finn et al.'s sinusoids, the default main job), omniglot, or nav "
                      "(2D navigation by MAML-TRPO)",
        description="Meta-train a model, then evaluate it on new tasks. Every option defaults to the paper's setting "
                    "for the task (Finn et al. 2017); a run directory gets config.json, metrics.jsonl and "
                    "checkpoint.pt. Examples:  python -m mamlext train sine;  python -m mamlext train omniglot "
                    "--data DIR --ways 5 --shots 1;  python -m mamlext train nav;  python -m mamlext train --resume runs/sine-...;  on P processes "
                    "or GPUs: torchrun --nproc_per_node=P -m mamlext train sine (each takes a share of every "
                    "meta-batch)")
    train.add_argument("task", nargs="?", choices=TASKS, help="the task family (not needed with --resume)")
    g = train.add_argument_group("algorithm")
    g.add_argument("--algo", choices=ALGOS, help="maml (default), fomaml; sine also metasgd (learned per-parameter "
                   "rates)")
    g.add_argument("--first-order", action="store_true", default=None, help="first-order MAML (same as --algo fomaml)")
    g.add_argument("--iterations", type=int, help=f"meta-iterations (sine: {DEFAULT_SINE_ITERATIONS}; omniglot: "
                   "60000 as in the paper)")
    g.add_argument("--meta-batch", type=int, help="tasks per meta-iteration (sine 25; omniglot 5-way 32, 20-way 16)")
    g.add_argument("--shots", type=int, help="K support examples per task (sine) or per class (omniglot)")
    g.add_argument("--query", type=int, help="query examples per task (sine 10) or per class (omniglot 15)")
    g.add_argument("--inner-lr", type=float, help="alpha, the inner SGD step (sine 0.001, as in the paper's code; "
                   "omniglot 5-way 0.4, 20-way 0.1)")
    g.add_argument("--inner-steps", type=int, help="inner SGD steps in meta-training (sine 1; omniglot 5-way 1, "
                   "20-way 5)")
    g.add_argument("--meta-lr", type=float, help="Adam's learning rate (1e-3)")
    g.add_argument("--hidden", type=int, help="hidden width (sine 40, nav 100) or conv filters (omniglot 64)")
    g = train.add_argument_group("nav (MAML-TRPO)")
    g.add_argument("--episodes", type=int, help="episodes per task and meta-iteration (20)")
    g.add_argument("--horizon", type=int, help="steps per episode (nav 100, cheetah 200)")
    g.add_argument("--max-kl", type=float, help="TRPO's trust region: the largest mean KL of a meta-update (0.01)")
    g.add_argument("--eval-episodes", type=int, help="episodes per goal and gradient step at evaluation (40)")
    g = train.add_argument_group("omniglot")
    g.add_argument("--data", help="folder (or archive) with images_background*.zip / images_evaluation*.zip")
    g.add_argument("--ways", type=int, help="N classes per task (5)")
    g.add_argument("--test-steps", type=int, help="inner steps at test time (omniglot 5-way 3, 20-way 5; nav 3)")
    g.add_argument("--train-alphabets", type=_name_list, help="comma-separated alphabets to train on (default: "
                   "the data's train split)")
    g.add_argument("--test-alphabets", type=_name_list, help="comma-separated alphabets to test on, none of them "
                   "trained on (default: the data's test split)")
    g.add_argument("--cache-dir", help="where the decoded images are cached (default: beside the data, or "
                   "~/.cache/mamlext)")
    g = train.add_argument_group("evaluation")
    g.add_argument("--eval-tasks", type=int, help="new tasks to evaluate on after training (600; nav 40 goals)")
    g.add_argument("--eval-seed", type=int, help="seed of the evaluation tasks (default: --seed + 1000003)")
    g.add_argument("--eval-shots", type=_int_list, help="sine: K values to evaluate, comma-separated (5,10,20)")
    g.add_argument("--eval-steps", type=_int_list, help="sine: inner step counts to evaluate (1,5,10)")
    g.add_argument("--eval-query", type=int, help="sine: query points per evaluation task (100)")
    g.add_argument("--plot-tasks", type=int, help="sine: tasks in the PNG of adapted curves (4), nav: goals in the "
                   "PNG of adapted trajectories (2); 0: no plot")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    g = train.add_argument_group("run")
    g.add_argument("--seed", type=int, help="seed of the model's initialisation and the task sampler (0)")
    g.add_argument("--dtype", choices=tuple(DTYPES), help="float32 (default) or float64")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--out", help="run directory (default: runs/<name>-<timestamp>)")
    g.add_argument("--resume", metavar="RUN_DIR_OR_CHECKPOINT", help="continue a run exactly where its checkpoint "
                   "left it (only --iterations, --checkpoint-every, --log-every, --device and the evaluation "
                   "options may change)")
    g.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints (sine 5000, omniglot 500)")
    g.add_argument("--log-every", type=int, help="iterations between metrics.jsonl lines (sine 250, omniglot 10)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--threads", type=int, help="CPU threads of torch (torch.set_num_threads; default: torch's). On a "
                   "shared machine whose cores are busy, --threads 1 can be several times faster for conv nets")
    return train


def _add_eval_parser(commands) -> argparse.ArgumentParser:
    ev = commands.add_parser("eval", help="re-evaluate a saved run on new tasks",
                             description="Rebuild a run from its checkpoint and evaluate it on new tasks (by default "
                                         "the run's own evaluation tasks, so the numbers match the run's eval.txt).")
    ev.add_argument("checkpoint", help="a run directory or a checkpoint file")
    ev.add_argument("--tasks", type=int, help="number of new tasks (default: the run's, 600)")
    ev.add_argument("--seed", type=int, help="seed of the evaluation tasks (default: the run's)")
    ev.add_argument("--device", help="cpu or cuda (default: the run's when available)")
    ev.add_argument("--out", help="folder for eval.json / eval.txt (and the sine plot); default: print only")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's)")
    return ev


def _train(parser, args) -> int:
    from mamlext import train as train_module
    from mamlext.distributed import PeerLost

    train_module.set_threads(args.threads)

    options = {name: getattr(args, name) for name in _TRAIN_OPTIONS}
    try:
        if args.resume is not None:
            given = {k: v for k, v in options.items() if v is not None}
            if args.task is not None:
                saved = train_module.load_checkpoint(args.resume)["config"]["task"]
                if saved != args.task:
                    raise train_module.ConfigError(f"--resume {args.resume} is a {saved} run, not {args.task}")
            train_module.train(resume=args.resume, out=args.out, overrides=given, progress=not args.no_progress,
                               evaluate=not args.no_eval)
        else:
            if args.task is None:
                parser.error("train needs a task (sine, omniglot or nav), or --resume RUN_DIR")
            config = train_module.make_config(args.task, **options)
            train_module.train(config, out=args.out, progress=not args.no_progress, evaluate=not args.no_eval)
    except PeerLost as error:  # under torchrun: another process died or stopped answering
        print(f"python -m mamlext train: error: the processes of the run lost each other: {error}", file=sys.stderr)
        return 1
    return 0


def _eval(parser, args) -> int:
    from mamlext import train as train_module

    train_module.set_threads(args.threads)
    train_module.run_eval(args.checkpoint, tasks=args.tasks, seed=args.seed, device=args.device, out=args.out,
                          progress=not args.no_progress)
    return 0


def _out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory errors: CUDA's OutOfMemoryError, or the plain RuntimeError of the CPU allocator."""
    import torch

    text = str(error)
    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text))


# what to make smaller when a command runs out of memory
_MEMORY_OPTIONS = {"train": "--hidden, --meta-batch, --eval-tasks", "eval": "--tasks",
                   "bench": "--suite quick, --workloads"}


def _run(command, run, parser, args) -> int:
    """run(parser, args): train, eval or bench. A bad argument (ConfigError, whose message names the flag), a missing
    file or memory running out ends with exit status 2 and one line on stderr; Ctrl-C with 130."""
    from mamlext.train import ConfigError

    try:
        return run(parser, args)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, FileNotFoundError) as error:
        message = str(error)
    except (RuntimeError, MemoryError) as error:
        if not _out_of_memory(error):
            raise
        amount = re.search(r"[Tt]ried to allocate ([\d.]+ ?\w+)", str(error))
        message = (f"out of memory{' allocating ' + amount.group(1) if amount else ''}: use smaller sizes "
                   f"({_MEMORY_OPTIONS[command]})")
    print(f"python -m mamlext {command}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = _Parser(prog="python -m mamlext", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, compiled kernels and the backend used on each device")
    info.add_argument("--json", action="store_true", help="print as JSON")
    demo = commands.add_parser("demo", help="what `make demo` runs after the build: info, then `train sine` (Finn et "
                                              "al.'s sinusoid MAML, then its evaluation)")
    demo.add_argument("--iterations", type=int, help="meta-iterations of train sine (default: train's, the paper's)")
    demo.add_argument("--out", help="the run directory (default: train's)")
    train = _add_train_parser(commands)
    ev = _add_eval_parser(commands)
    bench = commands.add_parser("bench", help="benchmark mamlext against pure-PyTorch MAML side by side",
                                description="Times one meta-iteration of every implementation (plain per-task loop, "
                                            "torch.func vmap, higher, torchopt, mamlext's engines) on the same data "
                                            "after checking their meta-gradients against the plain loop's; writes "
                                            "results.json, results.md and speedup.png and prints a table.")
    from mamlext.bench import suite as bench_suite

    bench_suite.add_arguments(bench)
    args = parser.parse_args(argv)

    runs = {"train": (_train, train), "eval": (_eval, ev), "bench": (bench_suite.main, bench)}
    if args.command in runs:
        return _run(args.command, *runs[args.command], args)
    if args.command == "info":
        _print_info(args.json)
    elif args.command == "demo":
        _print_info(False)
        options = [f"--{name}={value}" for name, value in (("iterations", args.iterations), ("out", args.out))
                   if value is not None]
        return main(["train", "sine", *options])
    return 0


if __name__ == "__main__":
    sys.exit(main())
