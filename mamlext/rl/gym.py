"""Gymnasium environments run through the ``TaskEnv`` protocol (mamlext.rl.envs), and MAML's HalfCheetah task families.

``GymTasks`` steps T tasks x B episodes of any gymnasium environment with a vector observation and a Box or
Discrete action space, as tensors, so the sampler drives it exactly like the pure-tensor ``Navigation2D``.
``half_cheetah_vel`` / ``half_cheetah_dir`` are the paper's locomotion tasks (Finn, Abbeel & Levine 2017, section
5.3) on gymnasium's MuJoCo HalfCheetah.

gymnasium (and MuJoCo for the cheetah) are optional: this module imports without them and says what to install when
something here is used.
"""
import importlib.util
import math
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

try:
    import gymnasium
    from gymnasium import spaces as _spaces
except ImportError:  # the module stays importable; GymTasks and the cheetah tasks raise the hint below
    gymnasium = None
    _spaces = None

_INSTALL_HINT = 'install it with  pip install "mamlext[rl]"  or  pip install "gymnasium[mujoco]"'

# The gymnasium registration the cheetah tasks run on: v5 is the newest HalfCheetah in gymnasium 1.x (v4 is kept for
# reproducing older results, v2/v3 need the retired mujoco-py); its step puts x_velocity in info.
HALF_CHEETAH_ID = "HalfCheetah-v5"
# The paper's control cost, 0.5 * 1e-1 * ||a||^2 in cbfinn/maml_rl's half_cheetah_env_rand(_direc).py and in
# tristandeleu/pytorch-maml-rl's HalfCheetahVel/DirEnv; gymnasium's own HalfCheetah uses 0.1.
CHEETAH_CTRL_COST = 0.05


def _require_gymnasium(what: str) -> None:
    if gymnasium is None:
        raise ImportError(f"{what} needs gymnasium, which is not installed; {_INSTALL_HINT}")
    if not hasattr(gymnasium.vector, "AutoresetMode"):  # older vector envs autoreset differently
        raise ImportError(f"{what} needs gymnasium >= 1.1 (vector autoreset modes), got {gymnasium.__version__}; "
                          f"{_INSTALL_HINT}")


def _require_mujoco(what: str) -> None:
    _require_gymnasium(what)
    if importlib.util.find_spec("mujoco") is None:
        raise ImportError(f"{what} needs MuJoCo (the mujoco Python package), which is not installed; {_INSTALL_HINT}")


def _task_value(row: Tensor) -> Any:
    """One row of the tasks tensor as make_env receives it: a Python number for tasks of shape [T] (a goal velocity,
    a direction), a numpy array for [T, ...] (a goal point), so factories need not know about torch."""
    row = row.detach().cpu()
    return row.item() if row.dim() == 0 else row.numpy().copy()


def _check_observation_space(space, who: str) -> int:
    if not (isinstance(space, _spaces.Box) and len(space.shape) == 1):
        raise ValueError(f"{who}: the observation space must be a Box of rank 1 (the vector a policy's MLP reads), "
                         f"got {space!r}")
    return int(space.shape[0])


def _check_action_space(space, who: str) -> Tuple[bool, int]:
    """(discrete, action_dim) for a space a policy can serve; a ValueError naming the space otherwise."""
    if isinstance(space, _spaces.Discrete):
        return True, int(space.n)
    if isinstance(space, _spaces.Box) and len(space.shape) == 1:
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise ValueError(f"{who}: the Box action space needs finite bounds (the Gaussian policy's [-1, 1] is "
                             f"mapped linearly onto [low, high]), got {space!r}")
        return False, int(space.shape[0])
    raise ValueError(f"{who}: the action space must be a Box of rank 1 (a Gaussian policy's actions in [-1, 1], "
                     f"scaled to the box) or a Discrete (a categorical policy's class indices), got {space!r}")


class GymTasks:
    """T tasks x B episodes of a gymnasium environment, stepped together through the ``TaskEnv`` protocol.

    ``make_env(task)`` builds the environment of one task (``task`` is one row of the tasks tensor: a Python number
    for tasks of shape [T], a numpy array otherwise); ``task_sampler(num_tasks, generator)`` draws tasks as a tensor.
    The constructor builds one environment (for a task drawn with a fixed seed) to read its spaces and default
    horizon, and closes it.

    All T * B environments live in one ``gymnasium.vector.SyncVectorEnv``: a sync vector env steps its copies one
    after the other anyway, so one per task would buy nothing and cost T step calls and T concatenations per step;
    one vector env hands back a single [T * B, ...] array that reshapes to [T, B, ...] at no cost.

    Observations must be a rank-1 Box. Actions: a rank-1 Box with finite bounds (``discrete`` False; the policy acts
    in [-1, 1], clipped there and mapped linearly onto [low, high] as rllab's ``normalize`` does for the paper's
    code) or a Discrete (``discrete`` True, ``action_dim`` its n; actions are class indices [T, B]).

    An episode that terminates, is truncated (the env's own TimeLimit) or reaches ``horizon`` steps stays done: the
    vector env resets it on the next step (gymnasium's next-step autoreset), but the adapter hands back the episode's
    last observation, reward 0 and done True from then on, so no observation of the new episode leaks out.
    """

    def __init__(self, make_env: Callable[[Any], Any], task_sampler: Callable[[int, torch.Generator], Tensor],
                 horizon: Optional[int] = None, dtype=torch.float32, device=None):
        _require_gymnasium("GymTasks")
        if not callable(make_env):
            raise TypeError(f"GymTasks: make_env must be a callable task -> gymnasium.Env, got {make_env!r}")
        if not callable(task_sampler):
            raise TypeError(f"GymTasks: task_sampler must be a callable (num_tasks, generator) -> Tensor, "
                            f"got {task_sampler!r}")
        if horizon is not None and (not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1):
            raise ValueError(f"GymTasks: horizon must be an integer >= 1 or None (the env spec's "
                             f"max_episode_steps), got {horizon!r}")
        self.make_env, self.task_sampler = make_env, task_sampler
        self.dtype, self.device = dtype, torch.device("cpu") if device is None else torch.device(device)

        probe_tasks = self.task_sampler(1, torch.Generator().manual_seed(0))
        probe = self._make(probe_tasks[0])
        try:
            self.observation_dim = _check_observation_space(probe.observation_space, "GymTasks")
            self.discrete, self.action_dim = _check_action_space(probe.action_space, "GymTasks")
            spec_steps = probe.spec.max_episode_steps if probe.spec is not None else None
        finally:
            probe.close()
        if horizon is None:
            if spec_steps is None:
                raise ValueError("GymTasks: horizon is required: the environment's spec gives no max_episode_steps")
            horizon = int(spec_steps)
        self.horizon = horizon

        self._venv = None
        self._shape: Tuple[int, int] = (0, 0)
        self._low = self._high = None           # [action_dim] Box bounds (numpy float64)
        self._start = None                      # the Discrete space's first action
        self._last_obs = None                   # [T * B, obs_dim] numpy
        self._done = None                       # [T * B] numpy bool
        self._t = 0

    def _make(self, task_row: Tensor):
        env = self.make_env(_task_value(task_row))
        if gymnasium is not None and not isinstance(env, gymnasium.Env):
            raise TypeError(f"GymTasks: make_env must return a gymnasium.Env, got {type(env).__name__}")
        return env

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"GymTasks.sample_tasks: num_tasks must be an integer >= 1, got {num_tasks!r}")
        tasks = self.task_sampler(num_tasks, generator)
        if not isinstance(tasks, Tensor) or tasks.dim() < 1 or tasks.shape[0] != num_tasks:
            raise ValueError(f"GymTasks.sample_tasks: task_sampler must return a tensor with {num_tasks} rows, got "
                             f"{tuple(tasks.shape) if isinstance(tasks, Tensor) else type(tasks).__name__}")
        return tasks.to(dtype=self.dtype, device=self.device)

    def reset(self, tasks: Tensor, episodes: int, generator: Optional[torch.Generator] = None) -> Tensor:
        if not isinstance(tasks, Tensor) or tasks.dim() < 1 or tasks.shape[0] < 1:
            raise ValueError(f"GymTasks.reset: tasks must be a tensor of shape [T, ...] with T >= 1, got "
                             f"{tuple(tasks.shape) if isinstance(tasks, Tensor) else type(tasks).__name__}")
        if not isinstance(episodes, int) or isinstance(episodes, bool) or episodes < 1:
            raise ValueError(f"GymTasks.reset: episodes must be an integer >= 1, got {episodes!r}")
        self.close()
        num_tasks = tasks.shape[0]
        # make_env is called once per copy (not shared): every copy needs its own simulator state. The environments
        # are built here, not by the vector env, so that their spaces are checked (with this adapter's messages)
        # before gymnasium batches them.
        envs: List[Any] = []
        try:
            for t in range(num_tasks):
                for _ in range(episodes):
                    envs.append(self._make(tasks[t]))
            self._check_copies(envs, episodes)
            # "different" lets the tasks' observation bounds differ (same shape); autoreset at the next step keeps
            # the terminal observation in the step that ends an episode (same-step autoreset would replace it).
            venv = gymnasium.vector.SyncVectorEnv([(lambda env=env: env) for env in envs], observation_mode="different",
                                                  autoreset_mode=gymnasium.vector.AutoresetMode.NEXT_STEP)
        except BaseException:
            for env in envs:
                env.close()
            raise
        self._venv, self._shape = venv, (num_tasks, episodes)
        n = num_tasks * episodes
        if generator is None:
            generator = torch.Generator()
        # Seeds from the caller's generator: the same generator state gives the same episodes.
        seeds = torch.randint(0, 2 ** 31 - 1, (n,), generator=generator, device=generator.device).tolist()
        obs, _ = venv.reset(seed=seeds)
        self._last_obs = np.asarray(obs, dtype=np.float64).reshape(n, self.observation_dim)
        self._done = np.zeros(n, dtype=bool)
        self._t = 0
        return self._to_tensor(self._last_obs).view(num_tasks, episodes, self.observation_dim)

    def _check_copies(self, envs: List[Any], episodes: int) -> None:
        """Every task's environment must have the spaces the constructor read (the policy's widths are fixed) and,
        as a vector env steps them with one batched action, one action space."""
        for i, env in enumerate(envs):
            who = f"GymTasks.reset (environment {i}, task {i // episodes})"
            obs_dim = _check_observation_space(env.observation_space, who)
            discrete, action_dim = _check_action_space(env.action_space, who)
            if (obs_dim, discrete, action_dim) != (self.observation_dim, self.discrete, self.action_dim):
                raise ValueError(f"{who}: spaces {env.observation_space!r} / {env.action_space!r} differ from the "
                                 f"first task's (observation_dim {self.observation_dim}, "
                                 f"{'Discrete' if self.discrete else 'Box'} actions of width {self.action_dim})")
            if env.action_space != envs[0].action_space:
                raise ValueError(f"{who}: every task's action space must be the same (one batched action steps "
                                 f"them all), got {env.action_space!r} and {envs[0].action_space!r}")
        space = envs[0].action_space
        if self.discrete:
            self._start, self._low, self._high = int(space.start), None, None
        else:
            self._start = None
            self._low, self._high = space.low.astype(np.float64), space.high.astype(np.float64)

    def _to_tensor(self, array: np.ndarray) -> Tensor:
        return torch.as_tensor(array).to(dtype=self.dtype, device=self.device)

    def _env_actions(self, actions: Tensor) -> np.ndarray:
        num_tasks, episodes = self._shape
        n = num_tasks * episodes
        if self.discrete:
            if tuple(actions.shape) != (num_tasks, episodes):
                raise ValueError(f"GymTasks.step: discrete actions must be class indices of shape "
                                 f"{(num_tasks, episodes)} ([tasks, episodes]), got {tuple(actions.shape)}")
            if actions.is_floating_point() or actions.is_complex() or actions.dtype == torch.bool:
                raise ValueError(f"GymTasks.step: discrete actions must be an integer tensor, got {actions.dtype}")
            a = actions.detach().cpu().numpy().astype(np.int64).reshape(n)
            if a.min() < 0 or a.max() >= self.action_dim:
                raise ValueError(f"GymTasks.step: discrete actions must lie in [0, {self.action_dim}), got values in "
                                 f"[{a.min()}, {a.max()}]")
            return a + self._start
        if tuple(actions.shape) != (num_tasks, episodes, self.action_dim):
            raise ValueError(f"GymTasks.step: actions must have shape {(num_tasks, episodes, self.action_dim)} "
                             f"([tasks, episodes, action_dim]), got {tuple(actions.shape)}")
        a = actions.detach().to(device="cpu", dtype=torch.float64).reshape(n, self.action_dim).numpy()
        if not np.all(np.isfinite(a)):
            raise ValueError("GymTasks.step: actions must be finite (a NaN or inf would corrupt the simulation)")
        a = np.clip(a, -1.0, 1.0)
        scaled = np.clip(self._low + (a + 1.0) * 0.5 * (self._high - self._low), self._low, self._high)
        return scaled.astype(self._venv.single_action_space.dtype, copy=False)

    def step(self, actions: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if self._venv is None:
            raise RuntimeError("GymTasks.step: call reset first")
        env_actions = self._env_actions(actions)
        was_done = self._done
        obs, rewards, terminated, truncated, _ = self._venv.step(env_actions)
        obs = np.asarray(obs, dtype=np.float64).reshape(was_done.shape[0], self.observation_dim)
        self._t += 1
        # A done episode keeps its last observation and earns nothing; the vector env's reset of it is not shown.
        self._last_obs = np.where(was_done[:, None], self._last_obs, obs)
        rewards = np.where(was_done, 0.0, np.asarray(rewards, dtype=np.float64))
        self._done = was_done | np.asarray(terminated, dtype=bool) | np.asarray(truncated, dtype=bool)
        if self._t >= self.horizon:
            self._done = np.ones_like(self._done)
        shape = self._shape
        return (self._to_tensor(self._last_obs).view(*shape, self.observation_dim),
                self._to_tensor(rewards).view(*shape),
                torch.as_tensor(self._done.copy(), device=self.device).view(*shape))

    @property
    def vector_env(self):
        """The SyncVectorEnv of the last reset (copy t * B + b runs episode b of task t), or None: for rendering
        and for reading the simulators' state."""
        return self._venv

    def close(self) -> None:
        """Closes the environments of the last reset (a new reset does this itself)."""
        if self._venv is not None:
            self._venv.close()
            self._venv = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_cheetah_wrapper_cls = None


def _cheetah_wrapper():
    """The reward-replacing wrapper, defined on first use so that this module imports without gymnasium."""
    global _cheetah_wrapper_cls
    if _cheetah_wrapper_cls is None:
        class HalfCheetahTaskReward(gymnasium.Wrapper):
            """Replaces HalfCheetah's reward by a task's: 'vel' -|v - goal| (run at the goal velocity), 'dir'
            goal * v (run forwards for +1, backwards for -1), minus 0.05 ||action||^2. v is the x velocity of the
            root, (x after - x before) / dt, which gymnasium's HalfCheetah (v4/v5) puts in info as x_velocity."""

            def __init__(self, env, kind: str, goal: float, ctrl_cost: float = CHEETAH_CTRL_COST):
                super().__init__(env)
                self.kind, self.goal, self.ctrl_cost = kind, float(goal), float(ctrl_cost)

            def step(self, action):
                obs, _, terminated, truncated, info = self.env.step(action)
                if "x_velocity" not in info:
                    raise RuntimeError(f"HalfCheetahTaskReward: the wrapped env's info has no x_velocity (it needs "
                                       f"gymnasium's HalfCheetah v4/v5), got keys {sorted(info)}")
                velocity = float(info["x_velocity"])
                forward = -abs(velocity - self.goal) if self.kind == "vel" else self.goal * velocity
                ctrl = -self.ctrl_cost * float(np.sum(np.square(np.asarray(action, dtype=np.float64))))
                info = dict(info, reward_forward=forward, reward_ctrl=ctrl, task=self.goal)
                return obs, forward + ctrl, terminated, truncated, info

        _cheetah_wrapper_cls = HalfCheetahTaskReward
    return _cheetah_wrapper_cls


def _half_cheetah(kind: str, sampler, horizon: int, dtype, device) -> GymTasks:
    name = f"half_cheetah_{kind}"
    _require_mujoco(name)
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        raise ValueError(f"{name}: horizon must be an integer >= 1, got {horizon!r}")
    wrapper = _cheetah_wrapper()

    def make_env(goal):
        # max_episode_steps = horizon: gymnasium's TimeLimit truncates where the paper's episodes end.
        return wrapper(gymnasium.make(HALF_CHEETAH_ID, max_episode_steps=horizon), kind, goal)

    return GymTasks(make_env, sampler, horizon=horizon, dtype=dtype, device=device)


def half_cheetah_vel(horizon: int = 200, goal_low: float = 0.0, goal_high: float = 2.0, dtype=torch.float32,
                     device=None) -> GymTasks:
    """HalfCheetah-Vel (MAML section 5.3; cbfinn/maml_rl half_cheetah_env_rand.py): a task is a goal velocity drawn
    uniformly from [goal_low, goal_high] = [0, 2], tasks of shape [T]; the reward is
    -|forward velocity - goal| - 0.05 ||action||^2; episodes of ``horizon`` (200) steps on gymnasium's
    HalfCheetah-v5 (observation 17: qpos without the root's x, and qvel; actions in [-1, 1]^6)."""
    if not (math.isfinite(goal_low) and math.isfinite(goal_high) and goal_low <= goal_high):
        raise ValueError(f"half_cheetah_vel: need finite goal_low <= goal_high, got {goal_low!r}, {goal_high!r}")

    def sampler(num_tasks: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(num_tasks, generator=generator, dtype=torch.float64, device=generator.device)
        return goal_low + (goal_high - goal_low) * u

    return _half_cheetah("vel", sampler, horizon, dtype, device)


def half_cheetah_dir(horizon: int = 200, dtype=torch.float32, device=None) -> GymTasks:
    """HalfCheetah-Dir (MAML section 5.3; cbfinn/maml_rl half_cheetah_env_rand_direc.py): a task is a direction,
    +1 (forwards) or -1 (backwards) with probability 1/2 each, tasks of shape [T]; the reward is
    direction * forward velocity - 0.05 ||action||^2; episodes of ``horizon`` (200) steps on HalfCheetah-v5."""

    def sampler(num_tasks: int, generator: torch.Generator) -> Tensor:
        coin = torch.randint(0, 2, (num_tasks,), generator=generator, device=generator.device)
        return (2 * coin - 1).to(torch.float64)

    return _half_cheetah("dir", sampler, horizon, dtype, device)
