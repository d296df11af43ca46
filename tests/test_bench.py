"""python -m mamlext bench: the quick suite's JSON schema and plot, and the pieces that decide a row's fate (the
meta-gradient check, failures and skips of implementations). No timing assertions."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from mamlext.bench import suite
from mamlext.bench.common import MEMORY_KINDS, mismatch, peak_memory
from mamlext.bench.impls import MAMLEXT_IMPLS, Skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(*args, timeout):
    """Runs python with args in the repository root, with this checkout's mamlext importable."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


TIMING_KEYS = ("median_ms", "iqr_ms", "q1_ms", "q3_ms", "tasks_per_s")
STATUSES = ("ok", "failed", "skipped")


def _check_row(row):
    assert row["status"] in STATUSES, row
    assert row["impl"] and row["case"] and row["workload"] in suite.WORKLOADS
    if row["status"] == "ok":
        for key in TIMING_KEYS:
            assert isinstance(row[key], float) and row[key] >= 0, (key, row)
        assert row["median_ms"] > 0 and isinstance(row["samples"], int) and row["samples"] >= 1
        assert row["reason"] is None
        if row["impl"] != suite.REFERENCE:  # passed the check: within the workload's tolerance
            assert row["rel_error"] <= suite.RTOL[suite.CHECK_DTYPE][row["workload"]], row
    else:
        assert isinstance(row["reason"], str) and row["reason"], row
        assert row["median_ms"] is None and row["tasks_per_s"] is None, row


def test_quick_suite_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "bench"
    proc = _run_script("-m", "mamlext", "bench", "--suite", "quick", "--device", "cpu", "--out", str(out),
                       "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ms (IQR)" in proc.stdout and "vs loop" in proc.stdout  # the table

    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == suite.SCHEMA_VERSION
    assert results["suite"] == "quick" and results["device"] == "cpu" and results["complete"] is True
    machine = results["machine"]
    for key, kind in (("cpu_model", str), ("torch_num_threads", int), ("torch_version", str),
                      ("mamlext_version", str), ("fused_backend", str), ("cpu_count", int)):
        assert isinstance(machine[key], kind), key
    assert results["memory_kind"] in MEMORY_KINDS and results["memory_kind_description"]
    assert isinstance(results["notes"], list) and isinstance(results["wall_s"], float)

    rows = results["rows"]
    assert {r["workload"] for r in rows} == set(suite.WORKLOADS)
    for row in rows:
        _check_row(row)
    assert len({(r["case"], r["impl"]) for r in rows}) == len(rows)
    for case in {r["case"] for r in rows}:  # every case has its reference row and a mamlext row; none failed
        impls = {r["impl"]: r for r in rows if r["case"] == case}
        engines = [impls[name]["status"] for name in MAMLEXT_IMPLS if name in impls]
        assert suite.REFERENCE in impls and engines and "failed" not in engines, case

    markdown = (out / "results.md").read_text()
    assert markdown.count("\n") == len(rows) + 2 and "| sine40-N1-SO-T5 | 5 | 1 | fused |" in markdown
    plot = out / "speedup.png"
    assert results["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tiny_case():
    return suite._mlp(8, 3, 1, False)


TINY = suite.SuiteSettings(repeats=1, min_run_time=0.01, loop_max_call_s=60.0)


def test_meta_gradient_mismatch_marks_the_row_failed(device):
    built = suite.build_case(_tiny_case(), torch.device(device), seed=0)

    def off_by_one_percent():
        run = built.builders["fused"]()
        return lambda: [g * 1.01 for g in run()]

    builders = {"loop": built.builders["loop"], "fused": built.builders["fused"], "wrong": off_by_one_percent}
    rows = {r["impl"]: r for r in suite.run_case(_tiny_case(), torch.device(device), TINY, builders=builders)}
    for row in rows.values():
        _check_row(row)
    assert rows["wrong"]["status"] == "failed" and "disagrees with the plain loop" in rows["wrong"]["reason"]
    assert rows["wrong"]["rel_error"] == pytest.approx(0.01, rel=1e-3)
    assert rows["fused"]["status"] == "ok" and rows["fused"]["speedup_vs_loop"] > 0
    assert rows["loop"]["status"] == "ok" and rows["loop"]["speedup_vs_loop"] is None


def test_broken_skipped_and_capped_implementations():
    cpu = torch.device("cpu")
    built = suite.build_case(_tiny_case(), cpu, seed=0)

    def raises_when_run():
        def run():
            raise RuntimeError("boom")
        return run

    def not_here():
        raise Skip("not installed here")

    def wrong_shapes():
        return lambda: [torch.zeros(2)]

    builders = {"loop": built.builders["loop"], "broken": raises_when_run, "absent": not_here,
                "shapes": wrong_shapes}
    capped = TINY._replace(loop_max_call_s=0.0)  # every loop call is "too slow": not timed, still the reference
    rows = {r["impl"]: r for r in suite.run_case(_tiny_case(), cpu, capped, builders=builders)}
    for row in rows.values():
        _check_row(row)
    assert rows["broken"]["status"] == "failed" and "RuntimeError: boom" in rows["broken"]["reason"]
    assert rows["absent"] == {**rows["absent"], "status": "skipped", "reason": "not installed here"}
    assert rows["shapes"]["status"] == "failed" and "instead of" in rows["shapes"]["reason"]
    assert rows["loop"]["status"] == "skipped" and "reference" in rows["loop"]["reason"]


def test_loop_failure_fails_every_other_row():
    cpu = torch.device("cpu")
    built = suite.build_case(_tiny_case(), cpu, seed=0)

    def broken_loop():
        def run():
            raise RuntimeError("no reference")
        return run

    rows = suite.run_case(_tiny_case(), cpu, TINY, builders={"loop": broken_loop, "fused": built.builders["fused"]})
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "the plain loop did not run" in rows[1]["reason"]


def test_mismatch():
    a = [torch.ones(3), torch.full((2, 2), 2.0)]
    assert mismatch(a, [t.clone() for t in a], 1e-6) is None
    assert "rel. error" in mismatch([a[0], a[1] * 1.1], a, 1e-3)
    assert "nan" in mismatch([a[0], a[1] * float("nan")], a, 1e-3)
    assert "instead of" in mismatch([a[0]], a, 1e-3)
    assert "instead of" in mismatch([a[0], torch.ones(4)], a, 1e-3)


def test_peak_memory_counts_a_large_allocation(device):
    dev = torch.device(device)
    held = []
    size, kind = peak_memory(lambda: held.append(torch.ones(2**24, device=dev)), dev)  # 64 MiB, touched
    assert kind in MEMORY_KINDS
    assert size >= 0.9 * 2**26


def test_bad_arguments_are_named():
    from mamlext.__main__ import main

    with pytest.raises(SystemExit) as error:
        main(["bench", "--workloads", "mlp,nope"])
    assert error.value.code == 2


def test_time_budget_skips_the_cases_not_started(tmp_path, capsys):
    from mamlext.__main__ import main

    assert main(["bench", "--suite", "quick", "--device", "cpu", "--workloads", "mlp,task_sgd", "--time-budget",
                 "1e-9", "--out", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len({r["case"] for r in results["rows"]}) == 4 and results["complete"] is True
    for row in results["rows"]:
        _check_row(row)
        assert row["status"] == "skipped" and "time budget" in row["reason"]
    assert (tmp_path / "speedup.png").exists() and "time budget" in capsys.readouterr().out


DISTRIBUTED_ROW_KEYS = {"world_size": int, "threads_per_process": int, "tasks_per_process_max": int,
                        "tasks_per_s": float, "median_ms": float, "iqr_ms": float, "q1_ms": float, "q3_ms": float,
                        "samples": int, "noisy": bool, "scaling": float}


def _check_distributed(result, world_sizes, tasks):
    assert result["workload"]["tasks"] == tasks and result["workload"]["device"] == "cpu"
    rows = result["rows"]
    assert [row["world_size"] for row in rows] == list(world_sizes)
    for row in rows:
        for key, kind in DISTRIBUTED_ROW_KEYS.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["median_ms"] > 0 and row["tasks_per_s"] == pytest.approx(tasks / (row["median_ms"] / 1e3))
        assert row["foreign_load_cpus"] is None or row["foreign_load_cpus"] >= 0
        assert row["tasks_per_process_max"] == -(-tasks // row["world_size"])  # each rank's share, rounded up
    assert rows[0]["scaling"] == 1.0
    ratio = rows[1]["tasks_per_s"] / rows[0]["tasks_per_s"]
    assert rows[1]["scaling"] == pytest.approx(ratio)
    assert result["scaling"] == {f"{world_sizes[1]}_vs_{world_sizes[0]}": pytest.approx(ratio)}


@pytest.mark.slow  # spawns a 2-process gloo group (about 10 s on 2 busy cores)
def test_suite_distributed_section(tmp_path, capsys, monkeypatch):
    """--distributed 2 through the suite into mamlext.bench.distributed.run: 1 and 2 processes on 7 tasks (an
    uneven split), a few iterations each."""
    from mamlext.__main__ import main

    monkeypatch.setattr(suite, "DISTRIBUTED_TASKS", 7)  # tiny: this checks the plumbing, not the speed
    monkeypatch.setitem(suite.DISTRIBUTED_TIMING, "quick", dict(warmup=1, blocks=2, iters_per_block=1,
                                                                  quiet_wait_s=0.0))
    assert main(["bench", "--suite", "quick", "--device", "cpu", "--workloads", "distributed", "--distributed", "2",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rows"] == [] and results["plot"] is None and results["complete"] is True
    section = results["distributed"]
    assert section["status"] == "ok" and section["reason"] is None
    _check_distributed(section, (1, 2), 7)
    out = capsys.readouterr().out
    assert "distributed: sinusoid MLP" in out and "scaling" in out
    assert "| 2 | 1 |" in (tmp_path / "results.md").read_text()  # the row of 2 processes, 1 thread each


@pytest.mark.parametrize("argv, message", [
    (["--distributed", "1"], "argument --distributed: expected a number of processes P from 2"),
    (["--distributed", "two"], "argument --distributed: expected a number of processes P from 2"),
    (["--device", "cpu", "--workloads", "distributed"], "--workloads distributed needs --distributed P"),
    (["--device", "cpu", "--workloads", "mlp,distributed", "--distributed", "2"], "or distributed alone"),
])
def test_bad_distributed_arguments_are_named(argv, message, capsys):
    from mamlext.__main__ import main

    with pytest.raises(SystemExit) as error:
        main(["bench"] + argv)
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_distributed_refuses_cuda(capsys, monkeypatch):
    from mamlext.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a visible GPU, so --device cuda gets this far
    with pytest.raises(SystemExit) as error:
        main(["bench", "--device", "cuda", "--distributed", "2"])
    assert error.value.code == 2 and "--distributed measures CPU processes (gloo) only" in capsys.readouterr().err


CONV4_FLOOR = os.path.join(ROOT, "benchmarks", "conv4_floor.py")



def test_conv4_floor_prints_times_and_memory_as_json():
    proc = _run_script(CONV4_FLOOR, "--tasks", "2", "--hidden", "4", "--min-run-time", "0.05", timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert (out["tasks"], out["steps"], out["hidden"]) == (2, 1, 4)
    assert set(out["ms"]) == {"loop", "query_only", "query_batched"} and all(v > 0 for v in out["ms"].values())
    assert set(out["peak_rss_mib"]) == {"loop", "query_only", "generic_low_chunk1"}
    assert out["query_only_vs_loop"] == pytest.approx(out["ms"]["query_only"] / out["ms"]["loop"])


@pytest.mark.parametrize("bad", [["--tasks", "0"], ["--steps", "0"], ["--hidden", "-1"], ["--min-run-time", "0"]])
def test_conv4_floor_rejects_bad_arguments(bad):
    proc = _run_script(CONV4_FLOOR, *bad, timeout=120)
    assert proc.returncode == 2
    assert bad[0] in proc.stderr


def test_learner_loop_rows(device):
    """The learn2learn-style loops: the written-out algorithm and the one-import swap pass the meta-gradient check
    and carry their speed-ups against it; learn2learn itself runs when installed and is skipped with a reason
    otherwise."""
    case = suite._mlp(8, 3, 1, False, learner_loops=True)
    rows = {r["impl"]: r for r in suite.run_case(case, torch.device(device), TINY)}
    for name in ("l2l-style", "mamlext.MAML"):
        assert rows[name]["status"] == "ok", rows[name]
    assert rows["mamlext.MAML"]["speedup_vs_l2l-style"] > 0 and rows["l2l-style"]["speedup_vs_l2l-style"] is None
    if importlib.util.find_spec("learn2learn") is None:
        assert rows["learn2learn"]["status"] == "skipped" and "not installed" in rows["learn2learn"]["reason"]
    else:
        assert rows["learn2learn"]["status"] == "ok", rows["learn2learn"]


def test_dropin_suite_cases():
    cases = [(c.workload, c.tasks, c.steps) for c in suite.cases("dropin", torch.device("cpu"))]
    assert cases == [("mlp", 25, 1), ("mlp", 25, 5), ("mlp", 250, 1), ("conv4", 8, 1)]
