"""benchmarks/gpu_summary.py, the one summary of the GPU check script, on what the script's stages leave in OUT
(runs without a GPU: the stages' files are written here as the script writes them)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_summary.py"

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="3"><testcase classname="tests.test_ops_mlp_team" name="test_block[cuda]" time="0.1"/>
<testcase classname="tests.test_ops_mlp_team" name="test_global[cuda]" time="0.1"><failure message="bad">x</failure>
</testcase><testcase classname="tests.test_ops_task_sgd" name="test_launch[cuda]" time="0.0"><skipped message="s"/>
</testcase></testsuite></testsuites>"""


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_summary_holds_every_stage_its_tests_the_bandwidth_and_the_benchmarks(tmp_path):
    (tmp_path / "stages.tsv").write_text("build\tpassed\t150\t0\ntests-kernels\tfailed\t42\t1\n"
                                         "tests-rest\ttimed out\t60\t124\nbench-suite\tskipped\t0\t-1\n")
    (tmp_path / "junit_tests-kernels.xml").write_text(JUNIT)
    (tmp_path / "junit_tests-rest.xml").write_text("<testsuites><testsuite")  # killed while pytest wrote it
    (tmp_path / "bandwidth.json").write_text(json.dumps({"copy_GBps": 3000.0}))
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.json").write_text(json.dumps({"rows": [{"case": "sine", "median_ms": 0.1}]}))
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["stages", "bandwidth", "benchmarks"]
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s["name"] for s in summary["stages"]] == ["build", "tests-kernels", "tests-rest", "bench-suite"]
    assert stages["build"]["verdict"] == "passed" and stages["build"]["seconds"] == 150
    assert stages["tests-kernels"]["tests"] == {
        "passed": 1, "failed": 1, "skipped": 1, "failing": ["tests.test_ops_mlp_team::test_global[cuda]"]}
    assert stages["tests-rest"]["verdict"] == "timed out" and "unreadable" in stages["tests-rest"]["tests"]["error"]
    assert stages["bench-suite"]["verdict"] == "skipped"
    assert summary["bandwidth"] == {"copy_GBps": 3000.0}
    assert summary["benchmarks"] == {"bench/results.json": {"rows": [{"case": "sine", "median_ms": 0.1}]}}
    assert "test_global[cuda]" in result.stdout


def test_bandwidth_without_a_gpu_says_so(tmp_path):
    result = run("--bandwidth", tmp_path)
    assert result.returncode == 0, result.stderr
    measured = json.loads((tmp_path / "bandwidth.json").read_text())
    import torch
    if torch.cuda.is_available():
        assert measured["copy_GBps"] > 0
    else:
        assert measured == {"error": "no CUDA device visible"}


def test_the_check_script_parses_and_runs_the_kernel_tests_first():
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
    order = [script.index(f"cuda_tests {name} ") for name in ("tests-kernels", "tests-ops", "tests-rest")]
    assert order == sorted(order)
    assert " -x" not in script.split("cuda_tests()")[1].split("}")[0]  # no stop at the first failure
