// Argument validation for the ops, shared by the CPU and CUDA launchers (host code only).
// Every message names the argument and its index, since torch.ops.mamlext.* can be called directly.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "common/sgd_math.h"

namespace mamlext {

// The floating-point dtypes the kernels compute in. Listed, not at::isFloatingType: that also admits the float8
// and float4 types, which the kernels' dispatch would refuse with a NotImplementedError instead of this message.
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Checks params/grads of task_sgd and returns T, the number of tasks (0 when the lists are empty).
inline int64_t check_task_sgd_tensors(at::TensorList params, at::TensorList grads) {
  TORCH_CHECK_VALUE(params.size() == grads.size(), "task_sgd: params and grads must have the same length, got ",
              params.size(), " and ", grads.size());
  if (grads.empty()) return 0;
  TORCH_CHECK_VALUE(grads[0].dim() >= 1, "task_sgd: grads[0] must be [T, *S_0] with a leading task dimension, got shape ",
              grads[0].sizes());
  const int64_t tasks = grads[0].size(0);
  const auto device = grads[0].device();
  const auto dtype = grads[0].scalar_type();
  TORCH_CHECK_VALUE(is_kernel_float(dtype), "task_sgd: grads[0] must be float64, float32, float16 or bfloat16, got ",
                    dtype);
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    const auto& p = params[i];
    TORCH_CHECK_VALUE(g.device() == device, "task_sgd: grads[", i, "] is on ", g.device(), " but grads[0] is on ", device);
    TORCH_CHECK_VALUE(p.device() == device, "task_sgd: params[", i, "] is on ", p.device(), " but grads[0] is on ", device);
    TORCH_CHECK_VALUE(g.scalar_type() == dtype, "task_sgd: grads[", i, "] has dtype ", g.scalar_type(),
                " but grads[0] has dtype ", dtype);
    TORCH_CHECK_VALUE(p.scalar_type() == dtype, "task_sgd: params[", i, "] has dtype ", p.scalar_type(),
                " but grads[0] has dtype ", dtype);
    TORCH_CHECK_VALUE(g.dim() >= 1, "task_sgd: grads[", i, "] must be [T, *S_", i, "], got shape ", g.sizes());
    TORCH_CHECK_VALUE(g.size(0) == tasks, "task_sgd: grads[", i, "] has ", g.size(0), " tasks (leading dimension) but grads[0] has ",
                tasks);
    const bool per_task = p.sizes() == g.sizes();
    const bool shared = p.sizes() == g.sizes().slice(1);
    TORCH_CHECK_VALUE(per_task || shared, "task_sgd: params[", i, "] has shape ", p.sizes(), " but grads[", i, "] has shape ",
                g.sizes(), "; params[", i, "] must be shared (", g.sizes().slice(1), ") or per task (", g.sizes(), ")");
  }
  return tasks;
}

inline void check_task_sgd_lr(double lr) {
  TORCH_CHECK_VALUE(std::isfinite(lr), "task_sgd: lr must be finite, got ", lr);
}

// lr[i] is a scalar (one rate for the parameter) or has the parameter's per-task shape S_i (one rate per element).
inline LrKind check_task_sgd_lr_tensor(const at::Tensor& lr, const at::Tensor& grad, size_t i) {
  TORCH_CHECK_VALUE(lr.device() == grad.device(), "task_sgd: lr[", i, "] is on ", lr.device(), " but grads[", i, "] is on ",
              grad.device());
  TORCH_CHECK_VALUE(lr.scalar_type() == grad.scalar_type(), "task_sgd: lr[", i, "] has dtype ", lr.scalar_type(),
              " but grads[", i, "] has dtype ", grad.scalar_type());
  if (lr.dim() == 0) return LrKind::kPerTensor;
  TORCH_CHECK_VALUE(lr.sizes() == grad.sizes().slice(1), "task_sgd: lr[", i, "] must be a scalar or have shape ",
              grad.sizes().slice(1), " (the parameter's shape), got ", lr.sizes());
  return LrKind::kPerElement;
}

inline std::vector<LrKind> check_task_sgd_lr_tensors(at::TensorList lrs, at::TensorList grads) {
  TORCH_CHECK_VALUE(lrs.size() == grads.size(), "task_sgd: lr must hold one tensor per parameter (", grads.size(),
              "), got ", lrs.size());
  std::vector<LrKind> kinds;
  kinds.reserve(lrs.size());
  for (size_t i = 0; i < lrs.size(); ++i) kinds.push_back(check_task_sgd_lr_tensor(lrs[i], grads[i], i));
  return kinds;
}

// sgd_update: one list of parameters and one of their gradients, pairwise of one shape, dtype and device.
inline void check_sgd_update(at::TensorList params, at::TensorList grads, double lr) {
  TORCH_CHECK_VALUE(params.size() == grads.size(), "sgd_update: params and grads must have the same length, got ",
              params.size(), " and ", grads.size());
  TORCH_CHECK_VALUE(std::isfinite(lr), "sgd_update: lr must be finite, got ", lr);
  for (size_t i = 0; i < params.size(); ++i) {
    const auto &p = params[i], &g = grads[i];
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), "sgd_update: grads[", i, "] must have params[", i, "]'s shape ", p.sizes(),
                ", got ", g.sizes());
    TORCH_CHECK_VALUE(g.scalar_type() == p.scalar_type() && g.device() == p.device(), "sgd_update: grads[", i, "] is ",
                g.scalar_type(), " on ", g.device(), " but params[", i, "] is ", p.scalar_type(), " on ", p.device());
    TORCH_CHECK_VALUE(is_kernel_float(p.scalar_type()), "sgd_update: params[", i,
                      "] must be a floating-point tensor (float64, float32, float16 or bfloat16), got ", p.scalar_type());
  }
}

}  // namespace mamlext
