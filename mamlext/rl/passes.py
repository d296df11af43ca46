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
reused by every product, as conjugate gradient calls them repeatedly at the same parameters. FusedPolicyPasses (below)
computes the same on the fused MLP kernels (CPU), and policy_gradient the gradient alone.

Layout, for speed on the CPU: every product is a batched GEMM over the tasks (MKL runs T GEMMs of K rows faster
than one tall GEMM of T * K rows), and each layer's input is kept with a column of ones, [h | 1], so
that the bias is part of the weight, [W | b]: the forward adds it and the backward sums dz over the rows inside the
GEMM instead of in passes of their own. R{h} is kept as [R{h} | 0] in buffers reused across products.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mamlext import _ext, ops
from mamlext.rl.policy import PolicySpec

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _per_task(W: Tensor, tasks: int) -> Tensor:
    """A matrix shared by the tasks [m, n] as a stride-0 batch [T, m, n] (no copy); per task as it is."""
    return W if W.dim() == 3 else W.expand(tasks, *W.shape)


def _with_bias(W: Tensor, b: Tensor) -> Tensor:
    """[W | b]: [out, in + 1], or [T, out, in + 1] when either is per task."""
    if W.dim() != b.dim() + 1:  # one shared, one per task
        T = max(W.shape[0] if W.dim() == 3 else 1, b.shape[0] if b.dim() == 2 else 1)
        W, b = _per_task(W, T), (b if b.dim() == 2 else b.expand(T, *b.shape))
    return torch.cat([W, b.unsqueeze(-1)], dim=-1)


def _times_t(h: Tensor, W: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """h [T, K, n] W^T for W [m, n] or [T, m, n]. MKL is slower on a transposed operand with few rows (n < m: the
    first layer's), so that one is copied (it is small)."""
    Wt = _per_task(W, h.shape[0]).transpose(1, 2)
    return torch.bmm(h, Wt.contiguous() if Wt.shape[1] < Wt.shape[2] else Wt, out=out)


def _times(dz: Tensor, W: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """dz [T, K, m] W for W [m, n] or [T, m, n]."""
    return torch.bmm(dz, _per_task(W, dz.shape[0]), out=out)


def _outer(dz: Tensor, h: Tensor) -> Tensor:
    """dz^T h per task [T, m, n]; as (h^T dz)^T when h is the narrower (the first layer's input), which MKL runs
    faster."""
    if h.shape[-1] < dz.shape[-1]:
        return torch.bmm(h.transpose(1, 2), dz).transpose(1, 2)
    return torch.bmm(dz.transpose(1, 2), h)


def _bias(b: Tensor) -> Tensor:
    """A vector [n] or per task [T, n], broadcastable against [T, K, n]."""
    return b if b.dim() == 1 else b.unsqueeze(1)


def _rows_sum(x: Tensor, reduce: bool) -> Tensor:
    return x.sum(dim=(0, 1)) if reduce else x.sum(dim=1)


def _split(aug: Tensor, reduce: bool) -> List[Tensor]:
    """[gW | gb] per task [T, out, in + 1] -> [gW, gb], per task or summed over the tasks."""
    if reduce:
        aug = aug.sum(0)
    return [aug[..., :-1], aug[..., -1]]


def check_params(spec: PolicySpec, params: Sequence[Tensor], tasks: int, like: Tensor, what: str = "params") -> None:
    """ValueError naming ``what`` unless it holds the policy's parameters (or tensors shaped like them), each shared
    (the parameter's shape) or per task ([T, *shape]), of ``like``'s dtype and device."""
    shapes = spec.shapes()
    if len(params) != len(shapes):
        raise ValueError(f"{what}: the {spec.distribution} policy with widths {list(spec.widths)} has {len(shapes)} "
                         f"parameter tensors, got {len(params)}")
    for i, (p, shape) in enumerate(zip(params, shapes)):
        if not isinstance(p, Tensor):
            raise TypeError(f"{what}[{i}]: expected a tensor, got {type(p).__name__}")
        if tuple(p.shape) not in (shape, (tasks, *shape)):
            raise ValueError(f"{what}[{i}]: expected shape {list(shape)} (shared by the tasks) or "
                             f"{[tasks, *shape]} (per task), got {list(p.shape)}")
        if p.dtype != like.dtype or p.device != like.device:
            raise ValueError(f"{what}[{i}]: expected {like.dtype} on {like.device} (the observations'), got "
                             f"{p.dtype} on {p.device}")


def check_samples(spec: PolicySpec, observations: Tensor, actions: Optional[Tensor] = None,
                  weights: Optional[Tensor] = None, what: str = "") -> None:
    """ValueError naming the argument unless observations are [T, K, obs_dim] floating point, actions [T, K,
    action_dim] of the same dtype (Gaussian) or int64 [T, K] (categorical), weights [T, K] of the same dtype, all on
    one device."""
    prefix = f"{what}." if what else ""
    if not isinstance(observations, Tensor) or observations.dim() != 3 or not observations.is_floating_point() \
            or observations.shape[-1] != spec.widths[0]:
        got = f"{list(observations.shape)} {observations.dtype}" if isinstance(observations, Tensor) \
            else type(observations).__name__
        raise ValueError(f"{prefix}observations: expected a floating-point tensor [tasks, samples, {spec.widths[0]}] "
                         f"(the policy's input width), got {got}")
    T, K = observations.shape[:2]
    if actions is not None:
        if spec.distribution == "gaussian":
            want, ok = f"[{T}, {K}, {spec.action_dim}] {observations.dtype}", actions.dtype == observations.dtype \
                and tuple(actions.shape) == (T, K, spec.action_dim)
        else:
            want, ok = f"int64 [{T}, {K}] (class indices)", actions.dtype == torch.int64 \
                and tuple(actions.shape) == (T, K)
        if not ok:
            raise ValueError(f"{prefix}actions: the {spec.distribution} policy with {spec.action_dim} actions "
                             f"expects {want}, got {list(actions.shape)} {actions.dtype}")
    if weights is not None and (weights.dtype != observations.dtype or tuple(weights.shape) != (T, K)):
        raise ValueError(f"{prefix}weights: expected [{T}, {K}] {observations.dtype} (one per sample), got "
                         f"{list(weights.shape)} {weights.dtype}")
    for name, tensor in (("actions", actions), ("weights", weights)):
        if tensor is not None and tensor.device != observations.device:
            raise ValueError(f"{prefix}{name}: expected on {observations.device} (the observations' device), got "
                             f"{tensor.device}")


def policy_gradient(spec: PolicySpec, params: Sequence[Tensor], observations: Tensor, actions: Tensor,
                    weights: Tensor) -> List[Tensor]:
    """dL_t/dparams per task [T, *shape] of L_t = -sum_k w_tk log pi(a_tk | x_tk) (PolicyPasses.loss_grad's loss) on
    the fused MLP op (mamlext.ops.mlp_loss_grad, loss "gaussian" or "ce": one pass per task over its samples, no
    [T, K, width] temporaries). The op averages over the K samples, so it is given the weights times K. For a gradient
    that no product at the same parameters follows (an adaptation, the line search's candidates): PolicyPasses keeps
    the passes that its products reuse."""
    check_samples(spec, observations, actions, weights)
    check_params(spec, params, observations.shape[0], observations)
    loss = "gaussian" if spec.distribution == "gaussian" else "ce"
    _, grads = ops.mlp_loss_grad(list(params), observations, actions, spec.activation, loss=loss,
                                 weights=weights * observations.shape[1])
    return grads


def _forward(spec: PolicySpec, params: Sequence[Tensor], observations: Tensor) -> Tensor:
    """The network's output [T, K, A]: a batched GEMM per layer with the bias as its addend and the activation in
    place, none of PolicyPasses' buffers for the products."""
    h = observations
    for l in range(spec.layers):
        Wt = _per_task(params[2 * l], h.shape[0]).transpose(1, 2)
        z = torch.baddbmm(_bias(params[2 * l + 1]), h, Wt.contiguous() if Wt.shape[1] < Wt.shape[2] else Wt)
        if l == spec.layers - 1:
            return z
        h = torch.relu_(z) if spec.activation == "relu" else torch.tanh_(z)


class PolicyOutputs:
    """A policy's action distributions at ``params`` on observations [T, K, D], from the network's output ``out``
    [T, K, A] (the Gaussian's mean or the logits): their log-likelihoods and KL divergences. ``policy_outputs``
    makes one from a forward pass alone; PolicyPasses adds the passes of the products."""

    def __init__(self, spec: PolicySpec, params: Sequence[Tensor], observations: Tensor, out: Tensor):
        self.spec, self.params, self.x = spec, list(params), observations
        self.tasks = observations.shape[0]
        self.out = out
        self._set_log_std()
        if spec.distribution != "gaussian":
            self.log_softmax = torch.log_softmax(out, dim=-1)
            self.probs = self.log_softmax.exp()

    def _set_log_std(self) -> None:
        """The Gaussian's log standard deviation [A] or [T, 1, A] and 1 / variance (nothing for categorical)."""
        if self.spec.distribution == "gaussian":
            s = self.params[-1]
            self.log_std = s if s.dim() == 1 else s.unsqueeze(1)
            self.inv_var = torch.exp(-2 * self.log_std)

    def log_prob(self, actions: Tensor) -> Tensor:
        """log pi(a | x) [T, K]."""
        check_samples(self.spec, self.x, actions)
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


def policy_outputs(spec: PolicySpec, params: Sequence[Tensor], observations: Tensor) -> PolicyOutputs:
    """The policy's distributions at ``params`` (shared [shape] or per task [T, *shape] each) on observations
    [T, K, D] from one forward pass: for acting and for the line search's candidates, which need no products."""
    check_samples(spec, observations)
    check_params(spec, params, observations.shape[0], observations)
    return PolicyOutputs(spec, params, observations, _forward(spec, params, observations))


class PolicyPasses(PolicyOutputs):
    """One policy's passes at ``params`` (shared [shape] or per task [T, *shape] each) on observations [T, K, D].
    Shapes, dtypes and devices are checked; values are not (mamlext.rl.trpo checks a meta-batch's once)."""

    def __init__(self, spec: PolicySpec, params: Sequence[Tensor], observations: Tensor):
        check_samples(spec, observations)
        check_params(spec, params, observations.shape[0], observations)
        self.spec, self.params = spec, list(params)
        self.x = observations
        self.tasks = T = observations.shape[0]
        K = observations.shape[1]
        L = spec.layers
        self.weights = [_with_bias(self.params[2 * l], self.params[2 * l + 1]) for l in range(L)]  # [W | b]
        ones = observations.new_ones(T, K, 1)
        self.inputs: List[Tensor] = [torch.cat([observations, ones], dim=-1)]  # [h_{l-1} | 1]
        self.fprime: List[Tensor] = []            # f'(z_l), l < L - 1
        self.fsecond: List[Optional[Tensor]] = []  # f''(z_l) (tanh; None for relu)
        self._r_inputs: List[Tensor] = []          # buffers [R{h_l} | 0], made by the first product
        self._work: Dict[str, Tensor] = {}         # the products' [T, K, width] temporaries, reused
        for l in range(L):
            z = _times_t(self.inputs[l], self.weights[l])
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
            layer_input = torch.cat([h, ones], dim=-1)
            self.inputs.append(layer_input)
        self._set_log_std()
        if spec.distribution != "gaussian":
            self.log_softmax = torch.log_softmax(self.out, dim=-1)
            self.probs = self.log_softmax.exp()
        self._dz: Optional[List[Tensor]] = None

    # ---------------------------------------------------------------------------------------------------------
    # the loss, its gradient, Hessian-vector and Fisher-vector products

    def loss_grad(self, actions: Tensor, weights: Tensor, reduce: bool = False) -> Tuple[Tensor, List[Tensor]]:
        """(L_t [T], dL_t/dparams): per task [T, *shape] each, or summed over the tasks (reduce)."""
        check_samples(self.spec, self.x, actions, weights)
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
        grads: List[Tensor] = []
        for l in range(self.spec.layers):
            grads += _split(_outer(self._dz[l], self.inputs[l]), reduce)
        return losses, grads + head_grad

    def _backward(self, dout: Tensor) -> List[Tensor]:
        """dz_l for every layer (dz_{L-1} = dout), first to last; also keeps dh_l for tanh's second derivative."""
        L = self.spec.layers
        dz = [dout]
        self._dh: List[Optional[Tensor]] = [None] * (L - 1)
        for l in range(L - 1, 0, -1):
            dh = _times(dz[0], self.params[2 * l])
            if self.fsecond[l - 1] is not None:
                self._dh[l - 1] = dh
                dz.insert(0, dh * self.fprime[l - 1])
            else:
                dz.insert(0, dh.mul_(self.fprime[l - 1]))
        return dz

    def _buffer(self, name: str, like: Tensor, width: int) -> Tensor:
        """A reused [T, K, width] work tensor: a fresh one per product would cost page faults at every call."""
        buffer = self._work.get(name)
        if buffer is None or buffer.shape[-1] != width:
            buffer = self._work[name] = like.new_empty(*like.shape[:-1], width)
        return buffer

    def _r_forward(self, vectors: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """R{z_l}, [R{h_l} | 0] (in reused buffers) and [V_l | Vb_l] along the direction ``vectors``."""
        L = self.spec.layers
        directions = [_with_bias(vectors[2 * l], vectors[2 * l + 1]) for l in range(L)]
        if not self._r_inputs:
            for layer_input in self.inputs[1:]:
                buffer = torch.empty_like(layer_input)
                buffer[..., -1] = 0
                self._r_inputs.append(buffer)
        rz: List[Tensor] = []
        for l in range(L):
            out = self._buffer(f"rz{l}", self.inputs[l], directions[l].shape[-2])
            z = _times_t(self.inputs[l], directions[l], out=out)
            if l > 0:  # + R{h_{l-1}} W^T (the zero column meets the bias)
                z.baddbmm_(self._r_inputs[l - 1], _per_task(self.weights[l], self.tasks).transpose(1, 2))
            rz.append(z)
            if l < L - 1:
                torch.mul(self.fprime[l], z, out=self._r_inputs[l][..., :-1])
        return rz, self._r_inputs, directions

    def hvp(self, vectors: Sequence[Tensor], reduce: bool = False) -> List[Tensor]:
        """H_t v_t of the loss of the last loss_grad call (its actions and weights), per task or summed (reduce)."""
        if self._dz is None:
            raise RuntimeError("PolicyPasses.hvp: call loss_grad first (the Hessian is that loss's)")
        check_params(self.spec, vectors, self.tasks, self.x, "vectors")
        L, w = self.spec.layers, self._w
        rz, r_inputs, directions = self._r_forward(vectors)
        if self.spec.distribution == "gaussian":
            vs = _bias(vectors[-1])
            e_iv = self._e * self.inv_var
            rdz = w * (self.inv_var * rz[-1] + 2 * e_iv * vs)
            head = [_rows_sum(2 * w * e_iv * (rz[-1] + self._e * vs), reduce)]
        else:
            r = rz[-1]
            rdz = w * self.probs * (r - (self.probs * r).sum(-1, keepdim=True))
            head = []
        out: List[Tensor] = []
        for l in range(L - 1, -1, -1):
            h_aug = _outer(rdz, self.inputs[l])
            if l > 0:
                h_aug.baddbmm_(self._dz[l].transpose(1, 2), r_inputs[l - 1])
            out[:0] = _split(h_aug, reduce)
            if l > 0:
                rdh = _times(rdz, self.params[2 * l], out=self._buffer(f"rdh{l}", rdz, self.params[2 * l].shape[-1]))
                rdh.baddbmm_(self._dz[l], _per_task(vectors[2 * l], self.tasks))
                rdz = rdh.mul_(self.fprime[l - 1])
                if self.fsecond[l - 1] is not None:
                    rdz.addcmul_(self.fsecond[l - 1] * self._dh[l - 1], rz[l - 1])
        return out + head

    def gauss_newton(self, vectors: Sequence[Tensor], weights: Tensor, reduce: bool = False) -> List[Tensor]:
        """sum_k c_k J^T F J v per task (the policy's Fisher with per-sample weights c = ``weights`` [T, K])."""
        check_params(self.spec, vectors, self.tasks, self.x, "vectors")
        check_samples(self.spec, self.x, weights=weights)
        L, c = self.spec.layers, weights.unsqueeze(-1)
        rz, _, _ = self._r_forward(vectors)
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
            out[:0] = _split(_outer(rdz, self.inputs[l]), reduce)
            if l > 0:
                rdh = self._buffer(f"rdh{l}", rdz, self.params[2 * l].shape[-1])
                rdz = _times(rdz, self.params[2 * l], out=rdh).mul_(self.fprime[l - 1])
        return out + head


def fused_products_available(observations: Tensor) -> bool:
    """Whether FusedPolicyPasses runs for these observations: the compiled extension's CPU kernels, float32/64."""
    return _ext._C is not None and isinstance(observations, Tensor) and observations.device.type == "cpu" and \
        observations.dtype in (torch.float32, torch.float64)


class FusedPolicyPasses(PolicyPasses):
    """PolicyPasses whose gradient, Hessian-vector and Fisher-vector products run on the fused MLP kernels (CPU):
    loss_grad keeps each task's forward and backward passes (z, h, dz, dh of every layer) and every product reads
    them and computes its R-passes only, one task at a time in cache, the element-wise work inside the passes instead
    of in passes of its own over [T, K, width] tensors. The same values as PolicyPasses' (to rounding). The network's
    output (log_prob, outputs, kl_from) is read from the kept passes, or computed by PolicyPasses before any
    loss_grad. ``buffers`` (optional): a dict whose entry ``key`` holds the passes, reused by the next
    FusedPolicyPasses given the same dict and key (a fresh [T, 4 K W] buffer costs page faults at every meta-update);
    the passes of an earlier one with that dict and key are then overwritten, so its owner must be done with it."""

    def __init__(self, spec: PolicySpec, params: Sequence[Tensor], observations: Tensor,
                 buffers: Optional[Dict[str, Tensor]] = None, key: str = "passes"):
        if not fused_products_available(observations):
            raise ValueError(f"FusedPolicyPasses: runs on the compiled extension's CPU kernels in float32 or float64, "
                             f"got {getattr(observations, 'dtype', None)} observations on "
                             f"{getattr(observations, 'device', None)}")
        check_samples(spec, observations)
        check_params(spec, params, observations.shape[0], observations)
        self.spec, self.params, self.x = spec, list(params), observations
        self.tasks = observations.shape[0]
        self._set_log_std()
        loss = "gaussian" if spec.distribution == "gaussian" else "ce"
        self._codes = ops.mlp_codes("FusedPolicyPasses", spec.activation, None, loss)
        # (actions, the op's weights, passes) that the products read, and whether they are loss_grad's (the loss
        # whose Hessian hvp multiplies) rather than made for a Fisher product alone
        self._kept: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        self._loss_kept = False
        self._out: Optional[Tensor] = None
        self._log_softmax: Optional[Tensor] = None
        self._buffers, self._key = ({} if buffers is None else buffers), key

    @property
    def out(self) -> Tensor:
        """The network's output [T, K, A]: the last layer's z in the kept passes (each task's z arrays come first,
        the last layer's [K, A] last among them), else a forward pass."""
        if self._out is None:
            if self._kept is None:
                self._out = PolicyPasses(self.spec, self.params, self.x).out
                return self._out
            K, A = self.x.shape[1], self.spec.action_dim
            z_width = sum(self.spec.widths[1:])  # the layers' output widths
            self._out = self._kept[2][:, K * (z_width - A):K * z_width].view(self.tasks, K, A)
        return self._out

    @property
    def log_softmax(self) -> Tensor:
        if self._log_softmax is None or self._out is None:
            self._log_softmax = torch.log_softmax(self.out, dim=-1)
        return self._log_softmax

    @property
    def probs(self) -> Tensor:
        return self.log_softmax.exp()

    def loss_grad(self, actions: Tensor, weights: Tensor, reduce: bool = False) -> Tuple[Tensor, List[Tensor]]:
        check_samples(self.spec, self.x, actions, weights)
        losses, grads = self._keep_passes(actions, weights)
        self._loss_kept = True
        return losses, [g.sum(0) for g in grads] if reduce else grads

    def _keep_passes(self, actions: Tensor, weights: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """The loss's passes into the buffer, kept for the products; returns the loss and its gradient per task."""
        op_weights = weights * self.x.shape[1]  # the op averages over the K samples
        passes = self._passes_buffer()
        losses, grads = torch.ops.mamlext._mlp_passes(self.params, self.x, actions, *self._codes, op_weights, passes)
        self._kept = (actions, op_weights, passes)
        self._loss_kept = False
        self._out = None
        return losses, grads

    def _passes_buffer(self) -> Tensor:
        """The [T, 4 K W] buffer for the passes (z, h, dz, dh of every layer, W the layers' output widths summed)."""
        T, K = self.x.shape[:2]
        shape = (T, 4 * K * sum(self.spec.widths[1:]))
        buffer = self._buffers.get(self._key)
        if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != self.x.dtype:
            buffer = self._buffers[self._key] = self.x.new_empty(shape)
        return buffer

    def _per_task_vectors(self, vectors: Sequence[Tensor]) -> List[Tensor]:
        check_params(self.spec, vectors, self.tasks, self.x, "vectors")
        return [v if tuple(v.shape) != shape else v.expand(self.tasks, *shape)
                for v, shape in zip(vectors, self.spec.shapes())]

    def _products(self, vectors: Sequence[Tensor], weights: Optional[Tensor], reduce: bool) -> List[Tensor]:
        actions, op_weights, passes = self._kept
        gauss_newton = weights is not None
        if gauss_newton:
            op_weights = weights * self.x.shape[1]
        out = torch.ops.mamlext._mlp_hvp_from_passes(self.params, self._per_task_vectors(vectors), self.x, actions,
                                                     passes, *self._codes, op_weights, gauss_newton)
        return [o.sum(0) for o in out] if reduce else out

    def hvp(self, vectors: Sequence[Tensor], reduce: bool = False) -> List[Tensor]:
        if not self._loss_kept:
            raise RuntimeError("PolicyPasses.hvp: call loss_grad first (the Hessian is that loss's)")
        return self._products(vectors, None, reduce)

    def gauss_newton(self, vectors: Sequence[Tensor], weights: Tensor, reduce: bool = False) -> List[Tensor]:
        check_samples(self.spec, self.x, weights=weights)
        if self._kept is None:  # the Fisher reads the forward passes only (z, h): any actions make them
            T, K = self.x.shape[:2]
            self._keep_passes(self.x.new_zeros(T, K, self.spec.action_dim) if self.spec.distribution == "gaussian"
                              else torch.zeros(T, K, dtype=torch.int64, device=self.x.device), weights)
        return self._products(vectors, weights, reduce)
