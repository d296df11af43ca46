// Host side of maml_reverse_step, shared by the CPU and CUDA launchers: argument checks (every message names the
// argument, since torch.ops.mamlext.maml_reverse_step can be called directly), contiguous inputs and the outputs.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/checks.h"
#include "common/reverse_math.h"

namespace mamlext {

struct ReverseStepPlan {
  std::vector<at::Tensor> v, hv, grads;  // contiguous inputs
  std::vector<at::Tensor> v_next, lr_grads;
  int64_t tasks = 0;
  bool sum_tasks = false;
  at::ScalarType dtype = at::kFloat;

  template <typename scalar_t>
  ReverseStepOperands<scalar_t> operands(size_t i) const {
    return {v[i].data_ptr<scalar_t>(),
            hv[i].data_ptr<scalar_t>(),
            grads.empty() ? nullptr : grads[i].data_ptr<scalar_t>(),
            v_next[i].data_ptr<scalar_t>(),
            lr_grads.empty() ? nullptr : lr_grads[i].data_ptr<scalar_t>(),
            tasks,
            v[i].numel() / (tasks > 0 ? tasks : 1),
            sum_tasks};
  }
  int64_t per_task_numel(size_t i) const { return v_next[i].numel() / (sum_tasks || tasks == 0 ? 1 : tasks); }
};

inline ReverseStepPlan plan_reverse_step(at::TensorList v, at::TensorList hv, at::TensorList grads, bool sum_tasks) {
  const char* op = "maml_reverse_step";
  TORCH_CHECK_VALUE(v.size() == hv.size(), op, ": v and hv must have the same length, got ", v.size(), " and ", hv.size());
  TORCH_CHECK_VALUE(grads.empty() || grads.size() == v.size(), op, ": grads must be empty (no lr gradients) or hold one ",
              "tensor per v (", v.size(), "), got ", grads.size());
  ReverseStepPlan plan;
  plan.sum_tasks = sum_tasks;
  if (v.empty()) return plan;
  TORCH_CHECK_VALUE(v[0].dim() >= 1, op, ": v[0] must be [T, *S_0] with a leading task dimension, got shape ", v[0].sizes());
  plan.tasks = v[0].size(0);
  plan.dtype = v[0].scalar_type();
  const auto device = v[0].device();
  TORCH_CHECK_VALUE(is_kernel_float(plan.dtype), op, ": v[0] must be a floating-point tensor (float64, float32, float16 or bfloat16), got ",
                    plan.dtype);
  for (size_t i = 0; i < v.size(); ++i) {
    auto check_like = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), " but v[0] is on ", device);
      TORCH_CHECK_VALUE(t.scalar_type() == plan.dtype, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                  " but v[0] has dtype ", plan.dtype);
      TORCH_CHECK_VALUE(t.sizes() == v[i].sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), " but v[", i,
                  "] has shape ", v[i].sizes());
    };
    check_like(v[i], "v");
    TORCH_CHECK_VALUE(v[i].dim() >= 1 && v[i].size(0) == plan.tasks, op, ": v[", i, "] must be [T, *S_", i, "] with T = ",
                plan.tasks, " (from v[0]), got shape ", v[i].sizes());
    check_like(hv[i], "hv");
    if (!grads.empty()) check_like(grads[i], "grads");
    plan.v.push_back(v[i].contiguous());
    plan.hv.push_back(hv[i].contiguous());
    if (!grads.empty()) plan.grads.push_back(grads[i].contiguous());
    const auto per_task_shape = v[i].sizes().slice(1);
    plan.v_next.push_back(at::empty(sum_tasks ? per_task_shape : v[i].sizes(), v[i].options()));
    if (!grads.empty()) plan.lr_grads.push_back(at::empty(per_task_shape, v[i].options()));
  }
  return plan;
}

}  // namespace mamlext
