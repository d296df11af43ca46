"""The task-batched passes of an MLP policy (mamlext.rl.policy) that MAML-TRPO needs, written out so that each
product costs a few GEMMs over all tasks at once and nothing is differentiated twice by autograd:

  loss_grad:     L_t = -sum_k w_tk log pi(a_tk | x_tk) per task t (the weights carry any averaging, 0 pads) and
                 its gradient;
  hvp:           H_t v_t, the Hessian of L_t times a direction (Pearlmutter's R-operator, exact, second-order
                 terms of the activations included);
  gauss_newton:  G_t v_t = J_t^T (sum_k c_tk F_k) J_t v_t, the policy's Fisher (the Hessian of the KL divergence
                 between two equal policies) through the network's Jacobian J_t, per-sample weights c;
  log_prob, kl:  of actions / to an earlier policy's outputs.

Layer l maps h_{l-1} (h_{-1} = x) to z_l = h_{l-1} W_l^T + b_l, h_l = f(z_l); the last layer's z is the Gaussian's
mean mu or the categorical's logits. The Gaussian's log standard deviation s is a parameter of its own.
Per sample, with e = a - mu and iv = exp(-2 s):
  Gaussian:     -log pi = sum_j (e_j^2 iv_j / 2 + s_j + log(2 pi) / 2); dL/dmu = -w e iv; dL/ds = w (1 - e^2 iv);
                Hessian: mu-mu w iv, mu-s 2 w e iv, s-s 2 w e^2 iv; Fisher: mu-mu iv, s-s 2, mu-s 0.
  Categorical:  -log pi = lse(z) - z_a; dL/dz = w (p - onehot(a)); Hessian (and Fisher with c) w (diag(p) - p p^T).
The forward activations and the backward pass at the parameters are computed once (construction, loss_grad) and
reused by every product, as conjugate gradient calls them repeatedly at the same parameters.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mamlext.rl.policy import PolicySpec

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _rows(x: Tensor) -> Tensor:
    """[T, K, n] as [T * K, n]: a view of the passes' own (contiguous) tensors, which the in-place GEMMs write."""
    return x.reshape(-1, x.shape[-1])


def _affine(h: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """h [T, K, in] W^T + b for W [out, in] / b [out] (shared by the tasks: one GEMM over all rows) or per task
    [T, out, in] / [T, out]; the bias enters the GEMM as its accumulator."""
    if W.dim() == 2 and b.dim() == 1:
        return torch.addmm(b, _rows(h), W.t()).view(*h.shape[:-1], W.shape[0])
    if W.dim() == 3:
        return torch.baddbmm(b.unsqueeze(1) if b.dim() == 2 else b, h, W.transpose(1, 2))
    return (_rows(h) @ W.t()).view(*h.shape[:-1], W.shape[0]) + b.unsqueeze(1)


def _add_mm_t(out: Tensor, h: Tensor, W: Tensor) -> Tensor:
    """out += h W^T in place (the GEMM accumulates), W shared or per task."""
    if W.dim() == 2:
        _rows(out).addmm_(_rows(h), W.t())
    else:
        out.baddbmm_(h, W.transpose(1, 2))
    return out


def _mm(dz: Tensor, W: Tensor) -> Tensor:
    """dz [T, K, out] times W [out, in] or [T, out, in]."""
    if W.dim() == 2:
        return (_rows(dz) @ W).view(*dz.shape[:-1], W.shape[1])
    return torch.bmm(dz, W)


def _add_mm(out: Tensor, dz: Tensor, W: Tensor) -> Tensor:
    """out += dz W in place."""
    if W.dim() == 2:
        _rows(out).addmm_(_rows(dz), W)
    else:
        out.baddbmm_(dz, W)
    return out


def _bias(b: Tensor) -> Tensor:
    """A bias [out] or per task [T, out], broadcastable against [T, K, out]."""
    return b if b.dim() == 1 else b.unsqueeze(1)


def _outer(dz: Tensor, h: Tensor, reduce: bool) -> Tensor:
    """dz^T h per task [T, out, in], or summed over the tasks [out, in] (one GEMM over all rows)."""
    if reduce:
        return _rows(dz).t() @ _rows(h)
    return torch.bmm(dz.transpose(1, 2), h)


def _add_outer(out: Tensor, dz: Tensor, h: Tensor, reduce: bool) -> Tensor:
    """out += dz^T h in place (per task, or summed over the tasks)."""
    if reduce:
        out.addmm_(_rows(dz).t(), _rows(h))
    else:
        out.baddbmm_(dz.transpose(1, 2), h)
    return out


def _rows_sum(x: Tensor, reduce: bool) -> Tensor:
    return x.sum(dim=(0, 1)) if reduce else x.sum(dim=1)


class PolicyPasses:
    """One policy's passes at ``params`` (shared [shape] or per task [T, *shape] each) on observations [T, K, D]."""

    def __init__(self, spec: PolicySpec, params: Sequence[Tensor], observations: Tensor):
        self.spec, self.params, self.x = spec, list(params), observations
        self.tasks = observations.shape[0]
        L = spec.layers
        self.hs: List[Tensor] = [observations]   # inputs of the layers: h_{l-1}
        self.fprime: List[Tensor] = []            # f'(z_l), l < L - 1
        self.fsecond: List[Optional[Tensor]] = []  # f''(z_l) (tanh; None for relu)
        h = observations
        for l in range(L):
            z = _affine(h, self.params[2 * l], self.params[2 * l + 1])
            if l == L - 1:
                self.out = z
                break
            if spec.activation == "relu":
                h = torch.relu(z)
                self.fprime.append((z > 0).to(z.dtype))
                self.fsecond.append(None)
            else:
                h = torch.tanh(z)
                d = 1 - h * h
                self.fprime.append(d)
                self.fsecond.append(-2 * h * d)
            self.hs.append(h)
        if spec.distribution == "gaussian":
            s = self.params[-1]
            self.log_std = s if s.dim() == 1 else s.unsqueeze(1)      # [A] or [T, 1, A]
            self.inv_var = torch.exp(-2 * self.log_std)
        else:
            self.log_softmax = torch.log_softmax(self.out, dim=-1)
            self.probs = self.log_softmax.exp()
        self._dz: Optional[List[Tensor]] = None

    # ---------------------------------------------------------------------------------------------------------
    # log-likelihoods and divergences

    def log_prob(self, actions: Tensor) -> Tensor:
        """log pi(a | x) [T, K]."""
        if self.spec.distribution == "gaussian":
            e = actions - self.out
            return -(0.5 * e * e * self.inv_var + self.log_std + _HALF_LOG_2PI).sum(-1)
        return self.log_softmax.gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def outputs(self) -> Tuple[Tensor, Tensor]:
        """What kl() compares with: (mean, log std [T, 1 or K, A]) or (log-probabilities, empty)."""
        if self.spec.distribution == "gaussian":
            return self.out, self.log_std.expand(self.tasks, 1, self.spec.action_dim) if self.log_std.dim() == 1 \
                else self.log_std
        return self.log_softmax, self.log_softmax.new_empty(0)

    def kl_from(self, old: Tuple[Tensor, Tensor]) -> Tensor:
        """KL(old || this policy) per sample [T, K]."""
        if self.spec.distribution == "gaussian":
            mu_old, s_old = old
            diff = mu_old - self.out
            return (self.log_std - s_old + (torch.exp(2 * s_old) + diff * diff) * 0.5 * self.inv_var - 0.5).sum(-1)
        log_p_old = old[0]
        return (log_p_old.exp() * (log_p_old - self.log_softmax)).sum(-1)

    # ---------------------------------------------------------------------------------------------------------
    # the loss, its gradient, Hessian-vector and Fisher-vector products

    def loss_grad(self, actions: Tensor, weights: Tensor, reduce: bool = False) -> Tuple[Tensor, List[Tensor]]:
        """(L_t [T], dL_t/dparams): per task [T, *shape] each, or summed over the tasks (reduce)."""
        w = weights.unsqueeze(-1)
        self._w = w
        if self.spec.distribution == "gaussian":
            e = actions - self.out
            self._e = e
            e2iv = e * e * self.inv_var
            nll = (0.5 * e2iv + self.log_std + _HALF_LOG_2PI).sum(-1)
            dout = -w * e * self.inv_var
            head_grad = [_rows_sum(w * (1 - e2iv), reduce)]
        else:
            nll = -self.log_softmax.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
            dout = w * (self.probs - torch.nn.functional.one_hot(actions, self.spec.action_dim).to(w.dtype))
            head_grad = []
        losses = (weights * nll).sum(1)
        self._dz = self._backward(dout)
        grads = self._param_grads(self._dz, reduce)
        return losses, grads + head_grad

    def _backward(self, dout: Tensor) -> List[Tensor]:
        """dz_l for every layer (dz_{L-1} = dout), first to last; also keeps dh_l for tanh's second derivative."""
        L = self.spec.layers
        dz = [dout]
        self._dh: List[Optional[Tensor]] = [None] * (L - 1)
        for l in range(L - 1, 0, -1):
            dh = _mm(dz[0], self.params[2 * l])
            if self.fsecond[l - 1] is not None:
                self._dh[l - 1] = dh
            dz.insert(0, self.fprime[l - 1] * dh)
        return dz

    def _param_grads(self, dz: Sequence[Tensor], reduce: bool) -> List[Tensor]:
        grads = []
        for l in range(self.spec.layers):
            gW = _outer(dz[l], self.hs[l], reduce)
            grads += [gW, _rows_sum(dz[l], reduce)]
        return grads

    def _r_forward(self, vectors: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """R{z_l} and R{h_l} along the direction ``vectors`` (shared or per task)."""
        rz, rh = [], []
        r_in: Optional[Tensor] = None
        for l in range(self.spec.layers):
            z = _affine(self.hs[l], vectors[2 * l], vectors[2 * l + 1])
            if r_in is not None:
                _add_mm_t(z, r_in, self.params[2 * l])
            rz.append(z)
            if l < self.spec.layers - 1:
                r_in = self.fprime[l] * z
                rh.append(r_in)
        return rz, rh

    def hvp(self, vectors: Sequence[Tensor], reduce: bool = False) -> List[Tensor]:
        """H_t v_t of the loss of the last loss_grad call (its actions and weights), per task or summed (reduce)."""
        if self._dz is None:
            raise RuntimeError("PolicyPasses.hvp: call loss_grad first (the Hessian is that loss's)")
        L, w = self.spec.layers, self._w
        rz, rh = self._r_forward(vectors)
        if self.spec.distribution == "gaussian":
            vs = _bias(vectors[-1])
            e_iv = self._e * self.inv_var
            rdout = w * (self.inv_var * rz[-1] + 2 * e_iv * vs)
            head = [_rows_sum(2 * w * e_iv * (rz[-1] + self._e * vs), reduce)]
        else:
            r = rz[-1]
            rdout = w * self.probs * (r - (self.probs * r).sum(-1, keepdim=True))
            head = []
        out: List[Tensor] = []
        rdz = rdout
        for l in range(L - 1, -1, -1):
            hW = _outer(rdz, self.hs[l], reduce)
            if l > 0:
                _add_outer(hW, self._dz[l], rh[l - 1], reduce)
            out[:0] = [hW, _rows_sum(rdz, reduce)]
            if l > 0:
                rdh = _add_mm(_mm(rdz, self.params[2 * l]), self._dz[l], vectors[2 * l])
                rdz = rdh.mul_(self.fprime[l - 1])
                if self.fsecond[l - 1] is not None:
                    rdz.addcmul_(self.fsecond[l - 1] * self._dh[l - 1], rz[l - 1])
        return out + head

    def gauss_newton(self, vectors: Sequence[Tensor], weights: Tensor, reduce: bool = False) -> List[Tensor]:
        """sum_k c_k J^T F J v per task (the policy's Fisher with per-sample weights c = ``weights`` [T, K])."""
        L, c = self.spec.layers, weights.unsqueeze(-1)
        rz, _ = self._r_forward(vectors)
        if self.spec.distribution == "gaussian":
            rdz = c * self.inv_var * rz[-1]
            vs = vectors[-1] if vectors[-1].dim() == 2 else vectors[-1].expand(self.tasks, -1)
            head = 2 * vs * weights.sum(1, keepdim=True)
            head = [head.sum(0) if reduce else head]
        else:
            r = rz[-1]
            rdz = c * self.probs * (r - (self.probs * r).sum(-1, keepdim=True))
            head = []
        out: List[Tensor] = []
        for l in range(L - 1, -1, -1):
            out[:0] = [_outer(rdz, self.hs[l], reduce), _rows_sum(rdz, reduce)]
            if l > 0:
                rdz = _mm(rdz, self.params[2 * l]).mul_(self.fprime[l - 1])
        return out + head
