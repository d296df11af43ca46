"""A short sinusoid MAML run with mamlext.MAML (Finn et al. 2017's setup, few iterations): meta-trains a
1-40-40-1 ReLU network, then shows the query MSE of new tasks before and after adaptation."""
import time

import torch
from torch import nn

from mamlext.data import SinusoidTasks
from mamlext.maml import MAML
from mamlext.models import sine_mlp


def adapted_query_mse(maml: MAML, batch, steps: int) -> torch.Tensor:
    """Per-task query MSE after ``steps`` inner steps on the support set."""
    losses = []
    for t in range(batch.x_support.shape[0]):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(nn.functional.mse_loss(learner(batch.x_support[t]), batch.y_support[t]))
        losses.append(nn.functional.mse_loss(learner(batch.x_query[t]), batch.y_query[t]).detach())
    return torch.stack(losses)


def run(iterations: int = 300, meta_batch: int = 25, shots: int = 10, inner_lr: float = 0.01, seed: int = 0,
        log_every: int = 50) -> dict:
    torch.manual_seed(seed)
    model = sine_mlp()
    maml = MAML(model, lr=inner_lr)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tasks = SinusoidTasks(seed=seed)
    start = time.perf_counter()
    print(f"sinusoid MAML demo: {iterations} meta-iterations, {meta_batch} tasks each, K={shots}, "
          f"inner lr {inner_lr}, one inner step, second order", flush=True)
    for iteration in range(1, iterations + 1):
        batch = tasks.sample(meta_batch, shots)
        optimizer.zero_grad()
        meta_loss = 0.0
        for t in range(meta_batch):
            learner = maml.clone()
            learner.adapt(nn.functional.mse_loss(learner(batch.x_support[t]), batch.y_support[t]))
            query_loss = nn.functional.mse_loss(learner(batch.x_query[t]), batch.y_query[t]) / meta_batch
            query_loss.backward()
            meta_loss += query_loss.item()
        optimizer.step()
        if iteration % log_every == 0 or iteration == iterations:
            elapsed = time.perf_counter() - start
            print(f"  iteration {iteration:5d}/{iterations}  query MSE {meta_loss:.3f}  "
                  f"{iteration * meta_batch / elapsed:.0f} tasks/s", flush=True)

    test = SinusoidTasks(seed=seed + 1).sample(100, shots)
    result = {"iterations": iterations, "seconds": round(time.perf_counter() - start, 1)}
    for steps in (0, 1, 5):
        result[f"mse_after_{steps}_steps"] = adapted_query_mse(maml, test, steps).mean().item()
    print("new tasks, K={}: query MSE {:.3f} before adaptation, {:.3f} after 1 step, {:.3f} after 5 steps".format(
        shots, result["mse_after_0_steps"], result["mse_after_1_steps"], result["mse_after_5_steps"]), flush=True)
    return result
