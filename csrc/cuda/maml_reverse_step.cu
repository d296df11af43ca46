// CUDA kernel of maml_reverse_step: one multi-tensor launch for all parameters; each thread runs
// reverse_step_element (csrc/common/reverse_math.h) for its elements over every task.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/reverse_step_plan.h"
#include "cuda/multi_tensor_apply.cuh"

namespace mamlext {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    reverse_step_kernel(TensorTable<ReverseStepOperands<scalar_t>> table) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ReverseStepOperands<scalar_t>& ops = table.tensors[table.block_tensor[blockIdx.x]];
  const int64_t begin = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunkElements;
  const int64_t end = ::min(begin + kChunkElements, ops.numel);
  for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) reverse_step_element<opmath_t>(ops, e);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> maml_reverse_step_cuda(
    at::TensorList v, at::TensorList hv, at::TensorList grads, bool sum_tasks) {
  const c10::OptionalDeviceGuard guard(v.empty() ? std::nullopt : std::optional(v[0].device()));
  ReverseStepPlan plan = plan_reverse_step(v, hv, grads, sum_tasks);
  if (plan.tasks == 0) {  // no task: the sums are empty
    for (auto& t : plan.v_next) t.zero_();
    for (auto& t : plan.lr_grads) t.zero_();
    return {plan.v_next, plan.lr_grads};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "maml_reverse_step_cuda", [&] {
    using Operands = ReverseStepOperands<scalar_t>;
    // Chunks cut the per-task elements; each element's thread walks the T tasks.
    multi_tensor_apply<Operands>(
        plan.v.size(), [&](size_t i) { return plan.operands<scalar_t>(i); },
        [&](size_t i) { return plan.per_task_numel(i); }, [](size_t) { return false; },
        [&](const TensorTable<Operands>& table, int blocks) {
          reverse_step_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(table);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
  return {plan.v_next, plan.lr_grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CUDA, m) { m.impl("maml_reverse_step", &maml_reverse_step_cuda); }

}  // namespace mamlext
