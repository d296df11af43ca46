"""The experiments `train` runs: each builds its model, learner, optimizer and task sampler from the config, takes a
training step, and evaluates on new tasks."""
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mamlext import distributed, evaluate
from mamlext.batched import BatchedMAML
from mamlext.data import SinusoidTasks
from mamlext.maml import MAML
from mamlext.models import conv4, sine_mlp
from mamlext.rl.advantages import advantages
from mamlext.rl.envs import Navigation2D
from mamlext.rl.evaluation import adaptation_curve, format_nav_table, format_rl_table, plot_nav, summarize
from mamlext.rl.policy import GaussianMLPPolicy
from mamlext.rl.sampling import sample_episodes
from mamlext.rl.trpo import MAMLTRPO, TaskData
from mamlext.train.config import DTYPES, ConfigError


class SineExperiment:
    """Finn et al.'s sinusoid regression on BatchedMAML's fused MLP engine: a whole meta-batch per call."""

    task_shard = slice(None)  # the tasks of each meta-batch this process computes (all but under torchrun)

    def __init__(self, config: Dict[str, Any], device: torch.device, progress: bool = True):
        self.config, self.device, self.dtype = config, device, DTYPES[config["dtype"]]
        torch.manual_seed(config["seed"])
        self.model = sine_mlp(config["hidden"]).to(device=device, dtype=self.dtype)
        self.learner = BatchedMAML(self.model, inner_lr=config["inner_lr"], inner_steps=config["inner_steps"],
                                   first_order=config["first_order"], loss="mse",
                                   lr_mode="per_param" if config["algo"] == "metasgd" else "fixed")
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=config["meta_lr"])
        self.tasks = SinusoidTasks(seed=config["seed"], dtype=self.dtype, device=device)

    def train_step(self) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Samples a meta-batch and puts the meta-gradient into the parameters; returns the (detached) meta-loss."""
        c = self.config
        batch = self.tasks.sample(c["meta_batch"], c["shots"], c["query"])
        xs, ys, xq, yq = (data[self.task_shard] for data in batch[:4])
        loss = self.learner.meta_loss(xs, ys, xq, yq)
        loss.backward()
        return loss.detach(), {}

    def sampler_state(self):
        return self.tasks.generator.get_state()

    def load_sampler_state(self, state) -> None:
        self.tasks.generator.set_state(state)

    def evaluate(self, tasks: int, seed: int, out_dir: Optional[Path] = None, progress: bool = True):
        c = self.config
        rows = evaluate.evaluate_sine(self.learner, tasks=tasks, shots=c["eval_shots"], steps=c["eval_steps"],
                                      query=c["eval_query"], seed=seed, dtype=self.dtype, device=self.device)
        result = {"task": "sine", "tasks": tasks, "seed": seed, "rows": rows}
        if out_dir is not None and c["plot_tasks"] > 0:
            path = Path(out_dir) / "sine_adaptation.png"
            evaluate.plot_sine(self.learner, path, tasks=c["plot_tasks"], shots=min(c["eval_shots"]),
                               steps=max(c["eval_steps"]), seed=seed, dtype=self.dtype, device=self.device)
            result["plot"] = str(path)
        return result

    @staticmethod
    def report(result) -> str:
        return evaluate.format_sine_table(result["rows"], tasks=result["tasks"])


def _import_omniglot():
    try:
        from mamlext.data import Omniglot, TaskSampler
    except ImportError as error:
        raise ConfigError(f"train omniglot: the Omniglot loader (mamlext.data.Omniglot, TaskSampler) is not "
                          f"available in this checkout: {error}") from None
    return Omniglot, TaskSampler


class OmniglotExperiment:
    """N-way K-shot Omniglot with Conv4 on mamlext.MAML, one task at a time (on the CPU faster than the generic
    engine's batched convolutions)."""

    task_shard = slice(None)  # the tasks of each meta-batch this process computes (all but under torchrun)

    def __init__(self, config: Dict[str, Any], device: torch.device, progress: bool = True):
        self.config, self.device, self.dtype = config, device, DTYPES[config["dtype"]]
        self.progress = progress
        Omniglot, TaskSampler = _import_omniglot()
        self._TaskSampler = TaskSampler
        c = config
        common = dict(cache_dir=c["cache_dir"], progress=progress)
        self.train_set = self._dataset(Omniglot, "train", c["train_alphabets"], common)
        self.test_set = self._dataset(Omniglot, "test", c["test_alphabets"], common)
        overlap = set(self.train_set.alphabets) & set(self.test_set.alphabets)
        if overlap:
            raise ConfigError(f"the test alphabets {sorted(overlap)} are also training alphabets: pass "
                              "--train-alphabets / --test-alphabets that do not overlap")
        for name, dataset in (("train", self.train_set), ("test", self.test_set)):
            if c["ways"] > dataset.num_classes:
                raise ConfigError(f"--ways {c['ways']} is larger than the {dataset.num_classes} classes of the "
                                  f"{name} alphabets ({', '.join(dataset.alphabets)})")
            per_class = dataset.images.shape[1]
            if c["shots"] + c["query"] > per_class:
                raise ConfigError(f"--shots {c['shots']} + --query {c['query']} = {c['shots'] + c['query']} images per "
                                  f"class, but the {name} classes hold {per_class}")
        torch.manual_seed(c["seed"])
        self.model = conv4(c["ways"], in_channels=self.train_set.images.shape[2], hidden=c["hidden"],
                           image_size=self.train_set.images.shape[-1]).to(device=device, dtype=self.dtype)
        self.learner = MAML(self.model, lr=c["inner_lr"], first_order=c["first_order"])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c["meta_lr"])
        self.sampler = TaskSampler(self.train_set, c["ways"], c["shots"], c["query"], c["meta_batch"], seed=c["seed"],
                                   device=device)

    def _dataset(self, Omniglot, split, alphabets, common):
        try:
            if alphabets:
                return Omniglot(self.config["data"], split="all", alphabets=list(alphabets), **common)
            return Omniglot(self.config["data"], split=split, **common)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"Omniglot ({split} set): {error}") from None

    def _adapted(self, x_support: Tensor, y_support: Tensor, steps: int, first_order: Optional[bool] = None) -> MAML:
        learner = self.learner.clone(first_order=first_order)
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(x_support), y_support))
        return learner

    def train_step(self) -> Tuple[Tensor, Dict[str, Tensor]]:
        c = self.config
        batch = self.sampler.sample()
        tasks = range(batch.x_support.shape[0])[self.task_shard]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        for t in tasks:
            xs, xq = batch.x_support[t].to(self.dtype), batch.x_query[t].to(self.dtype)
            learner = self._adapted(xs, batch.y_support[t], c["inner_steps"])
            logits = learner(xq)
            loss = F.cross_entropy(logits, batch.y_query[t])
            (loss / len(tasks)).backward()
            total += loss.detach()
            correct += (logits.detach().argmax(1) == batch.y_query[t]).double().mean()
        return total / len(tasks), {"accuracy": correct / len(tasks)}

    def sampler_state(self):
        return self.sampler.state_dict()

    def load_sampler_state(self, state) -> None:
        self.sampler.load_state_dict(state)

    def evaluate(self, tasks: int, seed: int, out_dir: Optional[Path] = None, progress: bool = True):
        c = self.config
        sampler = self._TaskSampler(self.test_set, c["ways"], c["shots"], c["query"], min(tasks, 20), seed=seed,
                                    device=self.device)
        accuracies = evaluate.evaluate_classification(
            lambda xs, ys: self._adapted(xs.to(self.dtype), ys, c["test_steps"], first_order=True),
            sampler, tasks, dtype=self.dtype, progress=progress)
        mean, ci95 = evaluate.mean_ci95(accuracies)
        return {"task": "omniglot", "tasks": tasks, "seed": seed, "ways": c["ways"], "shots": c["shots"],
                "test_steps": c["test_steps"], "accuracy": mean, "ci95": ci95,
                "test_alphabets": list(self.test_set.alphabets), "train_alphabets": list(self.train_set.alphabets)}

    @staticmethod
    def report(result) -> str:
        return (f"Omniglot {result['ways']}-way {result['shots']}-shot, {result['tasks']} test tasks from alphabets "
                f"never trained on ({', '.join(result['test_alphabets'])}), {result['test_steps']} inner steps: "
                f"accuracy {100 * result['accuracy']:.2f}% ± {100 * result['ci95']:.2f}% (95% CI)")


class _TRPOSteps:
    """The training loop's optimizer for MAML-TRPO: train_step leaves TRPO's accepted step here and step() applies
    it, so that an iteration interrupted before the step leaves the policy as it was. TRPO keeps no state between
    iterations."""

    param_groups = ()
    state: Dict = {}

    def __init__(self, algo: MAMLTRPO):
        self.algo, self.pending = algo, None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.pending = None

    def step(self) -> None:
        if self.pending is not None:
            self.algo.apply(self.pending)
            self.pending = None

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        if state:
            raise ValueError(f"MAML-TRPO keeps no optimizer state, the checkpoint has {sorted(state)}")


def _rl_env(config: Dict[str, Any], dtype: torch.dtype, device: torch.device):
    task = config["task"]
    if task == "nav":
        return Navigation2D(horizon=config["horizon"], dtype=dtype, device=device)
    from mamlext.rl import gym  # gymnasium and MuJoCo: the "rl" extra

    make = gym.half_cheetah_vel if task == "cheetah-vel" else gym.half_cheetah_dir
    try:
        return make(horizon=config["horizon"], dtype=dtype, device=device)
    except ImportError as error:
        raise ConfigError(f"train {task}: {error}") from None


class RLExperiment:
    """MAML-TRPO (section 5.3 of the paper): a Gaussian MLP policy, one policy-gradient step per task, TRPO on the
    meta-objective with exact Fisher-vector products (mamlext.rl); on the 2D navigation (nav) or, with gymnasium's
    MuJoCo, HalfCheetah-Vel / -Dir (cheetah-vel, cheetah-dir)."""

    task_shard = slice(None)

    def __init__(self, config: Dict[str, Any], device: torch.device, progress: bool = True):
        self.config, self.device, self.dtype = config, device, DTYPES[config["dtype"]]
        c = config
        torch.manual_seed(c["seed"])
        self.env = _rl_env(c, self.dtype, device)
        self.model = self._policy()
        self.learner = MAMLTRPO(self.model, inner_lr=c["inner_lr"], first_order=c["first_order"],
                                lr_mode="per_param" if c["algo"] == "metasgd" else "fixed", max_kl=c["max_kl"])
        self.optimizer = _TRPOSteps(self.learner)
        self.generator = torch.Generator().manual_seed(c["seed"])

    def _policy(self) -> GaussianMLPPolicy:
        c = self.config
        return GaussianMLPPolicy(self.env.observation_dim, self.env.action_dim, (c["hidden"], c["hidden"]),
                                 activation="relu").to(device=self.device, dtype=self.dtype)

    def _task_data(self, episodes) -> TaskData:
        return TaskData.from_episodes(episodes, advantages(episodes, self.config["gamma"], self.config["gae_lambda"]))

    def train_step(self) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Samples a meta-batch (this process's share of its tasks under torchrun) and finds TRPO's step, which
        optimizer.step() applies; returns the surrogate loss after the step and the mean returns before and after
        the adaptation."""
        c, algo = self.config, self.learner
        goals = self.env.sample_tasks(c["meta_batch"], self.generator)  # every process draws all of them
        share = dict(generator=self.generator, task_slice=self.task_shard)
        support = sample_episodes(self.env, goals, algo.spec, algo.policy_params(), c["episodes"], **share)
        support_data = self._task_data(support)
        query = sample_episodes(self.env, goals, algo.spec, algo.adapt(support_data), c["episodes"], **share)
        values, info = algo.search(support_data, self._task_data(query), all_reduce=distributed.all_reduce_sum)
        self.optimizer.pending = values
        as_tensor = lambda v: torch.tensor(float(v), dtype=torch.float64, device=self.device)  # noqa: E731
        extra = {"return_pre": support.returns().mean().double(), "return_post": query.returns().mean().double(),
                 "kl": as_tensor(info["kl"]), "step_fraction": as_tensor(info["step_fraction"])}
        return as_tensor(info["loss_after"]), extra

    def sampler_state(self):
        return self.generator.get_state()

    def load_sampler_state(self, state) -> None:
        self.generator.set_state(state)

    def evaluate(self, tasks: int, seed: int, out_dir: Optional[Path] = None, progress: bool = True):
        c = self.config
        generator = torch.Generator().manual_seed(seed)
        goals = self.env.sample_tasks(tasks, generator)
        curve = adaptation_curve(self.learner, self.env, goals, c["eval_episodes"], c["test_steps"], generator,
                                 c["gamma"], c["gae_lambda"])
        # the same protocol from a randomly initialised policy (the paper's "random init" baseline)
        torch.manual_seed(seed)
        fresh = MAMLTRPO(self._policy(), inner_lr=c["inner_lr"], first_order=True)
        random_curve = adaptation_curve(fresh, self.env, goals, c["eval_episodes"], c["test_steps"],
                                        torch.Generator().manual_seed(seed), c["gamma"], c["gae_lambda"])
        result = {"task": c["task"], "tasks": tasks, "seed": seed, "episodes": c["eval_episodes"],
                  "rows": summarize(curve["returns"]), "random_rows": summarize(random_curve["returns"])}
        if out_dir is not None and c["plot_tasks"] > 0 and c["task"] == "nav":
            path = plot_nav(self.learner, self.env, goals, curve["params"], Path(out_dir) / "nav_trajectories.png",
                            c["plot_tasks"])
            if path is not None:
                result["plot"] = str(path)
        return result

    @staticmethod
    def report(result) -> str:
        return format_nav_table(result) if result["task"] == "nav" else format_rl_table(result)


EXPERIMENTS = {"sine": SineExperiment, "omniglot": OmniglotExperiment, "nav": RLExperiment,
               "cheetah-vel": RLExperiment, "cheetah-dir": RLExperiment}


def build_experiment(config: Dict[str, Any], device: torch.device, progress: bool = True):
    return EXPERIMENTS[config["task"]](config, device, progress=progress)

