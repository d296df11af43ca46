"""python -m mamlext train / eval / bench: every bad input ends with exit status 2 and one line on stderr that names
the flag (or the file) and what was expected, never a traceback."""
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import mamlext.bench.suite  # noqa: F401  (main imports it; torch may log a warning on stderr when it first does)
from mamlext import train as train_module
from mamlext.__main__ import main
from mamlext.train import make_config, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--iterations", "3", "--meta-batch", "2", "--hidden", "4", "--no-eval", "--no-progress", "--device", "cpu"]
TOO_BIG = 2**70  # beyond torch's seeds, [-2**63, 2**64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny sine run (hidden 4), not to be changed: tests copy it."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    train(make_config("sine", iterations=3, meta_batch=2, hidden=4, log_every=1, checkpoint_every=2, eval_tasks=2,
                      eval_query=5, plot_tasks=0, device="cpu"), out=run_dir, progress=False, evaluate=False)
    return run_dir


def refused(capsys, argv, *needles):
    """Runs the command line in-process; asserts exit status 2 and one line on stderr holding every needle."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("python -m mamlext"), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def edited(run, tmp_path, edit, name="edited"):
    """A copy of the run whose checkpoint went through edit(state)."""
    copy = tmp_path / name
    shutil.copytree(run, copy)
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, copy / "checkpoint.pt")
    return copy


# --- checkpoints ------------------------------------------------------------------------------------------------------

def test_a_negative_iteration_is_refused(run, tmp_path, capsys):
    bad = edited(run, tmp_path, lambda state: state.update(iteration=-5))
    refused(capsys, ["eval", bad, "--no-progress"], bad / "checkpoint.pt", "'iteration' must be an integer >= 0")
    refused(capsys, ["train", "--resume", bad, "--no-progress"], bad / "checkpoint.pt", "-5")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(iteration="3"), "'iteration' must be an integer >= 0, got '3'"),
    (lambda s: s["config"].pop("hidden"), "the config lacks hidden"),
    (lambda s: s.update(learner=[1, 2]), "'learner' is missing or not a dict"),
    (lambda s: s.pop("rng"), "'rng' is missing or not a dict"),
    (lambda s: s.update(window={"sums": {"loss": "x"}, "iterations": 1, "seconds": 0.5}), "'window' is not"),
])
def test_a_malformed_checkpoint_is_refused(run, tmp_path, capsys, edit, message):
    bad = edited(run, tmp_path, edit)
    refused(capsys, ["eval", bad, "--no-progress"], bad / "checkpoint.pt", "malformed mamlext checkpoint", message)


def test_a_garbage_checkpoint_is_called_corrupt(tmp_path, capsys):
    files = {"random.pt": os.urandom(4096), "text.pt": b"hello\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a torch file, but not of tensors and dicts
    for name in (*files, "module.pt"):
        for argv in (["eval", tmp_path / name], ["train", "--resume", tmp_path / name]):
            line = refused(capsys, argv, tmp_path / name, "corrupt, or not a mamlext checkpoint")
            assert "weights_only" not in line


def test_tensors_that_do_not_fit_the_model_are_refused(run, tmp_path, capsys):
    wider = edited(run, tmp_path, lambda state: state["config"].update(hidden=6))  # trained with --hidden 4
    refused(capsys, ["eval", wider, "--no-progress"], wider / "checkpoint.pt", "does not fit", "--hidden 6",
            "size mismatch")
    refused(capsys, ["train", "--resume", wider, "--no-progress"], "does not fit", "--hidden 6")

    def bad_moment(state):
        moments = next(iter(state["optimizer"]["state"].values()))
        moments["exp_avg"] = torch.zeros(3, 3, dtype=moments["exp_avg"].dtype)

    bad = edited(run, tmp_path, bad_moment, name="moment")
    refused(capsys, ["train", "--resume", bad, "--no-progress"], "does not fit", "the optimizer's exp_avg")


# --- output folders ---------------------------------------------------------------------------------------------------

def test_unwritable_out_folders_are_refused_before_the_work(tmp_path, capsys, run):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    # /proc and /sys refuse new entries even to root (whom chmod does not stop)
    for out, why in ((a_file, "is a file, not a folder"), (a_file / "sub", "Not a directory"),
                     ("/proc/mamlext_ro", "cannot write files there"), ("/sys/mamlext_ro", "cannot write files there")):
        refused(capsys, ["train", "sine", *TINY, "--out", out], f"--out {out}", why)
        refused(capsys, ["eval", run, "--tasks", "2", "--no-progress", "--out", out], f"--out {out}", why)
    for out, why in ((a_file, "is a file, not a folder"), ("/proc/mamlext_ro", "cannot write files there")):
        refused(capsys, ["bench", "--suite", "quick", "--device", "cpu", "--workloads", "task_sgd", "--no-progress",
                         "--out", out], f"--out {out}", why)


def test_resuming_a_read_only_run_is_refused(run, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    refused(capsys, ["train", "--resume", copy, "--iterations", "4", "--no-progress", "--no-eval"],
            f"--resume {copy}", "Read-only file system")


# --- numbers --------------------------------------------------------------------------------------------------------

def test_eval_tasks_must_be_positive(run, capsys):
    for tasks in (0, -3):
        refused(capsys, ["eval", run, "--tasks", tasks], "--tasks must be an integer >= 1", str(tasks))
    refused(capsys, ["eval", run, "--tasks", "x"], "--tasks", "invalid int value")  # argparse's, on one line too


def test_threads_must_be_one_per_cpu_at_most(run, capsys):
    refused(capsys, ["train", "sine", *TINY, "--threads", 0], "--threads must be an integer from 1 to")
    refused(capsys, ["eval", run, "--threads", 10**20], "--threads must be an integer from 1 to")
    refused(capsys, ["bench", "--suite", "quick", "--device", "cpu", "--threads", 10**20], "--threads")


def test_seeds_must_be_torch_seeds(run, tmp_path, capsys):
    refused(capsys, ["train", "sine", *TINY, "--seed", TOO_BIG], "--seed must be an integer from 0 to", TOO_BIG)
    refused(capsys, ["train", "sine", *TINY, "--seed", -1], "--seed must be an integer from 0")
    refused(capsys, ["train", "sine", *TINY, "--eval-seed", TOO_BIG], "--eval-seed must be an integer from")
    refused(capsys, ["eval", run, "--seed", TOO_BIG], "--seed must be an integer from", TOO_BIG)
    refused(capsys, ["eval", run, "--seed", -2**63 - 1], "--seed must be an integer from")
    refused(capsys, ["bench", "--suite", "quick", "--device", "cpu", "--seed", TOO_BIG, "--out", tmp_path / "b"],
            "--seed must be an integer from")
    # the top seed trains and evaluates: the seeds derived from it (evaluation, plot) wrap around as torch's do
    top = str(2**64 - 1)
    out = tmp_path / "top"
    assert main(["train", "sine", "--iterations", "1", "--meta-batch", "2", "--hidden", "4", "--no-progress",
                 "--device", "cpu", "--seed", top, "--eval-tasks", "2", "--eval-query", "5", "--plot-tasks", "1",
                 "--out", str(out)]) == 0
    assert main(["eval", str(out), "--seed", top, "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "sine_adaptation.png").exists()


# --- memory -----------------------------------------------------------------------------------------------------------

def test_absurd_sizes_are_refused_up_front_with_the_memory_they_would_need(tmp_path, capsys):
    refused(capsys, ["train", "sine", *TINY, "--hidden", 10**7, "--out", tmp_path / "a"], "--hidden 10000000",
            "training would need about", "GiB of memory")
    refused(capsys, ["train", "sine", *TINY, "--meta-batch", 10**9, "--out", tmp_path / "b"],
            "--meta-batch 1000000000", "GiB of memory")
    # checked before the Omniglot data are read (this folder holds none)
    refused(capsys, ["train", "omniglot", "--data", tmp_path, "--hidden", 10**6, "--no-progress", "--device", "cpu",
                     "--out", tmp_path / "c"], "--hidden 1000000", "--ways 5", "GiB of memory")
    assert not (tmp_path / "a").exists()


def test_the_papers_sizes_are_not_refused():
    cpu = torch.device("cpu")
    configs = [make_config("sine"), make_config("omniglot", data=str(ROOT)),
               make_config("omniglot", data=str(ROOT), ways=20)]
    for config in configs:
        assert train_module.memory_estimate(config) < 2**30  # well under what any machine that trains has
        train_module.check_memory(config, cpu)


def test_running_out_of_memory_at_run_time_is_one_line(tmp_path, capsys, monkeypatch):
    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(train_module.loop, "build_experiment", allocate)  # where the training loop looks it up
    refused(capsys, ["train", "sine", *TINY, "--out", tmp_path / "run"],
            "out of memory allocating 40000000000 bytes", "--hidden, --meta-batch")


def test_a_real_process_exits_2_with_one_line(tmp_path):
    """The exit status and stderr of a real `python -m mamlext` (the tests above call main in-process)."""
    proc = subprocess.run([sys.executable, "-m", "mamlext", "train", "sine", "--hidden", str(10**7), "--no-progress",
                           "--device", "cpu", "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("python -m mamlext")]
    assert len(errors) == 1 and "--hidden 10000000" in errors[0], proc.stderr
