"""python -m mamlext bench --suite rl (mamlext.bench.rl) at tiny sizes: the results.json structure, the float64 check
(passing for the three implementations, failing for a perturbed one), the analytic FVP FLOP count against
torch.utils.flop_counter, and the routing of the suite's command line."""
import json

import pytest
import torch

from mamlext.__main__ import main
from mamlext.bench import rl
from mamlext.bench import suite

TINY = rl.RLSetting(tasks=2, episodes=2, horizon=10, hidden=(8, 8))
TINY_TIMING = rl.Timing(repeats=1, fvp_min_run_time=0.01, update_min_run_time=0.01, sampling_min_run_time=0.01,
                        gemm_min_run_time=0.01, gemm_size=64)
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(impls=None, setting=TINY):
    """The float64 check's rows for ``impls`` (default rl.IMPLS)."""
    impls = rl.IMPLS if impls is None else impls
    rows = {name: rl._row(name) for name in impls}
    rl.check(impls, rows, setting, CPU, seed=0)
    return rows


def test_runner_writes_results_json_and_table(tmp_path, capsys):
    results = rl.run(CPU, str(tmp_path), TINY, TINY_TIMING, seed=0, progress=False, command="test")
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").exists()
    assert on_disk["schema_version"] == rl.SCHEMA_VERSION and on_disk["suite"] == "rl" and on_disk["complete"]
    assert on_disk["device"] == "cpu" and on_disk["command"] == "test"
    for key in ("machine", "settings", "check", "rows", "sampling", "gemm", "flops", "speedups", "notes", "wall_s"):
        assert key in on_disk, key
    s = on_disk["settings"]
    assert (s["tasks"], s["samples_per_task"], s["widths"], s["inner_lr"], s["max_kl"]) == (2, 20, [2, 8, 8, 2],
                                                                                             0.5, 0.01)
    assert on_disk["check"]["dtype"] == "torch.float64" and on_disk["check"]["rtol"] == rl.RTOL
    rows = {r["impl"]: r for r in on_disk["rows"]}
    assert list(rows) == ["l2l-style", "bmm", "fused"]
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["grad_rel_error"] <= rl.RTOL and row["fvp_rel_error"] <= rl.RTOL, row
        for what in ("fvp", "meta_update"):
            assert row[what]["median_ms"] > 0 and row[what]["samples"] >= 1, (name, what)
        assert row["step_fraction"] is not None and row["fvp_gflops"] > 0
    for name in rl.PLAIN:
        assert rows[name]["fvp_speedup_of_fused"] == pytest.approx(
            rows[name]["fvp"]["median_ms"] / rows["fused"]["fvp"]["median_ms"])
        assert on_disk["speedups"]["meta_update"][f"fused vs {name}"] == rows[name]["meta_update_speedup_of_fused"]
    flops = on_disk["flops"]
    assert flops["fvp_gemm_flops"] == rl.fvp_gemm_flops((2, 8, 8, 2), 2, 20)
    assert flops["counted_by_torch_flop_counter"] == flops["fvp_gemm_flops"]
    assert on_disk["gemm"]["gflops"] > 0 and on_disk["sampling"]["median_ms"] > 0
    assert rows["fused"]["fvp_fraction_of_gemm"] == pytest.approx(rows["fused"]["fvp_gflops"]
                                                                  / on_disk["gemm"]["gflops"])
    out = capsys.readouterr().out
    assert "l2l-style" in out and "GEMM rate" in out and "fused FVP GEMM FLOPs" in out
    assert results["rows"][2]["impl"] == "fused"


class _WrongFisher(rl.Fused):
    """The fused products with the Fisher-vector product off by a relative 1e-6."""

    def products(self):
        gradient, fvp, before, old = super().products()
        return gradient, (lambda v: fvp(v) * (1 + 1e-6)), before, old


class _WrongGradient(rl.Batched):
    """The batched plain row with its inner step size off by a relative 1e-6 (the meta-gradient moves)."""

    def __init__(self, spec, theta, support, query, setting):
        super().__init__(spec, theta, support, query, setting._replace(inner_lr=setting.inner_lr * (1 + 1e-6)))


def test_float64_check_passes_for_all_three():
    rows = _rows()
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["grad_rel_error"] <= rl.RTOL and row["fvp_rel_error"] <= rl.RTOL
    assert rows["l2l-style"]["grad_rel_error"] == 0.0


def test_float64_check_fails_a_perturbed_implementation(monkeypatch):
    monkeypatch.setitem(rl.IMPLS, "fused", _WrongFisher)
    monkeypatch.setitem(rl.IMPLS, "bmm", _WrongGradient)
    rows = _rows()
    assert rows["l2l-style"]["status"] == "ok"
    assert rows["fused"]["status"] == "failed" and "Fisher-vector product" in rows["fused"]["reason"]
    assert rows["fused"]["grad_rel_error"] <= rl.RTOL < rows["fused"]["fvp_rel_error"]
    assert rows["bmm"]["status"] == "failed" and "meta-gradient" in rows["bmm"]["reason"]
    assert rows["bmm"]["grad_rel_error"] > rl.RTOL


def test_a_failed_row_is_not_timed():
    impls = {**rl.IMPLS, "fused": _WrongFisher}
    results = rl.run(CPU, None, TINY, TINY_TIMING, seed=0, progress=False, impls=impls)
    rows = {r["impl"]: r for r in results["rows"]}
    assert rows["fused"]["status"] == "failed" and rows["fused"]["fvp"] is None
    assert rows["fused"]["meta_update"] is None and rows["bmm"]["fvp_speedup_of_fused"] is None
    assert rows["bmm"]["status"] == "ok" and rows["bmm"]["meta_update"] is not None


def test_an_implementation_that_raises_is_a_failed_row():
    class Broken(rl.Batched):
        def products(self):
            raise RuntimeError("broken on purpose")

    rows = _rows({**rl.IMPLS, "bmm": Broken})
    assert rows["bmm"]["status"] == "failed" and "broken on purpose" in rows["bmm"]["reason"]
    assert rows["fused"]["status"] == "ok"


@pytest.mark.parametrize("widths,first_order", [((2, 8, 8, 2), False), ((2, 5, 7, 3, 2), False),
                                                ((2, 6, 2), True), ((2, 4, 6, 2), True)])
def test_fvp_flop_count_matches_the_flop_counter(widths, first_order):
    """The analytic count against a count of every matrix multiply MetaProducts.fisher_product performs on the
    batched GEMMs (products="bmm"; the fused kernels' products are invisible to the counter)."""
    tasks, episodes, horizon = 3, 2, 5
    setting = rl.RLSetting(tasks=tasks, episodes=episodes, horizon=horizon, hidden=widths[1:-1],
                           first_order=first_order)
    policy = rl.make_policy(setting, 0, torch.float64, CPU)
    algo = rl.make_algo(policy, setting, "bmm")
    generator = torch.Generator().manual_seed(1)
    env = rl.Navigation2D(horizon=horizon, dtype=torch.float64)
    support, query, _ = rl.sample_meta_batch(algo, env, tasks, episodes, generator)
    m = algo.products(support, query)
    v = torch.randn(m.gradient.numel(), generator=generator, dtype=torch.float64)
    counted = rl.counted_gemm_flops(lambda: m.fisher_product(v))
    assert counted == rl.fvp_gemm_flops(widths, tasks, episodes * horizon, first_order) > 0


def test_suite_routes_rl_to_its_runner(tmp_path, monkeypatch):
    calls = []

    def fake_run(device, out_dir, **kwargs):
        calls.append((device, out_dir, kwargs))
        return {"rows": [{"impl": "fused", "status": "ok"}]}

    monkeypatch.setattr(rl, "run", fake_run)
    assert "rl" in suite.SUITES
    assert main(["bench", "--suite", "rl", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]) == 0
    assert calls[0][0] == CPU and calls[0][1] == str(tmp_path) and calls[0][2]["progress"] is False
    suite.run_suite("rl", CPU, str(tmp_path), progress=False)
    assert len(calls) == 2


def test_rl_suite_refuses_other_suites_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--suite", "rl", "--device", "cpu", "--workloads", "mlp"])
    assert exit_info.value.code == 2
    assert "--suite rl takes no --workloads" in capsys.readouterr().err
