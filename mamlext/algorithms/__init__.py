"""Meta-learning algorithms built on the task-batched engines (besides mamlext.BatchedMAML)."""
from mamlext.algorithms.anil import ANIL
from mamlext.algorithms.imaml import iMAML
from mamlext.algorithms.reptile import Reptile

__all__ = ["ANIL", "Reptile", "iMAML"]
