"""Returns, a per-task linear feature baseline fitted for all tasks in one batched solve, GAE and advantage
normalisation, over [T, B, H] episodes (mamlext.rl.sampling.Episodes) with their mask."""
import torch
from torch import Tensor

from mamlext.rl.sampling import Episodes


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """R_t = sum_{l >= 0} gamma^l r_{t+l} within each episode [T, B, H] (0 on padding; rewards there are ignored)."""
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        out[..., t] = running
    return out


def baseline_features(observations: Tensor, mask: Tensor) -> Tensor:
    """rllab's LinearFeatureBaseline features [T, B, H, 2 D + 4]: o, o^2 (o clipped to [-10, 10]), the time step
    t / 100 and its square and cube, and 1; zero on padding."""
    o = observations.clamp(-10, 10)
    H = observations.shape[2]
    time = (torch.arange(H, dtype=o.dtype, device=o.device) / 100.0).view(1, 1, H, 1).expand(*o.shape[:3], 1)
    features = torch.cat([o, o * o, time, time ** 2, time ** 3, torch.ones_like(time)], dim=-1)
    return features * mask.unsqueeze(-1)


def linear_baseline(episodes: Episodes, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Per task, the least-squares fit of ``returns`` on baseline_features over its episodes (ridge ``reg``, raised
    10x up to 5 times if the solve is not finite, as rllab does), all tasks in one batched solve in float64; returns
    the fitted values [T, B, H] (0 on padding)."""
    T = episodes.tasks
    features = baseline_features(episodes.observations, episodes.mask).to(torch.float64)
    F = features.reshape(T, -1, features.shape[-1])
    R = returns.reshape(T, -1, 1).to(torch.float64)
    FtF, FtR = F.transpose(1, 2) @ F, F.transpose(1, 2) @ R
    eye = torch.eye(F.shape[-1], dtype=torch.float64, device=F.device)
    for _ in range(5):
        coefficients = torch.linalg.solve(FtF + reg * eye, FtR)
        if bool(torch.isfinite(coefficients).all()):
            break
        reg *= 10
    return (F @ coefficients).view_as(returns).to(returns.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimation [T, B, H]: A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t +
    gamma V_{t+1} - V_t, with V = 0 past an episode's end."""
    H = rewards.shape[-1]
    next_values = torch.cat([values[..., 1:] * mask[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = (rewards + gamma * next_values - values) * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(H - 1, -1, -1):
        running = deltas[..., t] + gamma * lam * running * mask[..., t]
        out[..., t] = running
    return out


def normalize(advantages: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Per task, (A - mean) / (std + eps) over its valid steps (rllab's center_adv), 0 on padding."""
    T = advantages.shape[0]
    a, m = advantages.reshape(T, -1), mask.reshape(T, -1)
    count = m.sum(1, keepdim=True).clamp_min(1)
    mean = (a * m).sum(1, keepdim=True) / count
    var = (((a - mean) * m) ** 2).sum(1, keepdim=True) / count
    return (((a - mean) / (var.sqrt() + eps)) * m).view_as(advantages)


def advantages(episodes: Episodes, gamma: float = 0.99, lam: float = 1.0, normalize_advantages: bool = True) -> Tensor:
    """The advantages of MAML-RL [T, B, H]: GAE on the fitted linear baseline, normalised per task."""
    returns = discounted_returns(episodes.rewards, episodes.mask, gamma)
    values = linear_baseline(episodes, returns)
    adv = gae(episodes.rewards, values, episodes.mask, gamma, lam)
    return normalize(adv, episodes.mask) if normalize_advantages else adv
