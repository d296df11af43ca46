"""Loading of the compiled extension (fallback and MAMLEXT_REQUIRE_EXT), backend_info, and the CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

import mamlext
from mamlext import _ext
from mamlext.data import SinusoidTasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes `from mamlext import _C` fail as a broken build would, then exercises the fallback.
BROKEN_EXT = """
import sys, warnings
sys.modules["mamlext._C"] = None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, mamlext
print([str(w.message) for w in caught if "mamlext" in str(w.message)])
out = mamlext.ops.task_sgd([torch.ones(2)], [torch.ones(3, 2)], 0.5)
print(out[0].tolist(), mamlext.backend_info()["backend"]["cpu"])
"""


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_fallback_warns_with_the_real_error_and_uses_reference():
    result = run_python(BROKEN_EXT, MAMLEXT_REQUIRE_EXT="0")
    assert result.returncode == 0, result.stderr
    warning_line, output_line = result.stdout.strip().splitlines()[-2:]
    assert "failed to import (ModuleNotFoundError: import of mamlext._C halted" in warning_line
    assert "mamlext.reference" in warning_line
    assert output_line == "[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]] reference"


def test_require_ext_turns_fallback_into_import_error():
    result = run_python(BROKEN_EXT, MAMLEXT_REQUIRE_EXT="1")
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "MAMLEXT_REQUIRE_EXT=1" in result.stderr


def test_backend_info_describes_this_install():
    info = mamlext.backend_info()
    assert info["mamlext_version"] == mamlext.__version__
    assert info["torch_version"] == torch.__version__
    assert info["gpu_visible"] == torch.cuda.is_available()
    if info["extension_loaded"]:
        assert info["cpu_kernels"] and info["backend"]["cpu"] == "compiled"
        # the extension states each op's kernels: every schema it defines has a CPU kernel
        kernels = _ext.BUILD_INFO["kernels"]
        assert {"task_sgd", "mlp_maml", "maml_reverse_step", "mlp_forward", "sgd_update"} <= set(kernels)
        assert all("cpu" in devices for devices in kernels.values())
        assert ("cuda" in kernels["mlp_maml"]) == info["cuda_kernels"] and "cuda" not in kernels["mlp_forward"]
        assert info["cuda_archs"] if info["cuda_kernels"] else not info["cuda_archs"]
    else:
        assert info["backend"]["cpu"] == "reference" and info["extension_error"]


def test_cli_info_json_matches_backend_info():
    result = subprocess.run([sys.executable, "-m", "mamlext", "info", "--json"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == mamlext.backend_info()


def test_cli_info_text():
    result = subprocess.run([sys.executable, "-m", "mamlext", "info"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "CPU kernels" in result.stdout and "ops on cpu" in result.stdout
    # a CUDA build names the ops that run as plain PyTorch on CUDA (the fused layers have CPU kernels only)
    cpu_only_line = next((line for line in result.stdout.splitlines() if line.startswith("CPU kernels only")), None)
    if mamlext.backend_info()["cuda_kernels"]:
        assert cpu_only_line is not None and "mlp_forward" in cpu_only_line and "mlp_maml" not in cpu_only_line
    else:
        assert cpu_only_line is None


def test_cli_demo_is_info_then_train_sine(capsys, tmp_path):
    """`python -m mamlext demo` is what `make demo` runs after the build: info, then the main job."""
    from mamlext.__main__ import main

    assert main(["demo", "--iterations", "2", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.index("CPU kernels") < out.index("trained 2 iterations") < out.index("Sinusoid regression")
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_cli_demo_rejects_bad_arguments(capsys):
    from mamlext.__main__ import main

    assert main(["demo", "--iterations", "0"]) == 2
    assert "--iterations must be an integer >= 1" in capsys.readouterr().err


def test_sinusoid_tasks_are_seeded_and_follow_the_distribution():
    a = SinusoidTasks(seed=3).sample(50, 10, 7)
    b = SinusoidTasks(seed=3).sample(50, 10, 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a.x_support.shape == (50, 10, 1) and a.x_query.shape == (50, 7, 1)
    assert 0.1 <= a.amplitude.min() and a.amplitude.max() <= 5.0
    assert 0.0 <= a.phase.min() and a.phase.max() <= torch.pi
    assert a.x_support.abs().max() <= 5.0
    expected = a.amplitude[:, None, None] * torch.sin(a.x_query - a.phase[:, None, None])
    torch.testing.assert_close(a.y_query, expected)
    assert not torch.equal(SinusoidTasks(seed=4).sample(50, 10).amplitude, a.amplitude)


@pytest.mark.parametrize("kwargs", [dict(tasks=0, support=5), dict(tasks=2, support=0), dict(tasks=2, support=3,
                                                                                              query=-1)])
def test_sinusoid_tasks_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="SinusoidTasks.sample"):
        SinusoidTasks().sample(**kwargs)
