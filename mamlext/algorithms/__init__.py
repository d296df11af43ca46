"""Meta-learning algorithms built on the fused task-batched ops (besides mamlext.BatchedMAML)."""
from mamlext.algorithms.imaml import iMAML

__all__ = ["iMAML"]
