"""Builds mamlext._C: CPU kernels always, CUDA kernels when enabled.

Environment:
  USE_CUDA=0              CPU-only build, even with a toolkit and a GPU.
  FORCE_CUDA=1            build the CUDA kernels without a visible GPU (CI does, so CUDA code always compiles).
  TORCH_CUDA_ARCH_LIST    archs to compile for; default: the visible GPUs', or "8.0;9.0" without one.
  CUDA_HOME               toolkit root; found from nvcc or /usr/local/cuda when unset.
  DEBUG=1                 -O0 -g.
  MAMLEXT_STRICT_PTXAS=1  fail the build when a CUDA kernel spills registers or uses local memory (a stack frame,
                          which the driver reserves for every resident thread of the GPU); CI sets it.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def _find_cuda_home():
    """The real toolkit root. `nvcc` on PATH may be a wrapper script, from which torch guesses the root
    wrongly (its parent's parent), so candidates are checked for a toolkit's layout."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if _is_toolkit_root(c)), None)


# torch.utils.cpp_extension reads CUDA_HOME when imported, so it must be set first.
CUDA_HOME = _find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _resolve_config():
    gpu_visible = torch.cuda.is_available()
    if os.environ.get("USE_CUDA", "").strip() == "0":
        with_cuda, reason = False, "USE_CUDA=0"
    elif _env_flag("FORCE_CUDA"):
        if not CUDA_HOME:
            raise SystemExit("setup.py: FORCE_CUDA=1 but no CUDA toolkit found (set CUDA_HOME to its root)")
        if torch.version.cuda is None:
            raise SystemExit("setup.py: FORCE_CUDA=1 but the installed torch is a CPU-only build")
        with_cuda, reason = True, "FORCE_CUDA=1"
    elif CUDA_HOME and gpu_visible and torch.version.cuda is not None:
        with_cuda, reason = True, "toolkit found and a GPU is visible"
    else:
        missing = [what for what, ok in (("toolkit", CUDA_HOME), ("visible GPU", gpu_visible),
                                         ("CUDA build of torch", torch.version.cuda)) if not ok]
        with_cuda, reason = False, "no " + ", no ".join(missing)

    archs = ""
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        if not archs:
            if gpu_visible:
                caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
                archs = ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
            else:
                archs = DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # what torch compiles for is what we report
    return with_cuda, reason, archs, _env_flag("DEBUG")


def _extension():
    with_cuda, reason, archs, debug = _resolve_config()
    print("mamlext build configuration:")
    print(f"  torch          {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  CUDA kernels   {'yes' if with_cuda else 'no'} ({reason})")
    print(f"  CUDA_HOME      {CUDA_HOME}")
    print(f"  CUDA archs     {archs or '-'}")
    print(f"  debug          {'yes (-O0 -g)' if debug else 'no (-O3)'}")
    print(f"  strict ptxas   {'yes' if with_cuda and _env_flag('MAMLEXT_STRICT_PTXAS') else 'no'}")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "autograd", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "layerwise", "*.cpp")))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    defines = [f'-DMAMLEXT_CUDA_ARCHS="{archs}"', f"-DMAMLEXT_DEBUG={int(debug)}",
               f'-DMAMLEXT_TORCH_VERSION="{torch.__version__}"']
    # -fopenmp: at::parallel_for is inlined into our kernels and runs them serially unless they are built with the
    # OpenMP backend ATen itself uses.
    cxx = opt + defines + ["-fopenmp"]
    link = ["-fopenmp"]
    if not with_cuda:
        return CppExtension("mamlext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
                            include_dirs=[os.path.join(ROOT, "csrc")])
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc = opt + (["-G"] if debug else []) + defines + ["-DMAMLEXT_WITH_CUDA", "--expt-relaxed-constexpr"]
    if _env_flag("MAMLEXT_STRICT_PTXAS"):
        nvcc.append("-Xptxas=--warn-on-spills,--warn-on-local-memory-usage,--warning-as-error")
    return CUDAExtension("mamlext._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=link,
                         extra_compile_args={"cxx": cxx + ["-DMAMLEXT_WITH_CUDA"], "nvcc": nvcc})


setup(
    name="mamlext",
    version="0.1.0",
    description="Fused C++/CUDA kernels for task-batched MAML in PyTorch",
    packages=find_packages(include=["mamlext", "mamlext.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    # gymnasium environments for meta-RL (mamlext.rl.gym: any gymnasium env, the MuJoCo HalfCheetah tasks)
    extras_require={"rl": ["gymnasium[mujoco]>=1.1"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
