"""Evaluating a meta-trained policy on new tasks as the MAML paper's test script does: per task, sample episodes
with the policy, take a policy-gradient step on them (step size alpha, then alpha / 2 for the later steps), sample
again, and so on; the average undiscounted return after 0, 1, 2, ... steps, with 95% confidence intervals over the
tasks."""
from pathlib import Path
from typing import Dict, List, Optional

import torch

from mamlext.evaluate import mean_ci95
from mamlext.rl.advantages import advantages
from mamlext.rl.envs import TaskEnv
from mamlext.rl.sampling import sample_episodes
from mamlext.rl.trpo import MAMLTRPO, TaskData

# Finn, Abbeel & Levine 2017, Figure 4 (point robot, 2D navigation): average return after 0 / 1 / 2 / 3 gradient steps,
# from the result files of the paper's code (cbfinn/maml_rl, icml/icml_point_results_*.pkl).
PAPER_NAV = {"MAML": [-40.41, -11.68, -3.33, -3.23], "random init": [-82.66, -57.96], "oracle": -2.29}


@torch.no_grad()
def adaptation_curve(algo: MAMLTRPO, env: TaskEnv, tasks: torch.Tensor, episodes: int, steps: int,
                     generator: torch.Generator, gamma: float = 0.99, lam: float = 1.0,
                     ) -> Dict[str, object]:
    """Per task, the mean return [steps + 1, T] after 0..steps policy-gradient steps (alpha, then alpha / 2), and
    the policies' parameters after each step (per task [T, *shape] each)."""
    params = algo.policy_params()
    rates = algo.rates()
    returns: List[torch.Tensor] = []
    policies: List[List[torch.Tensor]] = []
    for step in range(steps + 1):
        batch = sample_episodes(env, tasks, algo.spec, params, episodes, generator)
        returns.append(batch.returns().mean(1).double().cpu())
        policies.append(params)
        if step == steps:
            break
        scale = 1.0 if step == 0 else 0.5
        data = TaskData.from_episodes(batch, advantages(batch, gamma, lam))
        params = algo.adapt(data, params, [lr * scale for lr in rates])
    return {"returns": torch.stack(returns), "params": policies}


def summarize(returns: torch.Tensor) -> List[Dict[str, float]]:
    """Rows {steps, mean, ci95} of adaptation_curve's returns [steps + 1, T]."""
    rows = []
    for step, per_task in enumerate(returns):
        mean, ci = mean_ci95(per_task)
        rows.append({"steps": step, "mean": mean, "ci95": ci})
    return rows


def format_nav_table(result: Dict[str, object]) -> str:
    """The evaluation beside the paper's Figure 4."""
    rows, tasks = result["rows"], result["tasks"]
    random_rows = result.get("random_rows") or []
    lines = [f"2D navigation, {tasks} new goals x {result['episodes']} episodes per gradient step (average return, "
             f"95% CI over the goals; higher is better)",
             f"{'gradient steps':>15} | {'mamlext MAML':>17} | {'paper MAML':>10} | {'random init (ours)':>18} | "
             f"{'paper random init':>17}"]
    for row in rows:
        s = row["steps"]
        paper = PAPER_NAV["MAML"][s] if s < len(PAPER_NAV["MAML"]) else None
        ours_random = next((r for r in random_rows if r["steps"] == s), None)
        paper_random = PAPER_NAV["random init"][s] if s < len(PAPER_NAV["random init"]) else None
        cell = lambda r: f"{r['mean']:8.2f} ± {r['ci95']:5.2f}" if r else ""  # noqa: E731
        lines.append(f"{s:>15} | {cell(row):>17} | {'' if paper is None else f'{paper:.2f}':>10} | "
                     f"{cell(ours_random):>18} | {'' if paper_random is None else f'{paper_random:.2f}':>17}")
    lines.append(f"oracle (the paper's policy trained on each goal): {PAPER_NAV['oracle']:.2f}")
    return "\n".join(lines)


def format_rl_table(result: Dict[str, object]) -> str:
    """The evaluation of a task family without a paper table at hand (the cheetahs: the paper plots curves)."""
    lines = [f"{result['task']}, {result['tasks']} new tasks x {result['episodes']} episodes per gradient step "
             f"(average return, 95% CI over the tasks)",
             f"{'gradient steps':>15} | {'mamlext MAML':>17} | {'random init (ours)':>18}"]
    random_rows = {r["steps"]: r for r in result.get("random_rows") or []}
    for row in result["rows"]:
        other = random_rows.get(row["steps"])
        lines.append(f"{row['steps']:>15} | {row['mean']:8.2f} ± {row['ci95']:5.2f} | "
                     + (f"{other['mean']:8.2f} ± {other['ci95']:5.2f}" if other else ""))
    return "\n".join(lines)


def plot_nav(algo: MAMLTRPO, env: TaskEnv, goals: torch.Tensor, params: List[List[torch.Tensor]], path: Path,
             tasks: int = 2) -> Optional[Path]:
    """A PNG like the paper's Figure 4 (left): for the first ``tasks`` goals, the trajectory of the mean action of
    the policy after each number of gradient steps (``params``: adaptation_curve's). None when matplotlib is
    missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = min(tasks, goals.shape[0])
    generator = torch.Generator().manual_seed(0)  # unused by deterministic rollouts, required by the protocol
    shapes = algo.spec.shapes()

    def first_tasks(step_params):  # the pre-update policy is shared by the tasks, the adapted ones are per task
        return [p[:tasks] if p.dim() > len(shape) else p for p, shape in zip(step_params, shapes)]

    episodes = [sample_episodes(env, goals[:tasks], algo.spec, first_tasks(step_params), 1, generator,
                                deterministic=True) for step_params in params]
    fig, axes = plt.subplots(1, tasks, figsize=(4.2 * tasks, 4.2), squeeze=False)
    for t, ax in enumerate(axes[0]):
        for step, batch in enumerate(episodes):
            valid = batch.mask[t, 0] > 0
            xy = batch.observations[t, 0][valid].cpu()
            label = "pre-update" if step == 0 else f"{step} gradient step{'s' if step > 1 else ''}"
            ax.plot(xy[:, 0], xy[:, 1], marker=".", markersize=3, linewidth=1, label=label)
        ax.plot(*goals[t].cpu().tolist(), marker="*", markersize=14, color="black", linestyle="none", label="goal")
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        ax.set_title(f"goal ({goals[t, 0]:.2f}, {goals[t, 1]:.2f})")
    axes[0][0].legend(loc="lower left", fontsize=7)
    fig.suptitle("MAML, 2D navigation: adapted trajectories")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
