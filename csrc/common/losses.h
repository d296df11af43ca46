// Losses of the fused MLP ops, their gradient and their Hessian-vector product w.r.t. the network output,
// shared by the CPU and CUDA kernels.
//
// The integer codes are the ops' `loss` argument (Python: mamlext/_mlp_codes.py LOSSES). One task's loss is over its
// K rows of outputs z [K, O] (row-major, contiguous):
//   mse: mean over all K * O elements of (z - y)^2, y [K, O]            (== F.mse_loss, reduction 'mean')
//   ce:  mean over the K rows of logsumexp(z_k) - z_k[y_k], y [K] int64  (== F.cross_entropy, reduction 'mean')
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

// One task's targets: values [K, O] for mse, class indices [K] in [0, O) for ce.
template <typename scalar_t>
struct LossTarget {
  const scalar_t* values = nullptr;
  const int64_t* classes = nullptr;
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
// The team splits mse by elements, ce by rows.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline scalar_t loss_forward_backward(const Team& team, Loss loss, int64_t K, int64_t O,
                                                      const scalar_t* __restrict__ z, LossTarget<scalar_t> y,
                                                      scalar_t* __restrict__ dz) {
  if (loss == Loss::kMse) {
    const int64_t n = K * O;
    const scalar_t inv_n = scalar_t(1) / static_cast<scalar_t>(n);
    scalar_t sum = 0;
    for (int64_t j = team.rank(); j < n; j += team.size()) {
      const scalar_t diff = z[j] - y.values[j];
      sum += diff * diff;
    }
    if (dz != nullptr) {
      const scalar_t scale = scalar_t(2) * inv_n;
      for (int64_t j = team.rank(); j < n; j += team.size()) dz[j] = scale * (z[j] - y.values[j]);
    }
    return team.sum(sum) * inv_n;
  }
  // Cross-entropy. dz holds each row's softmax, then (softmax - onehot) / K; a row's loss is lse - z[class].
  const scalar_t inv_k = scalar_t(1) / static_cast<scalar_t>(K);
  scalar_t sum = 0;
  for (int64_t k = team.rank(); k < K; k += team.size()) {
    const scalar_t* row = z + k * O;
    const int64_t cls = y.classes[k];
    if (dz != nullptr) {
      scalar_t* drow = dz + k * O;
      sum += softmax_row(O, row, drow) - row[cls];
      for (int64_t o = 0; o < O; ++o) drow[o] *= inv_k;
      drow[cls] -= inv_k;
    } else {
      scalar_t max = row[0];
      for (int64_t o = 1; o < O; ++o) max = row[o] > max ? row[o] : max;
      scalar_t exp_sum = 0;
      for (int64_t o = 0; o < O; ++o) exp_sum += std::exp(row[o] - max);
      sum += max + std::log(exp_sum) - row[cls];
    }
  }
  return team.sum(sum) * inv_k;
}

// The loss's Hessian w.r.t. z times rz: rdz = R{dL/dz} [K, O] for the direction R{z} = rz [K, O].
//   mse: (2 / (K O)) rz;   ce: row k: (p_k * (rz_k - <p_k, rz_k>)) / K, p_k = softmax(z_k).
// The team splits mse by elements, ce by rows (no sync: the caller separates passes).
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void loss_r_backward(const Team& team, Loss loss, int64_t K, int64_t O,
                                            const scalar_t* __restrict__ z, const scalar_t* __restrict__ rz,
                                            scalar_t* __restrict__ rdz) {
  if (loss == Loss::kMse) {
    const int64_t n = K * O;
    const scalar_t scale = scalar_t(2) / static_cast<scalar_t>(n);
    for (int64_t j = team.rank(); j < n; j += team.size()) rdz[j] = scale * rz[j];
    return;
  }
  const scalar_t inv_k = scalar_t(1) / static_cast<scalar_t>(K);
  for (int64_t k = team.rank(); k < K; k += team.size()) {
    const scalar_t* r = rz + k * O;
    scalar_t* p = rdz + k * O;
    softmax_row(O, z + k * O, p);
    scalar_t p_dot_r = 0;
    for (int64_t o = 0; o < O; ++o) p_dot_r += p[o] * r[o];
    for (int64_t o = 0; o < O; ++o) p[o] = inv_k * p[o] * (r[o] - p_dot_r);
  }
}

}  // namespace mamlext
