"""Task distributions for meta-learning."""
from mamlext.data.omniglot import FewShotBatch, Omniglot, TaskSampler
from mamlext.data.sinusoid import SinusoidTasks
from mamlext.data.tasks import stack_tasks

__all__ = ["FewShotBatch", "Omniglot", "SinusoidTasks", "TaskSampler", "stack_tasks"]
