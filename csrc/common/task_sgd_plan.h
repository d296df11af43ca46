// Host-side preparation of a task_sgd call, shared by the CPU and CUDA launchers: validates the arguments,
// makes inputs contiguous, allocates the outputs and describes each tensor's operands for the kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/sgd_math.h"

namespace mamlext {

struct TaskSgdPlan {
  std::vector<at::Tensor> params, grads, lrs, outs;  // contiguous inputs; lrs empty for a float rate
  std::vector<LrKind> lr_kinds;
  at::ScalarType dtype = at::kFloat;
  int64_t tasks = 0;

  template <typename scalar_t>
  SgdOperands<scalar_t> operands(size_t i) const {
    SgdOperands<scalar_t> ops;
    ops.out = outs[i].data_ptr<scalar_t>();
    ops.param = params[i].data_ptr<scalar_t>();
    ops.grad = grads[i].data_ptr<scalar_t>();
    ops.lr = lrs.empty() ? nullptr : lrs[i].data_ptr<scalar_t>();
    ops.numel = grads[i].numel();
    ops.per_task = tasks == 0 ? 0 : ops.numel / tasks;
    ops.param_shared = params[i].dim() < grads[i].dim();
    ops.lr_kind = lrs.empty() ? LrKind::kScalar : lr_kinds[i];
    return ops;
  }
};

inline TaskSgdPlan plan_task_sgd(at::TensorList params, at::TensorList grads,
                                 std::optional<at::TensorList> lrs) {
  TaskSgdPlan plan;
  plan.tasks = check_task_sgd_tensors(params, grads);
  if (lrs) plan.lr_kinds = check_task_sgd_lr_tensors(*lrs, grads);
  if (grads.empty()) return plan;
  plan.dtype = grads[0].scalar_type();
  for (size_t i = 0; i < grads.size(); ++i) {
    plan.params.push_back(params[i].contiguous());
    plan.grads.push_back(grads[i].contiguous());
    if (lrs) plan.lrs.push_back((*lrs)[i].contiguous());
    plan.outs.push_back(at::empty(grads[i].sizes(), grads[i].options().memory_format(at::MemoryFormat::Contiguous)));
  }
  return plan;
}

}  // namespace mamlext
