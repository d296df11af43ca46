"""mamlext: fused C++/CUDA kernels for task-batched MAML in PyTorch."""
__version__ = "0.1.0"

from mamlext._ext import backend_info  # noqa: E402  (loads the compiled extension first)
from mamlext import data, nn, ops, reference, utils  # noqa: E402
from mamlext.maml import MAML  # noqa: E402
from mamlext.metasgd import MetaSGD  # noqa: E402
from mamlext.higher import innerloop_ctx  # noqa: E402
from mamlext.batched import BatchedMAML  # noqa: E402
from mamlext.algorithms import ANIL, Reptile, iMAML  # noqa: E402

__all__ = ["ANIL", "BatchedMAML", "MAML", "MetaSGD", "Reptile", "backend_info", "data", "iMAML", "innerloop_ctx",
           "nn", "ops", "reference", "utils", "__version__"]
