"""Loads the compiled extension mamlext._C and says which backend serves each device.

When _C fails to import, a warning carries the real import error and the ops fall back to the pure-PyTorch
twins in mamlext.reference. MAMLEXT_REQUIRE_EXT=1 turns that into an ImportError (CI sets it).
"""
import os
import warnings

import torch

_C = None
IMPORT_ERROR = None
try:
    from mamlext import _C
except Exception as error:  # any failure to load (missing .so, ABI mismatch, missing symbol) means: no kernels
    IMPORT_ERROR = error
    if os.environ.get("MAMLEXT_REQUIRE_EXT", "").strip() == "1":
        raise ImportError(f"mamlext: the compiled extension mamlext._C failed to import and MAMLEXT_REQUIRE_EXT=1: "
                          f"{type(error).__name__}: {error}") from error
    warnings.warn(
        f"mamlext: the compiled extension mamlext._C failed to import ({type(error).__name__}: {error}); "
        "falling back to the pure-PyTorch implementations in mamlext.reference, which are much slower. "
        "Rebuild with `pip install --no-build-isolation -e .`, or set MAMLEXT_REQUIRE_EXT=1 to make this an error.",
        RuntimeWarning, stacklevel=2)

BUILD_INFO = dict(_C.build_info()) if _C is not None else {}


def has_kernels(device_type: str) -> bool:
    """Whether compiled kernels serve tensors on this device type ("cpu" or "cuda")."""
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    return device_type == "cuda" and bool(BUILD_INFO.get("cuda"))


def backend_for(device_type: str) -> str:
    return "compiled" if has_kernels(device_type) else "reference"


def backend_info() -> dict:
    """What this installation can do: versions, compiled kernels, CUDA archs, visible GPU, backend per device."""
    from mamlext import __version__

    gpu_visible = torch.cuda.is_available()
    info = {
        "mamlext_version": __version__,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": _C is not None,
        "extension_error": None if IMPORT_ERROR is None else f"{type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}",
        "extension_built_with_torch": BUILD_INFO.get("torch_version"),
        "cpu_kernels": has_kernels("cpu"),
        "cuda_kernels": bool(BUILD_INFO.get("cuda")),
        "cuda_archs": [a for a in BUILD_INFO.get("cuda_archs", "").split(";") if a],
        "debug_build": bool(BUILD_INFO.get("debug")),
        "gpu_visible": gpu_visible,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if gpu_visible else [],
        "backend": {"cpu": backend_for("cpu"), "cuda": backend_for("cuda") if gpu_visible else "no GPU visible"},
        "op_kernels": {op: list(devices) for op, devices in sorted(BUILD_INFO.get("kernels", {}).items())
                       if not op.startswith("_")},  # the private ops are for the tests
    }
    return info
