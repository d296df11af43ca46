"""mamlext.rl.gym: the gymnasium adapter (GymTasks) and MAML's HalfCheetah-Vel / -Dir task families."""
import numpy as np
import pytest
import torch

gymnasium = pytest.importorskip("gymnasium")
from gymnasium import spaces  # noqa: E402

from mamlext.rl import gym as rlgym  # noqa: E402


class EchoEnv(gymnasium.Env):
    """Observes [task, action...]: shows what the adapter hands the environment. Terminates after `length` steps."""

    closed = []

    def __init__(self, task=0.0, low=(0.0, -4.0), high=(10.0, 4.0), length=1000):
        self.task, self.length = float(task), length
        self.action_space = spaces.Box(np.array(low, np.float32), np.array(high, np.float32))
        self.observation_space = spaces.Box(-np.inf, np.inf, (1 + len(low),), np.float64)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.concatenate([[self.task], self.np_random.uniform(size=len(self.action_space.low))]), {}

    def step(self, action):
        self.t += 1
        return np.concatenate([[self.task], action]), float(self.t), self.t >= self.length, False, {}

    def close(self):
        EchoEnv.closed.append(id(self))


class SpaceEnv(gymnasium.Env):
    def __init__(self, observation_space, action_space):
        self.observation_space, self.action_space = observation_space, action_space


def _tasks(n, generator):
    return torch.arange(n, dtype=torch.float64) + 1.0


def test_box_actions_are_mapped_from_unit_range_and_clipped(device):
    env = rlgym.GymTasks(lambda task: EchoEnv(task), _tasks, horizon=5, dtype=torch.float64, device=device)
    assert (env.observation_dim, env.action_dim, env.discrete, env.horizon) == (3, 2, False, 5)
    g = torch.Generator().manual_seed(0)
    tasks = env.sample_tasks(2, g)
    obs = env.reset(tasks, 3, g)
    assert obs.shape == (2, 3, 3) and obs.dtype == torch.float64 and obs.device.type == device
    assert obs[:, :, 0].tolist() == [[1.0] * 3, [2.0] * 3]   # task t's environments got row t
    actions = torch.tensor([[-1.0, 1.0], [0.0, 0.0], [3.0, -7.0]]).expand(2, 3, 2).to(device)
    obs, reward, done = env.step(actions)
    assert obs[0, :, 1:].tolist() == [[0.0, 4.0], [5.0, 0.0], [10.0, -4.0]]   # low + (a + 1) / 2 (high - low), clipped
    assert reward.shape == (2, 3) and reward.dtype == torch.float64 and done.dtype == torch.bool
    with pytest.raises(ValueError, match=r"actions must have shape \(2, 3, 2\)"):
        env.step(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="finite"):
        env.step(torch.full((2, 3, 2), float("nan")))
    env.close()


def test_horizon_ends_episodes_and_is_required_without_spec():
    with pytest.raises(ValueError, match="horizon is required"):
        rlgym.GymTasks(lambda task: EchoEnv(task), _tasks)
    env = rlgym.GymTasks(lambda task: EchoEnv(task), _tasks, horizon=3)
    env.reset(env.sample_tasks(1, torch.Generator()), 2, torch.Generator().manual_seed(0))
    dones = [env.step(torch.zeros(1, 2, 2))[2].all().item() for _ in range(4)]
    assert dones == [False, False, True, True]
    env.close()


def test_done_episodes_stay_done_and_hide_the_autoreset():
    """Episodes of length 2 and 4 (tasks 1, 2): after the end, the last observation, reward 0, done; the vector env
    meanwhile resets and restarts the episode, which must not show."""
    env = rlgym.GymTasks(lambda task: EchoEnv(task, length=2 * int(task)), _tasks, horizon=10)
    env.reset(env.sample_tasks(2, torch.Generator()), 1, torch.Generator().manual_seed(0))
    rows = []
    for k in range(7):
        obs, reward, done = env.step(torch.full((2, 1, 2), k / 10))
        rows.append((obs[:, 0, 1].tolist(), reward[:, 0].tolist(), done[:, 0].tolist()))
    a = [np.float32(k / 10 * 5 + 5).item() for k in range(7)]   # the echoed first action coordinate
    assert [r[2] for r in rows] == [[False, False], [True, False], [True, False], [True, True]] + [[True, True]] * 3
    assert [r[1] for r in rows] == [[1, 1], [2, 2], [0, 3], [0, 4]] + [[0, 0]] * 3
    assert [r[0][0] for r in rows] == pytest.approx([a[0], a[1]] + [a[1]] * 5)
    assert [r[0][1] for r in rows] == pytest.approx(a[:4] + [a[3]] * 3)
    env.close()


def test_cartpole_discrete_terminates_and_stays_done():
    env = rlgym.GymTasks(lambda task: gymnasium.make("CartPole-v1"), _tasks)
    assert (env.observation_dim, env.action_dim, env.discrete, env.horizon) == (4, 2, True, 500)
    g = torch.Generator().manual_seed(3)
    obs = env.reset(env.sample_tasks(2, g), 4, g)
    assert obs.shape == (2, 4, 4) and obs.dtype == torch.float32
    push = torch.ones(2, 4, dtype=torch.long)   # always right: the pole falls within ~10 steps
    seen_done = torch.zeros(2, 4, dtype=torch.bool)
    last = None
    for _ in range(40):
        obs, reward, done = env.step(push)
        assert (done | ~seen_done).all()                       # done never goes back to False
        if last is not None:
            assert torch.equal(obs[seen_done], last[seen_done])  # frozen observation
            assert (reward[seen_done] == 0).all()
        seen_done, last = done, obs
    assert done.all()
    with pytest.raises(ValueError, match="integer tensor"):
        env.step(push.float())
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        env.step(push * 2)
    with pytest.raises(ValueError, match=r"class indices of shape \(2, 4\)"):
        env.step(push[0])
    env.close()


def _rollout(env, seed, steps=5):
    g = torch.Generator().manual_seed(seed)
    out = [env.reset(env.sample_tasks(2, g), 2, g)]
    for _ in range(steps):
        obs, reward, _ = env.step(torch.rand(2, 2, 1, generator=g) * 2 - 1)
        out += [obs, reward.unsqueeze(-1)]
    return torch.cat([o.flatten() for o in out])


def test_same_generator_seed_reproduces():
    env = rlgym.GymTasks(lambda task: gymnasium.make("Pendulum-v1"), _tasks)
    assert (env.observation_dim, env.action_dim, env.discrete, env.horizon) == (3, 1, False, 200)
    first, again, other = _rollout(env, 7), _rollout(env, 7), _rollout(env, 8)
    assert torch.equal(first, again) and not torch.equal(first, other)
    env.close()


def test_reset_closes_the_previous_environments():
    EchoEnv.closed.clear()
    env = rlgym.GymTasks(lambda task: EchoEnv(task), _tasks, horizon=2)
    assert len(EchoEnv.closed) == 1   # the constructor's probe
    env.reset(env.sample_tasks(2, torch.Generator()), 2)
    env.reset(env.sample_tasks(1, torch.Generator()), 2)
    assert len(EchoEnv.closed) == 5
    env.close()
    assert len(EchoEnv.closed) == 7 and env.vector_env is None
    with pytest.raises(RuntimeError, match="call reset first"):
        env.step(torch.zeros(1, 2, 2))


@pytest.mark.parametrize("observation_space, action_space, named", [
    (spaces.Dict({"x": spaces.Box(-1, 1, (2,))}), spaces.Discrete(2), "Dict"),
    (spaces.Box(-1, 1, (2, 2)), spaces.Discrete(2), r"Box\(-1.0, 1.0, \(2, 2\)"),
    (spaces.Box(-1, 1, (2,)), spaces.MultiDiscrete([3, 3]), "MultiDiscrete"),
    (spaces.Box(-1, 1, (2,)), spaces.Box(-np.inf, np.inf, (2,)), "finite bounds"),
])
def test_unsupported_spaces_are_refused_by_name(observation_space, action_space, named):
    with pytest.raises(ValueError, match=named):
        rlgym.GymTasks(lambda task: SpaceEnv(observation_space, action_space), _tasks, horizon=5)


def test_tasks_with_different_spaces_are_refused():
    env = rlgym.GymTasks(lambda task: EchoEnv(task, low=(0.0,) * int(task), high=(1.0,) * int(task)), _tasks,
                         horizon=5)
    with pytest.raises(ValueError, match=r"environment 2, task 1"):
        env.reset(env.sample_tasks(2, torch.Generator()), 2)


# --- HalfCheetah-Vel / -Dir -----------------------------------------------------------------------------------------

@pytest.fixture
def mujoco(tmp_path, monkeypatch):
    module = pytest.importorskip("mujoco")
    # MuJoCo 4 warns that gymnasium's half_cheetah.xml uses the deprecated settotalmass, and its default handler
    # appends that to MUJOCO_LOG.TXT in the working directory: keep it out of the checkout.
    monkeypatch.chdir(tmp_path)
    return module


def _x(env):
    return np.array([e.unwrapped.data.qpos[0] for e in env.vector_env.envs]).reshape(env.vector_env.num_envs)


@pytest.mark.parametrize("family", ["vel", "dir"])
def test_half_cheetah_reward_is_the_papers(mujoco, family):
    env = rlgym.half_cheetah_vel() if family == "vel" else rlgym.half_cheetah_dir()
    assert (env.observation_dim, env.action_dim, env.discrete, env.horizon) == (17, 6, False, 200)
    g = torch.Generator().manual_seed(0)
    tasks = env.sample_tasks(3, g)
    assert tasks.shape == (3,)
    env.reset(tasks, 2, g)
    dt = env.vector_env.envs[0].unwrapped.dt
    assert dt == pytest.approx(0.05)
    goal = tasks.double().repeat_interleave(2).numpy()
    for step in range(200):
        actions = torch.rand(3, 2, 6, generator=g) * 3 - 1.5       # beyond [-1, 1]: clipped before costing
        before = _x(env)
        _, reward, done = env.step(actions)
        velocity = (_x(env) - before) / dt
        a = actions.double().clamp(-1, 1).reshape(6, 6).numpy()
        forward = -np.abs(velocity - goal) if family == "vel" else goal * velocity
        expected = forward - 0.05 * np.square(a).sum(-1)
        np.testing.assert_allclose(reward.double().flatten().numpy(), expected, rtol=1e-5, atol=1e-5)
        if step < 3:
            assert np.abs(velocity).max() > 0     # the cheetah moves: the check is not vacuous
        assert done.all().item() == (step == 199)
    env.close()


def test_half_cheetah_goals(mujoco):
    g = torch.Generator().manual_seed(0)
    velocities = rlgym.half_cheetah_vel(horizon=5).sample_tasks(2000, g)
    assert velocities.dtype == torch.float32 and 0 <= velocities.min() < 0.01 and 1.99 < velocities.max() <= 2
    directions = rlgym.half_cheetah_dir(horizon=5, dtype=torch.float64).sample_tasks(2000, g)
    assert set(directions.tolist()) == {-1.0, 1.0} and abs(directions.mean().item()) < 0.1
    with pytest.raises(ValueError, match="horizon must be an integer >= 1"):
        rlgym.half_cheetah_dir(horizon=0)


def test_half_cheetah_without_mujoco_says_what_to_install(monkeypatch):
    real = rlgym.importlib.util.find_spec
    monkeypatch.setattr(rlgym.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mujoco" else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install "mamlext\[rl\]"'):
        rlgym.half_cheetah_vel()
