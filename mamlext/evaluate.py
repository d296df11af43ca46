"""Evaluation of meta-trained models on new tasks, with 95% confidence intervals (``python -m mamlext eval`` applies it
to a saved run: mamlext.train.evaluation).

The confidence interval is the normal one of the mean over tasks, as in Finn et al.'s code:
1.96 * std / sqrt(n) (std with Bessel's correction here; the difference is 0.08% at n = 600).
"""
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mamlext.data import SinusoidTasks

# Finn et al. 2017 (ICML), sinusoid regression, K = 5: query MSE after 1 / 5 / 10 inner steps, read off the paper's
# learning-curve plot (Figure 3 of arXiv:1703.03400v3; the paper has no table for it).
# Only K = 5 is quoted; the table shows "-" elsewhere.
PAPER_SINE = {5: {"maml": {1: 0.67, 5: 0.38, 10: 0.35}, "pretrained": {1: 2.41, 5: 2.23, 10: 2.19}}}


def mean_ci95(values) -> Tuple[float, float]:
    """(mean, half-width of the 95% normal confidence interval of the mean) of a 1-D sequence. One value: CI 0.
    Non-finite values make both non-finite (nan or inf): a diverged task is not hidden."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("mean_ci95: no values")
    mean = values.mean().item()
    if n == 1:
        return mean, 0.0
    return mean, 1.96 * values.std(unbiased=True).item() / math.sqrt(n)


def sine_task_mse(learner, batch, steps: int) -> Tensor:
    """Per-task query MSE [T] after ``steps`` inner SGD steps on the support set (learner: BatchedMAML)."""
    adapted = learner.adapt(batch.x_support, batch.y_support, steps=steps)
    with torch.no_grad():
        prediction = learner.predict(adapted, batch.x_query)
    return (prediction - batch.y_query).pow(2).mean(dim=(1, 2)).double().cpu()


def evaluate_sine(learner, tasks: int = 600, shots: Sequence[int] = (5, 10, 20), steps: Sequence[int] = (1, 5, 10),
                  query: int = 100, seed: int = 1, dtype=torch.float32, device="cpu") -> List[Dict]:
    """For each K in ``shots``: ``tasks`` new sinusoids with K support and ``query`` query points; the query MSE after
    each number of ``steps`` (every count adapts from the meta-learned parameters). Rows of
    {shots, steps, mse, ci95, tasks, diverged (tasks with a non-finite MSE), median}."""
    generator = SinusoidTasks(seed=seed, dtype=dtype, device=device)
    rows = []
    for k in shots:
        batch = generator.sample(tasks, k, query)
        for n in steps:
            mse = sine_task_mse(learner, batch, n)
            mean, ci = mean_ci95(mse)
            rows.append({"shots": k, "steps": n, "mse": mean, "ci95": ci, "tasks": tasks,
                         "diverged": int((~torch.isfinite(mse)).sum()), "median": mse.median().item()})
    return rows


def _fmt(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else str(value)


def format_sine_table(rows: List[Dict], tasks: Optional[int] = None) -> str:
    """The evaluation beside Finn et al. 2017's numbers, and for K = 5 whether it is within them (mean - CI <=
    paper)."""
    tasks = rows[0]["tasks"] if tasks is None and rows else tasks
    lines = [f"Sinusoid regression: query MSE on {tasks} new tasks per K (mean ± 95% CI) after N inner SGD steps",
             f"{'K':>3} {'steps':>5}   {'mamlext':>17}   {'paper MAML':>10}   {'paper pretrained':>16}"]
    verdicts = []
    for row in rows:
        paper = PAPER_SINE.get(row["shots"], {})
        maml, pre = paper.get("maml", {}).get(row["steps"]), paper.get("pretrained", {}).get(row["steps"])
        ours = f"{_fmt(row['mse'])} ± {_fmt(row['ci95'])}"
        note = f"  ({row['diverged']} of {row['tasks']} tasks diverged)" if row.get("diverged") else ""
        lines.append(f"{row['shots']:>3} {row['steps']:>5}   {ours:>17}   {maml if maml is not None else '-':>10}   "
                     f"{pre if pre is not None else '-':>16}{note}")
        if maml is not None:
            within = math.isfinite(row["mse"]) and row["mse"] - row["ci95"] <= maml
            verdicts.append((row["steps"], within))
    if verdicts:
        lines.append("K=5 within the paper's MAML numbers (mean - CI <= paper): " + ", ".join(
            f"{steps} step{'s' if steps != 1 else ''}: {'yes' if ok else 'NO'}" for steps, ok in verdicts))
    lines.append("paper: Finn, Abbeel, Levine 2017, Model-Agnostic Meta-Learning, sinusoid regression, K=5: "
                 "approximate values read off its Figure 3 (arXiv:1703.03400v3), a plot of MSE against gradient steps")
    return "\n".join(lines)


def plot_sine(learner, path, tasks: int = 4, shots: int = 5, steps: int = 10, seed: int = 1, dtype=torch.float32,
              device="cpu") -> Path:
    """A PNG of ``tasks`` new sinusoids: the true curve, the K support points, and the model before adaptation,
    after 1 step and after ``steps`` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # other tasks than the evaluation's; modulo 2**64 as torch takes seeds, so that any seed has a plot
    batch = SinusoidTasks(seed=(seed + 7919) % 2**64, dtype=dtype, device=device).sample(tasks, shots)
    grid = torch.linspace(-5, 5, 200, dtype=dtype, device=device)
    x_grid = grid.reshape(1, -1, 1).expand(tasks, -1, -1).contiguous()
    curves = {}
    for n in sorted({0, 1, steps}):
        with torch.no_grad():
            curves[n] = learner.predict(learner.adapt(batch.x_support, batch.y_support, steps=n), x_grid).cpu()
    truth = batch.amplitude.cpu()[:, None] * torch.sin(grid.cpu()[None] - batch.phase.cpu()[:, None])
    cols = min(tasks, 4)
    rows = math.ceil(tasks / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    styles = {0: dict(color="0.6", ls=":"), 1: dict(color="tab:green", ls="--"), steps: dict(color="tab:blue")}
    for t in range(rows * cols):
        ax = axes[t // cols][t % cols]
        if t >= tasks:
            ax.axis("off")
            continue
        ax.plot(grid.cpu(), truth[t], color="tab:red", lw=2, label="true sine")
        for n, curve in curves.items():
            label = "pre-update" if n == 0 else f"{n} step{'s' if n != 1 else ''}"
            ax.plot(grid.cpu(), curve[t, :, 0], label=f"MAML, {label}", **styles[n])
        ax.scatter(batch.x_support[t, :, 0].cpu(), batch.y_support[t, :, 0].cpu(), marker="^", color="purple",
                   zorder=3, label=f"K={shots} support")
        ax.set_title(f"A={batch.amplitude[t].item():.2f}, phase={batch.phase[t].item():.2f}")
        ax.set_xlim(-5, 5)
        if t == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"mamlext: MAML on new sinusoids, K={shots}, step size {getattr(learner, 'inner_lr', '?')}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate_classification(adapt: Callable, sampler, tasks: int, dtype=torch.float32,
                            progress: bool = True) -> Tensor:
    """Per-task query accuracy [tasks] of ``tasks`` tasks drawn from ``sampler`` (a TaskSampler); adapt(x_support,
    y_support) returns the adapted model of one task."""
    from tqdm import tqdm

    accuracies: List[float] = []
    bar = tqdm(total=tasks, desc="eval", unit="task", disable=not progress, mininterval=0.5)
    while len(accuracies) < tasks:
        batch = sampler.sample()
        for t in range(batch.x_support.shape[0]):
            if len(accuracies) == tasks:
                break
            model = adapt(batch.x_support[t], batch.y_support[t])
            with torch.no_grad():
                logits = model(batch.x_query[t].to(dtype))
            accuracies.append((logits.argmax(1) == batch.y_query[t]).double().mean().item())
            bar.update(1)
    bar.close()
    return torch.tensor(accuracies, dtype=torch.float64)
