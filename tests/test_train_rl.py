"""python -m mamlext train nav (MAML-TRPO): run directory, exact resume, Ctrl-C mid-iteration, evaluation, the CLI,
bad arguments. Tiny settings: a few tasks, short episodes, a narrow policy."""
import json

import pytest
import torch

from mamlext.__main__ import main
from mamlext.rl import sampling
from mamlext.rl.evaluation import PAPER_NAV, format_nav_table
from mamlext.train import ConfigError, load_checkpoint, load_run, make_config, train


def tiny_nav(**overrides):
    options = dict(iterations=6, meta_batch=3, episodes=2, horizon=8, hidden=8, log_every=2, checkpoint_every=3,
                   eval_tasks=3, eval_episodes=2, test_steps=2, plot_tasks=0, device="cpu")
    options.update(overrides)
    return make_config("nav", **options)


def state_of(run_dir):
    experiment, _, state = load_run(run_dir, device="cpu", progress=False)
    return [p.detach().clone() for p in experiment.learner.parameters()], state


def assert_same_runs(a, b):
    params_a, state_a = state_of(a)
    params_b, state_b = state_of(b)
    assert state_a["iteration"] == state_b["iteration"]
    assert len(params_a) == len(params_b)
    for x, y in zip(params_a, params_b):
        assert torch.equal(x, y)
    assert torch.equal(state_a["rng"]["sampler"], state_b["rng"]["sampler"])
    untimed = lambda run: [{k: v for k, v in json.loads(line).items() if k not in ("tasks_per_s", "elapsed_s")}  # noqa
                           for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert untimed(a) == untimed(b)


def test_default_nav_config_is_the_papers_setting():
    c = make_config("nav")
    assert (c["meta_batch"], c["episodes"], c["horizon"], c["hidden"], c["inner_lr"]) == (20, 20, 100, 100, 0.5)
    assert (c["gamma"], c["gae_lambda"], c["max_kl"], c["eval_tasks"], c["eval_episodes"], c["test_steps"]) == \
        (0.99, 1.0, 0.01, 40, 40, 3)


@pytest.mark.parametrize("algo", ["maml", "metasgd"])
def test_nav_run_resumes_exactly(tmp_path, algo):
    result = train(tiny_nav(algo=algo), out=tmp_path / "full", progress=False, evaluate=False)
    assert result["iteration"] == 6
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [2, 4, 6]
    assert all(k in lines[0] for k in ("loss", "return_pre", "return_post", "kl", "step_fraction"))
    assert all(m["kl"] < 0.01 + 1e-12 for m in lines)
    params = state_of(tmp_path / "full")[0]
    torch.manual_seed(0)  # the resumed run must not depend on the global RNG's state at its start
    train(tiny_nav(algo=algo, iterations=4), out=tmp_path / "half", progress=False, evaluate=False)
    train(resume=tmp_path / "half", overrides={"iterations": 6}, progress=False, evaluate=False)
    assert_same_runs(tmp_path / "full", tmp_path / "half")
    assert len(params) == (14 if algo == "metasgd" else 7)  # Meta-SGD's rates are saved with the policy


def test_nav_interrupt_mid_iteration_rewinds_and_resumes_exactly(tmp_path, monkeypatch):
    train(tiny_nav(), out=tmp_path / "full", progress=False, evaluate=False)
    original, calls = sampling.sample_episodes, []

    def sample(*args, **kwargs):
        episodes = original(*args, **kwargs)  # the generator has moved on when the interrupt comes
        calls.append(1)
        if len(calls) == 8:  # the query sampling of iteration 4
            raise KeyboardInterrupt
        return episodes

    import mamlext.train.experiments as experiments
    monkeypatch.setattr(experiments, "sample_episodes", sample)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_nav(), out=tmp_path / "cut", progress=False, evaluate=False)
    monkeypatch.setattr(experiments, "sample_episodes", original)
    assert load_checkpoint(tmp_path / "cut")["iteration"] == 3
    train(resume=tmp_path / "cut", progress=False, evaluate=False)
    assert_same_runs(tmp_path / "full", tmp_path / "cut")


def test_nav_evaluation_table_and_plot(tmp_path, capsys):
    result = train(tiny_nav(plot_tasks=2), out=tmp_path / "run", progress=False)
    rows = result["eval"]["rows"]
    assert [r["steps"] for r in rows] == [0, 1, 2]
    assert all(-8 * 1.5 <= r["mean"] <= 0 for r in rows)  # -distance per step, at most ~1.4 from the goal
    assert (tmp_path / "run" / "nav_trajectories.png").stat().st_size > 0
    text = (tmp_path / "run" / "eval.txt").read_text()
    assert f"{PAPER_NAV['MAML'][1]:.2f}" in text and "oracle" in text
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["rows"] == rows
    # the CLI's eval rebuilds the run and gives the same numbers
    assert main(["eval", str(tmp_path / "run"), "--no-progress"]) == 0
    assert format_nav_table(result["eval"]).splitlines()[2] in capsys.readouterr().out


def test_max_kl_bounds_every_accepted_step(tmp_path):
    result = train(tiny_nav(max_kl=0.002, iterations=4, log_every=1), out=tmp_path / "run", progress=False,
                   evaluate=False)
    assert result["iteration"] == 4
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m["step_fraction"] > 0 for m in lines)
    assert all(m["kl"] < 0.002 for m in lines)


def test_tiny_cheetah_run_trains_and_evaluates(tmp_path, monkeypatch):
    pytest.importorskip("mujoco")
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the working directory
    config = make_config("cheetah-dir", iterations=1, meta_batch=2, episodes=1, horizon=5, hidden=4, eval_tasks=2,
                         eval_episodes=1, test_steps=1, device="cpu")
    result = train(config, out=tmp_path / "run", progress=False)
    assert result["iteration"] == 1
    assert [r["steps"] for r in result["eval"]["rows"]] == [0, 1]
    assert "cheetah-dir, 2 new tasks" in (tmp_path / "run" / "eval.txt").read_text()


def test_cli_train_nav(tmp_path, capsys):
    assert main(["train", "nav", "--iterations", "2", "--meta-batch", "2", "--episodes", "2", "--hidden", "8",
                 "--eval-tasks", "2", "--eval-episodes", "2", "--test-steps", "1", "--plot-tasks", "0",
                 "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "trained 2 iterations" in out and "2D navigation" in out


@pytest.mark.parametrize("flag, value, message", [
    ("--max-kl", "0", "--max-kl must be a finite number > 0"),
    ("--episodes", "0", "--episodes must be an integer >= 1"),
    ("--eval-episodes", "-1", "--eval-episodes must be an integer >= 1"),
    ("--algo", "fomaml", None),
])
def test_cli_nav_bad_arguments(tmp_path, capsys, flag, value, message):
    if message is None:  # a valid flag: just check it parses into the config
        assert make_config("nav", algo=value)["first_order"] is True
        return
    assert main(["train", "nav", flag, value, "--no-progress", "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_nav_config_errors():
    with pytest.raises(ConfigError, match="--gamma must be a number from 0 to 1"):
        make_config("nav", gamma=1.5)
    with pytest.raises(ConfigError, match="train nav has no option --shots"):
        make_config("nav", shots=5)
