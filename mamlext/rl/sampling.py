"""Sampling episodes of T tasks x B episodes at once: one batched forward of the T (adapted) policies per time step.

An ``Episodes`` holds [T, B, H, ...] tensors, H the horizon; ``mask`` is 1 on the steps an episode took and 0 after
it ended, so that every later computation (returns, baselines, losses) treats the padding as absent.
"""
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from mamlext.rl.envs import TaskEnv
from mamlext.rl.passes import policy_outputs
from mamlext.rl.policy import PolicySpec


class Episodes(NamedTuple):
    observations: Tensor  # [T, B, H, D]
    actions: Tensor       # [T, B, H, A] (Gaussian) or [T, B, H] int64 (categorical)
    rewards: Tensor       # [T, B, H], 0 after an episode ended
    mask: Tensor          # [T, B, H], 1 on the steps taken

    @property
    def tasks(self) -> int:
        return self.observations.shape[0]

    def flat(self):
        """(observations [T, B * H, D], actions [T, B * H, ...], mask [T, B * H]) for the policy's passes."""
        T = self.tasks
        obs = self.observations.reshape(T, -1, self.observations.shape[-1])
        actions = self.actions.reshape(T, -1, *self.actions.shape[3:])
        return obs, actions, self.mask.reshape(T, -1)

    def returns(self) -> Tensor:
        """Each episode's undiscounted return [T, B] (what the paper reports)."""
        return self.rewards.sum(-1)


def check_policy_fits(spec: PolicySpec, env: TaskEnv) -> None:
    """ValueError unless the policy's input and output match the environment's spaces."""
    if spec.widths[0] != env.observation_dim:
        raise ValueError(f"the policy takes observations of width {spec.widths[0]}, but the environment's are "
                         f"{env.observation_dim} wide")
    want = "categorical" if env.discrete else "gaussian"
    if spec.distribution != want:
        raise ValueError(f"the environment has {'discrete' if env.discrete else 'continuous'} actions: it needs a "
                         f"{want} policy, got a {spec.distribution} one")
    if spec.action_dim != env.action_dim:
        raise ValueError(f"the policy's actions are {spec.action_dim} wide ({spec.distribution}), but the environment "
                         f"takes {env.action_dim}")


@torch.no_grad()
def sample_episodes(env: TaskEnv, tasks: Tensor, spec: PolicySpec, params: Sequence[Tensor], episodes: int,
                    generator: torch.Generator, deterministic: bool = False,
                    task_slice: slice = slice(None)) -> Episodes:
    """``episodes`` episodes of the tasks ``tasks[task_slice]`` with the policy at ``params`` (shared, or per task
    [T, *shape] each: those tasks' adapted policies). ``deterministic``: the mean action / the most likely one.

    The action noise of every task of ``tasks`` (all of a meta-batch) is drawn from ``generator`` up front, and the
    slice's used: a process that samples a share of the tasks (under torchrun) then draws the same noise for them as
    one process sampling all, and leaves the generator in the same state. (An environment's own randomness at reset,
    e.g. a gymnasium environment's seeds, is drawn for the slice's tasks only.)"""
    check_policy_fits(spec, env)
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"sample_episodes: episodes must be an integer >= 1 (per task), got {episodes!r}")
    if not isinstance(tasks, Tensor) or tasks.dim() < 1 or tasks.shape[0] < 1:
        raise ValueError(f"sample_episodes: tasks must be a tensor with one row per task (env.sample_tasks), got "
                         f"{tasks.shape if isinstance(tasks, Tensor) else type(tasks).__name__}")
    H = env.horizon
    if spec.distribution == "gaussian":
        noise = torch.randn(tasks.shape[0], episodes, H, spec.action_dim, generator=generator,
                            dtype=torch.float64, device=generator.device)
    else:  # uniforms, turned into actions by the inverse of each step's cumulative distribution
        noise = torch.rand(tasks.shape[0], episodes, H, generator=generator, dtype=torch.float64,
                           device=generator.device)
    obs = env.reset(tasks[task_slice], episodes, generator)
    noise = noise[task_slice].to(device=obs.device, dtype=obs.dtype)
    T, B = obs.shape[:2]
    dtype, device = obs.dtype, obs.device
    observations = obs.new_zeros(T, B, H, obs.shape[-1])
    actions = (torch.zeros(T, B, H, dtype=torch.int64, device=device) if spec.distribution == "categorical"
               else obs.new_zeros(T, B, H, spec.action_dim))
    rewards = obs.new_zeros(T, B, H)
    mask = obs.new_zeros(T, B, H)
    alive = torch.ones(T, B, dtype=torch.bool, device=device)
    for t in range(H):
        policy = policy_outputs(spec, params, obs)
        if spec.distribution == "gaussian":
            action = policy.out
            if not deterministic:
                action = action + policy.log_std.exp() * noise[:, :, t]
        elif deterministic:
            action = policy.out.argmax(-1)
        else:
            cumulative = policy.probs.cumsum(-1)
            action = torch.searchsorted(cumulative, noise[:, :, t].unsqueeze(-1).contiguous()).squeeze(-1)
            action = action.clamp_max(spec.action_dim - 1)  # a uniform above the rounded total
        observations[:, :, t] = obs
        actions[:, :, t] = action
        mask[:, :, t] = alive.to(dtype)
        obs, reward, done = env.step(action)
        rewards[:, :, t] = torch.where(alive, reward.to(dtype), torch.zeros((), dtype=dtype, device=device))
        alive = alive & ~done
        if not bool(alive.any()):
            break
    return Episodes(observations, actions, rewards, mask)
