// One task of mlp_maml on raw pointers: the inner loop and the reverse recursion over the MLP passes of
// common/mlp_passes.h, shared by the CPU per-task kernel (cpu/mlp.cpp) and the CUDA block kernel (cuda/mlp_block.cu)
// so that both run the same arithmetic. layerwise/mlp_layerwise.cpp spells the same recursion over whole [T, ...] tensors.
//
// Like the passes, the functions that take a team (common/team.h) return synced.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "common/losses.h"
#include "common/mlp_passes.h"
#include "common/sgd_math.h"
#include "common/small_gemm.h"

namespace mamlext {

// The inner-loop learning rates of mlp_maml, per parameter: lr[p] is [N] (one rate per step) or [N, numel_p].
template <typename scalar_t>
struct MamlLrs {
  const scalar_t* lr[kMlpMaxParams] = {};
  bool per_element[kMlpMaxParams] = {};
};

// One task's MAML workspace in one buffer of mlp_maml_scratch_numel elements. The arrays' places are computed on
// each access from the sizes (a view of a few values: see MlpParams).
template <typename scalar_t>
struct MamlScratch {
  const MlpDims* dims = nullptr;
  scalar_t* base = nullptr;
  int64_t steps = 0, support_rows = 0, query_rows = 0;
  bool first_order = false;

  C10_HOST_DEVICE int64_t P() const { return dims->total_param_numel(); }
  C10_HOST_DEVICE int64_t step_numel() const { return mlp_activations_numel(*dims, support_rows, false); }
  // [N, P]: theta_1 .. theta_N (theta_0 is the shared meta-parameters).
  C10_HOST_DEVICE scalar_t* thetas() const { return base; }
  // [N, P]: g_0 .. g_{N-1}, the support gradients.
  C10_HOST_DEVICE scalar_t* grads() const { return base + steps * P(); }
  C10_HOST_DEVICE scalar_t* direction() const { return base + 2 * steps * P(); }  // [P]: alpha_k * v_{k+1}
  C10_HOST_DEVICE scalar_t* hv() const { return direction() + P(); }             // [P]: H_support(theta_k) direction
  C10_HOST_DEVICE scalar_t* query_grad() const { return direction() + 2 * P(); }  // [P]
  // [N + 2, Pt] (Pt = mlp_transposed_numel): the transposed weights of theta_0 .. theta_N and of direction.
  // theta_0's are written once per scratch by prepare_maml_scratch, for every task that uses it.
  C10_HOST_DEVICE scalar_t* transposed() const { return direction() + 3 * P(); }
  // The support passes' z, h, dz, dh: second order, [N] sets, one per inner step, that the reverse recursion's HVP
  // at theta_k reads instead of recomputing them; first order, one set.
  C10_HOST_DEVICE scalar_t* support_steps() const { return transposed() + (steps + 2) * mlp_transposed_numel(*dims); }
  // The R-passes' arrays (second order only).
  C10_HOST_DEVICE scalar_t* support_r() const {
    return first_order ? nullptr : support_steps() + steps * step_numel();
  }
  C10_HOST_DEVICE MlpActivations<scalar_t> query() const {
    scalar_t* after_steps = support_steps() + (first_order ? 1 : steps) * step_numel();
    scalar_t* q = first_order ? after_steps
                              : after_steps + mlp_activations_numel(*dims, support_rows, true) - step_numel();
    return carve_activations(*dims, query_rows, false, q);
  }
};

C10_HOST_DEVICE inline int64_t mlp_maml_scratch_numel(const MlpDims& d, int64_t steps, int64_t support_rows,
                                                      int64_t query_rows, bool first_order) {
  const int64_t support = first_order ? mlp_activations_numel(d, support_rows, false)
                                      : steps * mlp_activations_numel(d, support_rows, false) +
                                            mlp_activations_numel(d, support_rows, true) -
                                            mlp_activations_numel(d, support_rows, false);
  return (2 * steps + 3) * d.total_param_numel() + (steps + 2) * mlp_transposed_numel(d) + support +
         mlp_activations_numel(d, query_rows, false);
}

// The support activations of inner step k (of the only set, first order).
template <typename scalar_t>
C10_HOST_DEVICE inline MlpActivations<scalar_t> support_activations(const MlpDims& d, const MamlScratch<scalar_t>& s,
                                                                    int64_t k) {
  const int64_t step = s.first_order ? 0 : k;
  return carve_activations_at(d, s.support_rows, s.support_steps() + step * s.step_numel(), s.support_r());
}

template <typename scalar_t>
C10_HOST_DEVICE inline MamlScratch<scalar_t> carve_maml_scratch(const MlpDims& d, int64_t steps, int64_t support_rows,
                                                                int64_t query_rows, bool first_order, scalar_t* base) {
  MamlScratch<scalar_t> s;
  s.dims = &d;
  s.base = base;
  s.steps = steps;
  s.support_rows = support_rows;
  s.query_rows = query_rows;
  s.first_order = first_order;
  return s;
}

// Writes theta_0's forward weights into s, once for all the tasks that use s.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void prepare_maml_scratch(const Team& team, const MlpDims& d,
                                                 const MlpParams<const scalar_t*>& theta0, MamlScratch<scalar_t>& s) {
  transpose_weights(team, d, theta0, s.transposed());
}

// One task of mlp_maml; returns its weighted query loss sum_k w_k L_query(theta_k).
//   Inner loop: theta_{k+1} = theta_k - alpha_k * g_k, g_k = grad L_support(theta_k), k = 0 .. N-1.
//   Reverse:    v_N = w_N grad L_query(theta_N); for k = N-1 .. 0:
//                 lr_grad_k = -v_{k+1} * g_k (summed over the tensor for a per-tensor rate),
//                 v_k = v_{k+1} - H_support(theta_k) (alpha_k * v_{k+1}) (first order: v_k = v_{k+1}),
//                 v_k += w_k grad L_query(theta_k) for k >= 1;
//               meta_grad = v_0.
// Query passes of steps with weight exactly 0 are skipped. meta_grad (the running v) and lr_grad ([N] or
// [N, numel_p] per parameter) are this task's outputs. Every member of the team returns the query loss.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline scalar_t mlp_maml_task(const Team& team, const MlpConfig& c, int64_t steps,
                                              const scalar_t* step_weights, bool first_order, int64_t support_rows,
                                              const scalar_t* xs, LossTarget<scalar_t> ys, int64_t query_rows, const scalar_t* xq,
                                              LossTarget<scalar_t> yq, const MlpParams<const scalar_t*>& theta0,
                                              const MamlLrs<scalar_t>& lrs, MamlScratch<scalar_t>& s,
                                              const MlpParams<scalar_t*>& meta_grad,
                                              const MlpParams<scalar_t*>& lr_grad) {
  const MlpDims& d = c.dims;
  const int num_params = d.num_params();
  const int64_t P = d.total_param_numel(), Pt = mlp_transposed_numel(d);
  auto theta = [&](int64_t k) {
    return k == 0 ? theta0 : as_const(carve_params(d, s.thetas() + (k - 1) * P));
  };
  // theta_k's forward weights; the transposed copies of theta_1 .. theta_N are written as the inner loop makes them.
  auto theta_t = [&](int64_t k) {
    return forward_weights(d, static_cast<const scalar_t*>(s.transposed() + k * Pt));
  };
  auto grad = [&](int64_t k) { return carve_params(d, s.grads() + k * P); };
  const MlpParams<scalar_t*> direction = carve_params(d, s.direction());
  const MlpParams<scalar_t*> hv = carve_params(d, s.hv());
  const MlpParams<scalar_t*> query_grad = carve_params(d, s.query_grad());
  const MlpParams<scalar_t*>& v = meta_grad;

  // Inner loop. Second order keeps each step's support activations for the HVP at its theta_k.
  for (int64_t k = 0; k < steps; ++k) {
    const MlpParams<const scalar_t*> theta_k = theta(k);
    const MlpParams<scalar_t*> g = grad(k);
    MlpActivations<scalar_t> support = support_activations(d, s, k);
    mlp_loss_and_grad(team, c, support_rows, xs, ys, theta_k, theta_t(k), support, &g);
    const MlpParams<scalar_t*> next = carve_params(d, s.thetas() + k * P);
    for (int i = 0; i < num_params; ++i) {
      const int64_t n = d.param_numel(i);
      scalar_t* __restrict__ out = next.ptr(i);
      const scalar_t* __restrict__ theta_i = theta_k.ptr(i);
      const scalar_t* __restrict__ g_i = g.ptr(i);
      if (lrs.per_element[i]) {
        const scalar_t* lr = lrs.lr[i] + k * n;
        for (int64_t e = team.rank(); e < n; e += team.size()) out[e] = sgd_update<scalar_t>(theta_i[e], g_i[e], lr[e]);
      } else {
        const scalar_t lr = lrs.lr[i][k];
        for (int64_t e = team.rank(); e < n; e += team.size()) out[e] = sgd_update<scalar_t>(theta_i[e], g_i[e], lr);
      }
    }
    team.sync();
    transpose_weights(team, d, as_const(next), s.transposed() + (k + 1) * Pt);
  }

  // v += w grad L_query(theta_k); returns w L_query(theta_k).
  auto add_query_term = [&](int64_t k, scalar_t w) {
    const scalar_t loss =
        mlp_loss_and_grad(team, c, query_rows, xq, yq, theta(k), theta_t(k), s.query(), &query_grad);
    for (int i = 0; i < num_params; ++i) axpy(team, d.param_numel(i), w, query_grad.ptr(i), v.ptr(i));
    team.sync();
    return w * loss;
  };

  for (int i = 0; i < num_params; ++i) fill(team, d.param_numel(i), scalar_t(0), v.ptr(i));
  team.sync();
  scalar_t query_loss = 0;
  if (step_weights[steps - 1] != scalar_t(0)) query_loss += add_query_term(steps, step_weights[steps - 1]);

  for (int64_t k = steps - 1; k >= 0; --k) {
    const MlpParams<scalar_t*> g = grad(k);
    for (int i = 0; i < num_params; ++i) {
      const int64_t n = d.param_numel(i);
      const scalar_t* __restrict__ v_i = v.ptr(i);
      const scalar_t* __restrict__ g_i = g.ptr(i);
      if (lrs.per_element[i]) {
        scalar_t* __restrict__ out = lr_grad.ptr(i) + k * n;
        for (int64_t e = team.rank(); e < n; e += team.size()) out[e] = -(v_i[e] * g_i[e]);
      } else {
        const scalar_t v_dot_g = dot(team, n, v_i, g_i);
        if (team.rank() == 0) lr_grad.ptr(i)[k] = -v_dot_g;
      }
    }
    if (!first_order) {
      const MlpParams<const scalar_t*> theta_k = theta(k);
      for (int i = 0; i < num_params; ++i) {
        const int64_t n = d.param_numel(i);
        scalar_t* __restrict__ out = direction.ptr(i);
        const scalar_t* __restrict__ v_i = v.ptr(i);
        if (lrs.per_element[i]) {
          const scalar_t* lr = lrs.lr[i] + k * n;
          for (int64_t e = team.rank(); e < n; e += team.size()) out[e] = lr[e] * v_i[e];
        } else {
          const scalar_t lr = lrs.lr[i][k];
          for (int64_t e = team.rank(); e < n; e += team.size()) out[e] = lr * v_i[e];
        }
      }
      team.sync();
      const MlpForwardWeights<scalar_t> direction_t =
          transpose_weights(team, d, as_const(direction), s.transposed() + (steps + 1) * Pt);
      MlpActivations<scalar_t> support = support_activations(d, s, k);
      mlp_hessian_vector(team, c, support_rows, xs, ys, theta_k, theta_t(k), as_const(direction),
                         direction_t, support, hv);
      for (int i = 0; i < num_params; ++i) axpy(team, d.param_numel(i), scalar_t(-1), hv.ptr(i), v.ptr(i));
      team.sync();
    }
    if (k >= 1 && step_weights[k - 1] != scalar_t(0)) query_loss += add_query_term(k, step_weights[k - 1]);
  }
  team.sync();  // the last lr_grad reads the scratch that the team's next task writes
  return query_loss;
}

}  // namespace mamlext
