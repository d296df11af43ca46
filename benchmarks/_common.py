"""The benchmark scripts' shared pieces live in the package (mamlext.bench.common), so that `python -m mamlext bench`
works from an installed package; this module keeps the scripts' `from _common import ...` working."""
from mamlext.bench.common import (  # noqa: F401
    FOREIGN_LOAD_WARN, MIN_SAMPLES_FOR_NOISE, ForeignLoad, cpu_model, machine_info, summary, sync, time_impls,
    wait_quiet)
