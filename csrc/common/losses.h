// Losses of the fused MLP ops, their gradient and their Hessian-vector product w.r.t. the network output,
// shared by the CPU and CUDA kernels.
//
// The integer codes are the ops' `loss` argument (Python: mamlext/_mlp_codes.py LOSSES). One task's loss is over its
// K rows of outputs z [K, O] (row-major, contiguous):
//   mse: mean over all K * O elements of (z - y)^2, y [K, O]            (== F.mse_loss, reduction 'mean')
//   ce:  mean over the K rows of logsumexp(z_k) - z_k[y_k], y [K] int64  (== F.cross_entropy, reduction 'mean')
//   gaussian: mean over the K rows of -log N(y_k; z_k, diag(exp(2 s))), y [K, O] (actions), s [O] the loss's own
//        parameter (a diagonal Gaussian policy's state-independent log standard deviation; the op's params end
//        with it): row k's term is sum_j (e_kj^2 iv_j / 2 + s_j) + O log(2 pi) / 2, e = y - z, iv = exp(-2 s).
// With per-row weights w [K] each row's term is multiplied by w_k before the same mean (the divisor stays K * O or
// K): (F.mse_loss(z, y, reduction='none') * w[:, None]).mean() and (F.cross_entropy(z, y, reduction='none') *
// w).mean(). With ce or gaussian and w the advantages, that is the policy-gradient surrogate
// -mean_k w_k log pi(y_k | x_k) of a categorical or Gaussian policy; w_k = 0 leaves out a padding row.
// With K == 0 the loss is NaN (0 / 0), as torch's, and the gradients are empty.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "common/team.h"

namespace mamlext {

enum class Loss : int64_t {
  kMse = 0,
  kCrossEntropy = 1,
  kGaussian = 2,
};
constexpr int64_t kNumLosses = 3;

// Whether the loss has a parameter of its own (gaussian: log_std [O]), which follows the layers' in params.
C10_HOST_DEVICE inline bool loss_has_param(Loss loss) { return loss == Loss::kGaussian; }

// One task's loss parameter (gaussian's log_std [O]; all null for the other losses): its value, in an R-pass the
// direction's part for it, and where its derivative goes (the gradient, or its part of H v).
template <typename scalar_t>
struct LossParam {
  const scalar_t* value = nullptr;
  const scalar_t* direction = nullptr;
  scalar_t* out = nullptr;
};

// The loss parameters of T tasks (all null for a loss without one): value [O] shared by the tasks (value_stride 0) or
// [T, O] (value_stride O); direction and out [T, O].
template <typename scalar_t>
struct TaskLossParams {
  const scalar_t* value = nullptr;
  int64_t value_stride = 0;
  const scalar_t* direction = nullptr;
  scalar_t* out = nullptr;
  int64_t stride = 0;  // of direction and out

  C10_HOST_DEVICE LossParam<scalar_t> at(int64_t t) const {
    LossParam<scalar_t> p;
    if (value != nullptr) p.value = value + t * value_stride;
    if (direction != nullptr) p.direction = direction + t * stride;
    if (out != nullptr) p.out = out + t * stride;
    return p;
  }
};

constexpr double kHalfLog2Pi = 0.91893853320467274178;  // log(2 pi) / 2

// One task's targets: values [K, O] for mse, class indices [K] in [0, O) for ce; the rows' weights [K], or null
// (every weight 1).
template <typename scalar_t>
struct LossTarget {
  const scalar_t* values = nullptr;
  const int64_t* classes = nullptr;
  const scalar_t* weights = nullptr;

  // The targets of rows k0, k0 + 1, ... (O outputs per row).
  C10_HOST_DEVICE LossTarget<scalar_t> rows_from(int64_t k0, int64_t O) const {
    LossTarget<scalar_t> target;
    if (values != nullptr) target.values = values + k0 * O;
    if (classes != nullptr) target.classes = classes + k0;
    if (weights != nullptr) target.weights = weights + k0;
    return target;
  }
};

// The targets of T tasks, contiguous: values [T, K, O] (mse) or classes [T, K] (ce), and the rows' weights [T, K]
// or null.
template <typename scalar_t>
struct TaskTargets {
  const scalar_t* values = nullptr;
  const int64_t* classes = nullptr;
  const scalar_t* weights = nullptr;
  int64_t stride = 0;  // target elements per task
  int64_t rows = 0;    // K

  C10_HOST_DEVICE LossTarget<scalar_t> at(int64_t t) const {
    LossTarget<scalar_t> target;
    if (values != nullptr) target.values = values + t * stride;
    if (classes != nullptr) target.classes = classes + t * stride;
    if (weights != nullptr) target.weights = weights + t * rows;
    return target;
  }
};

// Softmax of the row z[0, O) into p, by the row's max for stability; returns the row's logsumexp.
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t softmax_row(int64_t O, const scalar_t* __restrict__ z, scalar_t* __restrict__ p) {
  scalar_t max = z[0];
  for (int64_t o = 1; o < O; ++o) max = z[o] > max ? z[o] : max;
  scalar_t sum = 0;
  for (int64_t o = 0; o < O; ++o) {
    p[o] = std::exp(z[o] - max);
    sum += p[o];
  }
  const scalar_t inv_sum = scalar_t(1) / sum;
  for (int64_t o = 0; o < O; ++o) p[o] *= inv_sum;
  return max + std::log(sum);
}

// The Gaussian's loss (returned to every member), dz = dL/dz when dz is not null and, when param.out is not null,
// dL/ds into it. Per output j (iv_j once), the team splits the rows:
//   L = (sum_k w_k (sum_j s_j + O log(2 pi) / 2) + sum_j iv_j S_j / 2) / K,  S_j = sum_k w_k e_kj^2,
//   dL/ds_j = (sum_k w_k - iv_j S_j) / K  (each a team sum; no rows: 0, as torch's).
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline scalar_t gaussian_forward_backward(const Team& team, int64_t K, int64_t O,
                                                          const scalar_t* __restrict__ z, LossTarget<scalar_t> y,
                                                          LossParam<scalar_t> param, scalar_t* __restrict__ dz) {
  const scalar_t* __restrict__ w = y.weights;
  const scalar_t* __restrict__ s = param.value;
  const scalar_t inv_k = scalar_t(1) / static_cast<scalar_t>(K);
  scalar_t weight_sum = 0;
  for (int64_t k = team.rank(); k < K; k += team.size()) weight_sum += w == nullptr ? scalar_t(1) : w[k];
  scalar_t row_constant = static_cast<scalar_t>(O) * static_cast<scalar_t>(kHalfLog2Pi);
  for (int64_t j = 0; j < O; ++j) row_constant += s[j];
  scalar_t sum = weight_sum * row_constant;
  const scalar_t all_weights = param.out != nullptr ? team.sum(weight_sum) : scalar_t(0);
  for (int64_t j = 0; j < O; ++j) {
    const scalar_t iv = std::exp(scalar_t(-2) * s[j]);
    scalar_t squares = 0;
    for (int64_t k = team.rank(); k < K; k += team.size()) {
      const scalar_t w_k = w == nullptr ? scalar_t(1) : w[k];
      const scalar_t e = y.values[k * O + j] - z[k * O + j];
      squares += w_k * e * e;
      if (dz != nullptr) dz[k * O + j] = -(w_k * inv_k) * e * iv;
    }
    sum += scalar_t(0.5) * iv * squares;
    if (param.out != nullptr) {
      const scalar_t all_squares = team.sum(squares);
      if (team.rank() == 0) param.out[j] = K == 0 ? scalar_t(0) : (all_weights - iv * all_squares) * inv_k;
    }
  }
  return team.sum(sum) * inv_k;
}

// The loss of z [K, O] against y (returned to every member of the team) and, when dz is not null, dz = dL/dz [K, O]
// and the gradient of the loss's parameter (gaussian) into param.out.
// The team splits mse by elements (by rows when weighted), ce and gaussian by rows.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline scalar_t loss_forward_backward(const Team& team, Loss loss, int64_t K, int64_t O,
                                                      const scalar_t* __restrict__ z, LossTarget<scalar_t> y,
                                                      scalar_t* __restrict__ dz,
                                                      LossParam<scalar_t> param = LossParam<scalar_t>()) {
  if (loss == Loss::kGaussian) {
    if (dz == nullptr) param.out = nullptr;
    return gaussian_forward_backward(team, K, O, z, y, param, dz);
  }
  const scalar_t* __restrict__ w = y.weights;
  if (loss == Loss::kMse) {
    const int64_t n = K * O;
    const scalar_t inv_n = scalar_t(1) / static_cast<scalar_t>(n);
    const scalar_t scale = scalar_t(2) * inv_n;
    scalar_t sum = 0;
    if (w == nullptr) {
      for (int64_t j = team.rank(); j < n; j += team.size()) {
        const scalar_t diff = z[j] - y.values[j];
        sum += diff * diff;
      }
      if (dz != nullptr) {
        for (int64_t j = team.rank(); j < n; j += team.size()) dz[j] = scale * (z[j] - y.values[j]);
      }
      return team.sum(sum) * inv_n;
    }
    for (int64_t k = team.rank(); k < K; k += team.size()) {
      scalar_t row_sum = 0;
      for (int64_t o = k * O; o < (k + 1) * O; ++o) {
        const scalar_t diff = z[o] - y.values[o];
        row_sum += diff * diff;
        if (dz != nullptr) dz[o] = scale * w[k] * diff;
      }
      sum += w[k] * row_sum;
    }
    return team.sum(sum) * inv_n;
  }
  // Cross-entropy. dz holds each row's softmax, then w_k (softmax - onehot) / K; a row's loss is lse - z[class].
  const scalar_t inv_k = scalar_t(1) / static_cast<scalar_t>(K);
  scalar_t sum = 0;
  for (int64_t k = team.rank(); k < K; k += team.size()) {
    const scalar_t* row = z + k * O;
    const int64_t cls = y.classes[k];
    const scalar_t w_k = w == nullptr ? scalar_t(1) : w[k];
    if (dz != nullptr) {
      scalar_t* drow = dz + k * O;
      sum += w_k * (softmax_row(O, row, drow) - row[cls]);
      const scalar_t scale = w_k * inv_k;
      for (int64_t o = 0; o < O; ++o) drow[o] *= scale;
      drow[cls] -= scale;
    } else {
      scalar_t max = row[0];
      for (int64_t o = 1; o < O; ++o) max = row[o] > max ? row[o] : max;
      scalar_t exp_sum = 0;
      for (int64_t o = 0; o < O; ++o) exp_sum += std::exp(row[o] - max);
      sum += w_k * (max + std::log(exp_sum) - row[cls]);
    }
  }
  return team.sum(sum) * inv_k;
}

// loss_r_backward of the gaussian loss (below): per output j (iv_j once), rdz's column and the team sum for s_j.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void gaussian_r_backward(const Team& team, int64_t K, int64_t O, const scalar_t* __restrict__ z,
                                                LossTarget<scalar_t> y, const scalar_t* __restrict__ rz,
                                                scalar_t* __restrict__ rdz, LossParam<scalar_t> param, bool fisher,
                                                int64_t mean_rows, bool accumulate_param) {
  const scalar_t* __restrict__ w = y.weights;
  const scalar_t* __restrict__ s = param.value;
  const scalar_t* __restrict__ vs = param.direction;
  const scalar_t inv_k = scalar_t(1) / static_cast<scalar_t>(mean_rows);
  for (int64_t j = 0; j < O; ++j) {
    const scalar_t iv = std::exp(scalar_t(-2) * s[j]);
    scalar_t partial = 0;  // sum_k w_k (fisher: 1; else e iv (rz + e v_s))
    for (int64_t k = team.rank(); k < K; k += team.size()) {
      const scalar_t w_k = w == nullptr ? scalar_t(1) : w[k];
      const int64_t o = k * O + j;
      if (fisher) {
        rdz[o] = w_k * inv_k * iv * rz[o];
        partial += w_k;
      } else {
        const scalar_t e = y.values[o] - z[o];
        rdz[o] = w_k * inv_k * iv * (rz[o] + scalar_t(2) * e * vs[j]);
        partial += w_k * e * iv * (rz[o] + e * vs[j]);
      }
    }
    const scalar_t total = team.sum(partial);
    if (team.rank() == 0) {
      const scalar_t part = mean_rows == 0 ? scalar_t(0) : scalar_t(2) * (fisher ? total * vs[j] : total) * inv_k;
      param.out[j] = accumulate_param ? param.out[j] + part : part;
    }
  }
}

// The loss's Hessian w.r.t. z times rz: rdz = R{dL/dz} [K, O] for the direction R{z} = rz [K, O], with y's rows'
// weights w [K] (null: all 1).
//   mse: (2 w_k / (K O)) rz;   ce: row k: w_k (p_k * (rz_k - <p_k, rz_k>)) / K, p_k = softmax(z_k);
//   gaussian, with the direction's part v_s for s (param.direction): w_k iv (rz_k + 2 e_k v_s) / K, and the
//     R-derivative of dL/ds into param.out: mean_k w_k (2 e_k iv rz_k + 2 e_k^2 iv v_s)   (e = y - z, iv = exp(-2 s)).
// fisher (the Gauss-Newton product of these likelihood losses): the Hessian's expectation over the labels in its
// place. For mse and ce that is the Hessian itself; for gaussian e is 0 and e^2 iv is 1 in expectation:
//   rdz = w_k iv rz_k / K and mean_k 2 w_k v_s.
// The team splits mse by elements (by rows when weighted), ce and gaussian by rows (no sync: the caller separates
// passes; gaussian's sums for s are team sums).
// The means are over mean_rows rows (negative: K): a tile of K of a task's rows passes the task's row count, and
// with accumulate_param adds its part for the loss's parameter to param.out.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void loss_r_backward(const Team& team, Loss loss, int64_t K, int64_t O,
                                            const scalar_t* __restrict__ z, LossTarget<scalar_t> y,
                                            const scalar_t* __restrict__ rz, scalar_t* __restrict__ rdz,
                                            LossParam<scalar_t> param = LossParam<scalar_t>(), bool fisher = false,
                                            int64_t mean_rows = -1, bool accumulate_param = false) {
  if (mean_rows < 0) mean_rows = K;
  if (loss == Loss::kGaussian) {
    gaussian_r_backward(team, K, O, z, y, rz, rdz, param, fisher, mean_rows, accumulate_param);
    return;
  }
  const scalar_t* __restrict__ w = y.weights;
  if (loss == Loss::kMse) {
    const int64_t n = K * O;
    const scalar_t scale = scalar_t(2) / static_cast<scalar_t>(mean_rows * O);
    if (w == nullptr) {
      for (int64_t j = team.rank(); j < n; j += team.size()) rdz[j] = scale * rz[j];
      return;
    }
    for (int64_t k = team.rank(); k < K; k += team.size()) {
      for (int64_t o = k * O; o < (k + 1) * O; ++o) rdz[o] = scale * w[k] * rz[o];
    }
    return;
  }
  const scalar_t inv_k = scalar_t(1) / static_cast<scalar_t>(mean_rows);
  for (int64_t k = team.rank(); k < K; k += team.size()) {
    const scalar_t* r = rz + k * O;
    scalar_t* p = rdz + k * O;
    softmax_row(O, z + k * O, p);
    scalar_t p_dot_r = 0;
    for (int64_t o = 0; o < O; ++o) p_dot_r += p[o] * r[o];
    const scalar_t scale = w == nullptr ? inv_k : w[k] * inv_k;
    for (int64_t o = 0; o < O; ++o) p[o] = scale * p[o] * (r[o] - p_dot_r);
  }
}

}  // namespace mamlext
