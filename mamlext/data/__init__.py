"""Task distributions for meta-learning."""
from mamlext.data.sinusoid import SinusoidTasks

__all__ = ["SinusoidTasks"]
