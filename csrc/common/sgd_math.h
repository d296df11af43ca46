// The task-batched SGD update, shared by the CPU and CUDA kernels so that CPU tests exercise the GPU's arithmetic.
//
// One parameter tensor is updated for T tasks at once. Its output is laid out [T, S] (S = elements per task) and
// element e = t * S + s reads:
//   param  p[s] when the parameter is shared by all tasks, p[e] when it is already per task;
//   lr     a Python float, or lr[0] (one rate per parameter), or lr[s] (one rate per element, Meta-SGD).
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace mamlext {

// p - lr * g, evaluated in the op-math type (float for half/bfloat16).
template <typename opmath_t>
C10_HOST_DEVICE inline opmath_t sgd_update(opmath_t param, opmath_t grad, opmath_t lr) {
  return param - lr * grad;
}

enum class LrKind : int8_t { kScalar = 0, kPerTensor = 1, kPerElement = 2 };

// Where one tensor's operands live, for the update of its flat output element e in [0, T * S).
template <typename scalar_t>
struct SgdOperands {
  scalar_t* out;
  const scalar_t* param;
  const scalar_t* grad;
  const scalar_t* lr;   // null for a Python float rate
  int64_t per_task;     // S: elements per task
  int64_t numel;        // T * S
  bool param_shared;    // param is [S] instead of [T, S]
  LrKind lr_kind;

  C10_HOST_DEVICE inline int64_t param_index(int64_t e) const { return param_shared ? e % per_task : e; }
  C10_HOST_DEVICE inline int64_t lr_index(int64_t e) const {
    return lr_kind == LrKind::kPerElement ? e % per_task : 0;
  }
};

}  // namespace mamlext
