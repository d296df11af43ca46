"""Task environments for meta-reinforcement learning, stepped as tensors for all tasks and episodes at once.

The protocol (``TaskEnv``) is what the sampler (mamlext.rl.sampling) drives: T tasks x B episodes per task run in
lock-step, observations [T, B, obs_dim], actions [T, B, action_dim] (a Gaussian policy's, in [-1, 1] after the
environment's own clipping) or [T, B] class indices (a categorical policy's), rewards and done flags [T, B].
An episode that is done stays done: the sampler masks its later steps out.

``Navigation2D`` is the paper's point robot (Finn, Abbeel & Levine 2017, section 5.3) written in tensors;
mamlext.rl.gym runs gymnasium environments (HalfCheetah-Vel / -Dir) through the same protocol.
"""
import math
from typing import Optional, Protocol, Tuple

import torch
from torch import Tensor


class TaskEnv(Protocol):
    """T tasks x B episodes of one task family, stepped together (see the module's docstring)."""

    observation_dim: int
    action_dim: int            # a Gaussian policy's action width, or a categorical policy's number of actions
    discrete: bool             # True: actions are class indices [T, B] in [0, action_dim)
    horizon: int               # the most steps of an episode

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        """``num_tasks`` tasks drawn with ``generator``, one row each (e.g. goals [T, 2])."""

    def reset(self, tasks: Tensor, episodes: int, generator: torch.Generator) -> Tensor:
        """Starts ``episodes`` episodes of each task; returns the first observations [T, B, obs_dim]."""

    def step(self, actions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Applies actions; returns (observations [T, B, obs_dim], rewards [T, B], done [T, B] bool)."""


class Navigation2D:
    """The point robot of MAML's 2D navigation experiment (the paper's code: cbfinn/maml_rl, point_env_randgoal with
    rllab's ``normalize`` wrapper): the robot starts at the origin, a task is a goal drawn uniformly from
    [-0.5, 0.5]^2, the observation is the robot's position, the reward the negative distance to the goal after the
    move, and an episode ends after ``horizon`` (100) steps or on reaching the goal (within 0.01 on both axes). The
    policy acts in [-1, 1]^2 (clipped there) and the robot moves by 0.1 times the action, as rllab's ``normalize``
    maps the point environment's action box [-0.1, 0.1]^2."""

    observation_dim = 2
    action_dim = 2
    discrete = False

    def __init__(self, horizon: int = 100, goal_low: float = -0.5, goal_high: float = 0.5, dtype=torch.float32,
                 device=None):
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"Navigation2D: horizon must be an integer >= 1, got {horizon!r}")
        if not (math.isfinite(goal_low) and math.isfinite(goal_high) and goal_low < goal_high):
            raise ValueError(f"Navigation2D: need finite goal_low < goal_high, got {goal_low!r}, {goal_high!r}")
        self.horizon, self.goal_low, self.goal_high = horizon, goal_low, goal_high
        self.dtype, self.device = dtype, torch.device("cpu") if device is None else torch.device(device)
        self._goals: Optional[Tensor] = None
        self._position: Optional[Tensor] = None
        self._done: Optional[Tensor] = None

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(num_tasks, 2, generator=generator, dtype=torch.float64, device=generator.device)
        goals = self.goal_low + (self.goal_high - self.goal_low) * u
        return goals.to(dtype=self.dtype, device=self.device)

    def reset(self, tasks: Tensor, episodes: int, generator: Optional[torch.Generator] = None) -> Tensor:
        if tasks.dim() != 2 or tasks.shape[1] != 2:
            raise ValueError(f"Navigation2D.reset: tasks must be goals of shape [T, 2], got {tuple(tasks.shape)}")
        self._goals = tasks.to(dtype=self.dtype, device=self.device).unsqueeze(1)  # [T, 1, 2]
        self._position = torch.zeros(tasks.shape[0], episodes, 2, dtype=self.dtype, device=self.device)
        self._done = torch.zeros(tasks.shape[0], episodes, dtype=torch.bool, device=self.device)
        return self._position.clone()

    def step(self, actions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if self._position is None:
            raise RuntimeError("Navigation2D.step: call reset first")
        if actions.shape != self._position.shape:
            raise ValueError(f"Navigation2D.step: actions must have shape {tuple(self._position.shape)} "
                             f"([tasks, episodes, 2]), got {tuple(actions.shape)}")
        move = 0.1 * actions.to(self.dtype).clamp(-1.0, 1.0)
        self._position = torch.where(self._done.unsqueeze(-1), self._position, self._position + move)
        offset = self._position - self._goals
        reward = -offset.norm(dim=-1)
        self._done = self._done | (offset.abs() < 0.01).all(dim=-1)
        return self._position.clone(), reward, self._done.clone()
