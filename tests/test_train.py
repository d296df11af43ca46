"""python -m mamlext train / eval: run directory, checkpoints, exact resume, Ctrl-C, evaluation math, bad arguments."""
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from mamlext import evaluate
from mamlext.__main__ import main
from mamlext.data import SinusoidTasks
from mamlext import train as train_module
from mamlext.train import ConfigError, load_checkpoint, load_run, make_config, train

OMNIGLOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "omniglot"
SMALL1 = ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
UNSEEN = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]


def _omniglot_available():
    try:
        from mamlext.data import Omniglot  # noqa: F401
    except ImportError:
        return False
    return OMNIGLOT.is_dir() and any(OMNIGLOT.glob("images_*"))


needs_omniglot = pytest.mark.skipif(not _omniglot_available(),
                                    reason="no Omniglot data in ../shared/data/omniglot or no mamlext.data.Omniglot")


def tiny_sine(**overrides):
    options = dict(iterations=40, meta_batch=4, hidden=8, log_every=5, checkpoint_every=10, eval_tasks=20,
                   eval_query=10, plot_tasks=0, device="cpu")
    options.update(overrides)
    return make_config("sine", **options)


def final_state(run_dir):
    """(parameters, optimizer state, iteration) of a run's checkpoint, rebuilt as the model and optimizer."""
    experiment, _, state = load_run(run_dir, device="cpu", progress=False)
    params = [p.detach().clone() for p in experiment.learner.parameters()]
    return params, experiment.optimizer.state_dict(), state


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a, b):
    """The runs' metrics.jsonl lines are the same but for the timings: iterations, and averages bit for bit."""
    def untimed(run_dir):
        return [{k: v for k, v in m.items() if k not in ("tasks_per_s", "elapsed_s")} for m in metrics(run_dir)]

    assert untimed(b) == untimed(a)
    assert all(m["tasks_per_s"] > 0 for m in metrics(b))


def assert_same_state(a, b):
    params_a, opt_a, state_a = a
    params_b, opt_b, state_b = b
    assert state_a["iteration"] == state_b["iteration"]
    assert len(params_a) == len(params_b)
    for x, y in zip(params_a, params_b):
        assert torch.equal(x, y)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for key in opt_a["state"]:
        for name, value in opt_a["state"][key].items():
            assert torch.equal(value, opt_b["state"][key][name]), (key, name)
    sampler_a, sampler_b = state_a["rng"]["sampler"], state_b["rng"]["sampler"]
    if isinstance(sampler_a, dict):  # TaskSampler.state_dict()
        sampler_a, sampler_b = sampler_a["generator"], sampler_b["generator"]
    assert torch.equal(sampler_a, sampler_b)
    assert torch.equal(state_a["rng"]["torch"], state_b["rng"]["torch"])


# --- a run writes config, metrics and checkpoints ---------------------------------------------------------------------

def test_sine_run_writes_config_metrics_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = train(tiny_sine(plot_tasks=2), out=run, progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "sine" and config["iterations"] == 40 and config["inner_steps"] == 1
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(math.isfinite(m["loss"]) and m["tasks_per_s"] > 0 for m in lines)
    state = load_checkpoint(run)
    assert state["iteration"] == 40
    assert {"model", "learner", "optimizer", "rng", "config", "iteration"} <= set(state)
    assert {"torch", "sampler"} <= set(state["rng"])
    assert not list(run.glob(".*tmp*"))  # the atomic writes left no temporary file
    assert (run / "sine_adaptation.png").stat().st_size > 1000
    ev = json.loads((run / "eval.json").read_text())
    assert {(r["shots"], r["steps"]) for r in ev["rows"]} == {(k, n) for k in (5, 10, 20) for n in (1, 5, 10)}
    assert result["eval"]["rows"] == ev["rows"]
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_sine(), out=run, progress=False)


def test_default_sine_config_is_finns_setup():
    config = make_config("sine")
    assert (config["hidden"], config["shots"], config["query"], config["inner_steps"], config["meta_batch"],
            config["meta_lr"], config["eval_tasks"]) == (40, 10, 10, 1, 25, 1e-3, 600)
    assert config["eval_shots"] == [5, 10, 20] and config["eval_steps"] == [1, 5, 10]
    five, twenty = make_config("omniglot", data=str(Path(__file__))), make_config("omniglot", data=str(Path(
        __file__)), ways=20)
    assert (five["inner_lr"], five["inner_steps"], five["meta_batch"], five["test_steps"], five["query"]) == (
        0.4, 1, 32, 3, 15)
    assert (twenty["inner_lr"], twenty["inner_steps"], twenty["meta_batch"], twenty["test_steps"]) == (0.1, 5, 16, 5)


# --- exact resume -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["maml", "metasgd"])
def test_resume_is_bitwise_exact(tmp_path, algo):
    train(tiny_sine(algo=algo), out=tmp_path / "full", progress=False, evaluate=False)
    train(tiny_sine(algo=algo, iterations=20), out=tmp_path / "half", progress=False, evaluate=False)
    assert load_checkpoint(tmp_path / "half")["iteration"] == 20
    train(resume=tmp_path / "half", overrides={"iterations": 40}, progress=False, evaluate=False)
    full, resumed = final_state(tmp_path / "full"), final_state(tmp_path / "half")
    assert_same_state(full, resumed)
    if algo == "metasgd":  # the learnable rates are in the learner's parameters, and they moved
        assert len(full[0]) == 12 and not torch.equal(full[0][-1], torch.full_like(full[0][-1], 0.001))
    # the resumed run's metrics log has each iteration once, with the uninterrupted run's numbers
    assert [m["iteration"] for m in metrics(tmp_path / "half")] == list(range(5, 45, 5))
    assert_same_metrics(tmp_path / "full", tmp_path / "half")


class Killed(Exception):
    """The process dying (SIGKILL, a power cut): nothing is saved on the way out."""


def test_a_killed_and_resumed_run_writes_the_metrics_of_an_uninterrupted_one(tmp_path):
    # a checkpoint every 7 iterations, a metrics line every 5: the line of iteration 15 spans the checkpoint of 14
    train(tiny_sine(checkpoint_every=7), out=tmp_path / "full", progress=False, evaluate=False)

    def die(iteration, logged):
        if iteration == 17:  # after the line of 15, which the resumed run writes again
            raise Killed

    with pytest.raises(Killed):
        train(tiny_sine(checkpoint_every=7), out=tmp_path / "cut", progress=False, evaluate=False, callback=die)
    assert load_checkpoint(tmp_path / "cut")["iteration"] == 14
    # a checkpoint written before the window was saved still resumes (its line of 15 averages 15 alone)
    shutil.copytree(tmp_path / "cut", tmp_path / "old")
    old = load_checkpoint(tmp_path / "old")
    old.pop("window", None)
    torch.save(old, tmp_path / "old" / "checkpoint.pt")
    for run in ("cut", "old"):
        train(resume=tmp_path / run, progress=False, evaluate=False)
        assert_same_state(final_state(tmp_path / "full"), final_state(tmp_path / run))
    assert_same_metrics(tmp_path / "full", tmp_path / "cut")
    assert [m["iteration"] for m in metrics(tmp_path / "old")] == list(range(5, 45, 5))


def test_resume_rejects_changed_hyperparameters_and_missing_checkpoints(tmp_path):
    train(tiny_sine(iterations=10), out=tmp_path / "run", progress=False, evaluate=False)
    with pytest.raises(ConfigError, match="cannot change: --inner-lr"):
        train(resume=tmp_path / "run", overrides={"inner_lr": 0.5}, progress=False)
    with pytest.raises(ConfigError, match="below the checkpoint"):
        train(resume=tmp_path / "run", overrides={"iterations": 5}, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(resume=tmp_path / "nothing", progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt, or not a mamlext checkpoint"):
        train(resume=tmp_path / "junk.pt", progress=False)


# --- Ctrl-C ---------------------------------------------------------------------------------------------------------

def test_keyboard_interrupt_between_iterations_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    train(tiny_sine(), out=tmp_path / "full", progress=False, evaluate=False)

    def stop(iteration, logged):
        if iteration == 13:  # not a checkpoint iteration
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_sine(), out=tmp_path / "cut", progress=False, evaluate=False, callback=stop)
    assert load_checkpoint(tmp_path / "cut")["iteration"] == 13
    train(resume=tmp_path / "cut", progress=False, evaluate=False)
    assert_same_state(final_state(tmp_path / "full"), final_state(tmp_path / "cut"))
    assert_same_metrics(tmp_path / "full", tmp_path / "cut")  # the line of 15 averages 11-15, as uninterrupted


def test_keyboard_interrupt_mid_iteration_drops_the_iteration_and_rewinds_the_sampler(tmp_path, monkeypatch):
    train(tiny_sine(), out=tmp_path / "full", progress=False, evaluate=False)
    original, calls = SinusoidTasks.sample, []

    def sample(self, *args, **kwargs):
        batch = original(self, *args, **kwargs)  # the sampler's RNG has moved on when the interrupt comes
        calls.append(1)
        if len(calls) == 17:
            raise KeyboardInterrupt
        return batch

    monkeypatch.setattr(SinusoidTasks, "sample", sample)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_sine(), out=tmp_path / "cut", progress=False, evaluate=False)
    monkeypatch.setattr(SinusoidTasks, "sample", original)
    assert load_checkpoint(tmp_path / "cut")["iteration"] == 16
    train(resume=tmp_path / "cut", progress=False, evaluate=False)
    assert_same_state(final_state(tmp_path / "full"), final_state(tmp_path / "cut"))
    assert_same_metrics(tmp_path / "full", tmp_path / "cut")


def test_sigint_saves_a_checkpoint_and_the_cli_exits_130(tmp_path, capsys):
    def ctrl_c(iteration, logged):
        if iteration == 7:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_sine(), out=tmp_path / "cut", progress=False, evaluate=False, callback=ctrl_c)
    assert load_checkpoint(tmp_path / "cut")["iteration"] in (7, 8)
    assert "python -m mamlext train --resume" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back

    original = train_module.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    train_module.train = interrupted
    try:
        assert main(["train", "sine", "--no-progress", "--out", str(tmp_path / "x")]) == 130
    finally:
        train_module.train = original


# --- evaluation -------------------------------------------------------------------------------------------------------

def test_mean_ci95_on_known_values():
    mean, ci = evaluate.mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert ci == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)  # std (n - 1) = sqrt(5/3), sqrt(n) = 2
    assert evaluate.mean_ci95([0.7]) == (0.7, 0.0)
    mean, ci = evaluate.mean_ci95([1.0, float("inf")])
    assert not math.isfinite(mean)
    with pytest.raises(ValueError):
        evaluate.mean_ci95([])


def test_sine_table_beside_the_paper():
    rows = [{"shots": 5, "steps": 1, "mse": 0.70, "ci95": 0.05, "tasks": 600, "diverged": 0},
            {"shots": 5, "steps": 5, "mse": 0.50, "ci95": 0.05, "tasks": 600, "diverged": 0},
            {"shots": 5, "steps": 10, "mse": float("nan"), "ci95": float("nan"), "tasks": 600, "diverged": 2},
            {"shots": 10, "steps": 1, "mse": 0.30, "ci95": 0.02, "tasks": 600, "diverged": 0}]
    table = evaluate.format_sine_table(rows)
    lines = table.splitlines()
    assert "0.700 ± 0.050" in lines[2] and "0.67" in lines[2] and "2.41" in lines[2]
    assert "0.38" in lines[3] and "2.23" in lines[3]
    assert "2 of 600 tasks diverged" in lines[4]
    assert lines[5].split()[:2] == ["10", "1"] and "-" in lines[5]
    assert "1 step: yes, 5 steps: NO, 10 steps: NO" in table  # 0.70 - 0.05 <= 0.67; 0.45 > 0.38; nan


def test_evaluate_sine_matches_a_direct_computation():
    torch.manual_seed(0)
    from mamlext import BatchedMAML
    from mamlext.models import sine_mlp

    learner = BatchedMAML(sine_mlp(8), inner_lr=0.01)
    rows = evaluate.evaluate_sine(learner, tasks=30, shots=[5], steps=[0, 2], query=7, seed=3)
    batch = SinusoidTasks(seed=3).sample(30, 5, 7)
    with torch.no_grad():
        direct = (learner.model(batch.x_query) - batch.y_query).pow(2).mean(dim=(1, 2)).double()
    assert rows[0]["mse"] == pytest.approx(direct.mean().item(), rel=1e-6)
    assert rows[0]["ci95"] == pytest.approx(1.96 * direct.std().item() / math.sqrt(30), rel=1e-5)
    assert rows[1]["steps"] == 2 and rows[1]["mse"] < rows[0]["mse"]


def test_eval_cli_reproduces_the_runs_evaluation(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_sine(), out=run, progress=False)
    capsys.readouterr()
    assert main(["eval", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "iteration 40 of 40" in out
    assert (run / "eval.txt").read_text().strip() in out  # the same tasks: the same table
    assert main(["eval", str(run / "checkpoint.pt"), "--tasks", "12", "--seed", "5", "--no-progress",
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["tasks"] == 12
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_train_sine_and_resume(tmp_path, capsys):
    run = tmp_path / "cli"
    common = ["--meta-batch", "3", "--hidden", "8", "--log-every", "2", "--checkpoint-every", "4", "--no-progress",
              "--no-eval", "--device", "cpu"]
    assert main(["train", "sine", "--iterations", "6", "--out", str(run), *common]) == 0
    assert main(["train", "--resume", str(run), "--iterations", "10", "--no-progress", "--no-eval"]) == 0
    assert load_checkpoint(run)["iteration"] == 10
    assert main(["train", "omniglot", "--resume", str(run)]) == 2
    assert "is a sine run" in capsys.readouterr().err


# --- omniglot ---------------------------------------------------------------------------------------------------------

@needs_omniglot
def test_tiny_omniglot_run_trains_on_some_alphabets_and_tests_on_unseen_ones(tmp_path):
    config = make_config("omniglot", data=str(OMNIGLOT), ways=5, shots=1, query=2, hidden=8, iterations=2,
                         meta_batch=2, log_every=1, checkpoint_every=1, eval_tasks=6, train_alphabets=SMALL1,
                         test_alphabets=UNSEEN, device="cpu")
    result = train(config, out=tmp_path / "omni", progress=False)
    state = load_checkpoint(tmp_path / "omni")
    assert state["iteration"] == 2 and "generator" in state["rng"]["sampler"]
    ev = result["eval"]
    assert ev["test_alphabets"] == UNSEEN and ev["tasks"] == 6 and 0.0 <= ev["accuracy"] <= 1.0
    lines = [json.loads(line) for line in (tmp_path / "omni" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2] and all(0 <= m["accuracy"] <= 1 for m in lines)
    # 1 iteration + resume to 2 ends where the uninterrupted run did
    train(dict(config, iterations=1), out=tmp_path / "cut", progress=False, evaluate=False)
    train(resume=tmp_path / "cut", overrides={"iterations": 2}, progress=False, evaluate=False)
    assert_same_state(final_state(tmp_path / "omni"), final_state(tmp_path / "cut"))


@needs_omniglot
def test_omniglot_bad_arguments(tmp_path, capsys):
    data = ["--data", str(OMNIGLOT), "--hidden", "8", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(["train", "omniglot", *data, "--ways", "1000", "--train-alphabets", "Latin",
                 "--test-alphabets", "Greek"]) == 2
    assert "--ways 1000 is larger than the" in capsys.readouterr().err
    assert main(["train", "omniglot", *data, "--train-alphabets", "Latin"]) == 2  # the default test split has Latin
    assert "are also training alphabets" in capsys.readouterr().err
    assert main(["train", "omniglot", *data, "--train-alphabets", "Klingon"]) == 2
    assert "Klingon" in capsys.readouterr().err
    assert main(["train", "omniglot", *data, "--train-alphabets", "Latin", "--test-alphabets", "Latin,Greek"]) == 2
    assert "share ['Latin']" in capsys.readouterr().err


# --- bad arguments ----------------------------------------------------------------------------------------------------

def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "imagenet"])
    assert exit_info.value.code == 2 and "invalid choice: 'imagenet'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train"])
    assert "needs a task" in capsys.readouterr().err
    assert main(["train", "omniglot"]) == 2
    assert "needs --data DIR" in capsys.readouterr().err
    assert main(["train", "omniglot", "--data", str(tmp_path / "nowhere")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["train", "omniglot", "--data", str(tmp_path), "--algo", "metasgd"]) == 2
    assert "`train omniglot` does not drive it" in capsys.readouterr().err
    for algo in ("anil", "imaml", "reptile"):  # classes for one's own loop, not offered by `train`
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "sine", "--algo", algo])
        assert exit_info.value.code == 2 and f"invalid choice: '{algo}'" in capsys.readouterr().err
    assert main(["train", "sine", "--ways", "5"]) == 2
    assert "train sine has no option --ways" in capsys.readouterr().err
    assert main(["train", "sine", "--iterations", "0"]) == 2
    assert "--iterations must be an integer >= 1" in capsys.readouterr().err
    assert main(["train", "sine", "--inner-lr", "-1"]) == 2
    assert "--inner-lr must be a finite number > 0" in capsys.readouterr().err
    assert main(["train", "sine", "--device", "tpu"]) == 2
    assert "--device must be cpu or cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "sine", "--device", "cuda"]) == 2
        assert "no GPU is visible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "sine", "--eval-shots", "5,x"])
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
