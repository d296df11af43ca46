// One step of MAML's reverse recursion, per parameter element, shared by the CPU and CUDA kernels of
// maml_reverse_step. With v_t the meta-gradient carried back to theta_{k+1} of task t, hv_t = H_t(alpha ⊙ v_t) the
// support loss's Hessian-vector product at theta_k and g_t the support gradient at theta_k:
//   v_next_t = v_t - hv_t                      (the meta-gradient at theta_k; summed over tasks for the last step,
//                                               whose theta_0 all tasks share)
//   lr_grad  = - sum_t g_t ⊙ v_t               (d meta-loss / d alpha_k, since theta_{k+1} = theta_k - alpha_k ⊙ g_t)
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace mamlext {

template <typename scalar_t>
struct ReverseStepOperands {
  const scalar_t* v;      // [T, n]
  const scalar_t* hv;     // [T, n]
  const scalar_t* grad;   // [T, n], or nullptr: no lr_grad
  scalar_t* v_next;       // [T, n], or [n] when sum_tasks
  scalar_t* lr_grad;      // [n], or nullptr
  int64_t tasks;
  int64_t numel;          // n, elements per task
  bool sum_tasks;
};

// Element e (of the n per task) of every task: the whole recursion step for that element.
template <typename opmath_t, typename scalar_t>
C10_HOST_DEVICE inline void reverse_step_element(const ReverseStepOperands<scalar_t>& ops, int64_t e) {
  opmath_t v_sum = 0;
  opmath_t lr_grad = 0;
  for (int64_t t = 0; t < ops.tasks; ++t) {
    const int64_t i = t * ops.numel + e;
    const opmath_t v = static_cast<opmath_t>(ops.v[i]);
    const opmath_t v_next = v - static_cast<opmath_t>(ops.hv[i]);
    if (ops.sum_tasks) {
      v_sum += v_next;
    } else {
      ops.v_next[i] = static_cast<scalar_t>(v_next);
    }
    if (ops.grad != nullptr) lr_grad -= static_cast<opmath_t>(ops.grad[i]) * v;
  }
  if (ops.sum_tasks) ops.v_next[e] = static_cast<scalar_t>(v_sum);
  if (ops.lr_grad != nullptr) ops.lr_grad[e] = static_cast<scalar_t>(lr_grad);
}

}  // namespace mamlext
