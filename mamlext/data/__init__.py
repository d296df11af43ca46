"""Task distributions for meta-learning."""
from mamlext.data.omniglot import FewShotBatch, Omniglot, TaskSampler
from mamlext.data.sinusoid import SinusoidTasks

__all__ = ["FewShotBatch", "Omniglot", "SinusoidTasks", "TaskSampler"]
