// Losses of the fused MLP ops, their gradient and their Hessian-vector product w.r.t. the network output,
// shared by the CPU and CUDA kernels.
//
// The integer codes are the ops' `loss` argument (Python: mamlext/_mlp_codes.py LOSSES). One task's loss is over its
// K rows of outputs z [K, O] (row-major, contiguous):
//   mse: mean over all K * O elements of (z - y)^2, y [K, O]            (== F.mse_loss, reduction 'mean')
//   ce:  mean over the K rows of logsumexp(z_k) - z_k[y_k], y [K] int64  (== F.cross_entropy, reduction 'mean')
// With per-row weights w [K] each row's term is multiplied by w_k before the same mean (the divisor stays K * O or
// K): (F.mse_loss(z, y, reduction='none') * w[:, None]).mean() and (F.cross_entropy(z, y, reduction='none') *
// w).mean(). With ce and w the advantages, that is the policy-gradient surrogate -mean_k w_k log pi(y_k | x_k) of a
// categorical policy; w_k = 0 leaves out a padding row.
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
};
constexpr int64_t kNumLosses = 2;

// One task's targets: values [K, O] for mse, class indices [K] in [0, O) for ce; the rows' weights [K], or null
// (every weight 1).
template <typename scalar_t>
struct LossTarget {
  const scalar_t* values = nullptr;
  const int64_t* classes = nullptr;
  const scalar_t* weights = nullptr;
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

// The loss of z [K, O] against y (returned to every member of the team) and, when dz is not null, dz = dL/dz [K, O].
// The team splits mse by elements (by rows when weighted), ce by rows.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline scalar_t loss_forward_backward(const Team& team, Loss loss, int64_t K, int64_t O,
                                                      const scalar_t* __restrict__ z, LossTarget<scalar_t> y,
                                                      scalar_t* __restrict__ dz) {
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

// The loss's Hessian w.r.t. z times rz: rdz = R{dL/dz} [K, O] for the direction R{z} = rz [K, O], with the rows'
// weights w [K] (null: all 1).
//   mse: (2 w_k / (K O)) rz;   ce: row k: w_k (p_k * (rz_k - <p_k, rz_k>)) / K, p_k = softmax(z_k).
// The team splits mse by elements (by rows when weighted), ce by rows (no sync: the caller separates passes).
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void loss_r_backward(const Team& team, Loss loss, int64_t K, int64_t O,
                                            const scalar_t* __restrict__ z, const scalar_t* __restrict__ w,
                                            const scalar_t* __restrict__ rz, scalar_t* __restrict__ rdz) {
  if (loss == Loss::kMse) {
    const int64_t n = K * O;
    const scalar_t scale = scalar_t(2) / static_cast<scalar_t>(n);
    if (w == nullptr) {
      for (int64_t j = team.rank(); j < n; j += team.size()) rdz[j] = scale * rz[j];
      return;
    }
    for (int64_t k = team.rank(); k < K; k += team.size()) {
      for (int64_t o = k * O; o < (k + 1) * O; ++o) rdz[o] = scale * w[k] * rz[o];
    }
    return;
  }
  const scalar_t inv_k = scalar_t(1) / static_cast<scalar_t>(K);
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
