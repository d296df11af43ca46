// CUDA kernel of task_sgd: one multi-tensor launch for all parameters, 16-byte vector access where aligned,
// arithmetic in at::opmath_type (float for half/bfloat16).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "common/task_sgd_plan.h"
#include "cuda/multi_tensor_apply.cuh"

namespace mamlext {
namespace {

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) VecOf {
  scalar_t v[kVec];
};

template <typename scalar_t>
constexpr int vec_width() {
  return 16 / sizeof(scalar_t);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    task_sgd_kernel(TensorTable<SgdOperands<scalar_t>> table, at::opmath_type<scalar_t> float_lr) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  using Vec = VecOf<scalar_t, kVec>;
  const int slot = table.block_tensor[blockIdx.x];
  const SgdOperands<scalar_t>& ops = table.tensors[slot];
  const int64_t begin = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunkElements;
  const int64_t end = ::min(begin + kChunkElements, ops.numel);
  const opmath_t uniform_lr = ops.lr_kind == LrKind::kScalar     ? float_lr
                              : ops.lr_kind == LrKind::kPerTensor ? static_cast<opmath_t>(ops.lr[0])
                                                                  : opmath_t(0);
  auto lr_at = [&](int64_t e) {
    return ops.lr_kind == LrKind::kPerElement ? static_cast<opmath_t>(ops.lr[ops.lr_index(e)]) : uniform_lr;
  };

  int64_t scalar_begin = begin;
  if (table.vectorized[slot]) {
    // begin is a multiple of kVec and, when rows matter, so is the row length: a vector never crosses a row.
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t e = begin + static_cast<int64_t>(threadIdx.x) * kVec; e < vec_end;
         e += static_cast<int64_t>(blockDim.x) * kVec) {
      const Vec grad = *reinterpret_cast<const Vec*>(ops.grad + e);
      const Vec param = *reinterpret_cast<const Vec*>(ops.param + ops.param_index(e));
      Vec lr_vec;
      if (ops.lr_kind == LrKind::kPerElement) lr_vec = *reinterpret_cast<const Vec*>(ops.lr + ops.lr_index(e));
      Vec out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const opmath_t lr = ops.lr_kind == LrKind::kPerElement ? static_cast<opmath_t>(lr_vec.v[j]) : uniform_lr;
        out.v[j] = static_cast<scalar_t>(sgd_update<opmath_t>(param.v[j], grad.v[j], lr));
      }
      *reinterpret_cast<Vec*>(ops.out + e) = out;
    }
    scalar_begin = vec_end;
  }
  for (int64_t e = scalar_begin + threadIdx.x; e < end; e += blockDim.x) {
    ops.out[e] = static_cast<scalar_t>(
        sgd_update<opmath_t>(ops.param[ops.param_index(e)], ops.grad[e], lr_at(e)));
  }
}

template <typename scalar_t>
bool is_vec_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (sizeof(scalar_t) * vec_width<scalar_t>()) == 0;
}

template <typename scalar_t>
bool can_vectorize(const SgdOperands<scalar_t>& ops) {
  const bool rows_matter = ops.param_shared || ops.lr_kind == LrKind::kPerElement;
  return is_vec_aligned<scalar_t>(ops.out) && is_vec_aligned<scalar_t>(ops.grad) &&
         is_vec_aligned<scalar_t>(ops.param) && (ops.lr_kind != LrKind::kPerElement || is_vec_aligned<scalar_t>(ops.lr)) &&
         (!rows_matter || ops.per_task % vec_width<scalar_t>() == 0);
}

void run(const TaskSgdPlan& plan, double float_lr) {
  if (plan.outs.empty()) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "task_sgd_cuda", [&] {
    using Operands = SgdOperands<scalar_t>;
    const auto lr = static_cast<at::opmath_type<scalar_t>>(float_lr);
    multi_tensor_apply<Operands>(
        plan.outs.size(), [&](size_t i) { return plan.operands<scalar_t>(i); },
        [&](size_t i) { return plan.outs[i].numel(); },
        [&](size_t i) { return can_vectorize(plan.operands<scalar_t>(i)); },
        [&](const TensorTable<Operands>& table, int blocks) {
          task_sgd_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(table, lr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
}

std::vector<at::Tensor> task_sgd_cuda(at::TensorList params, at::TensorList grads, double lr) {
  check_task_sgd_lr(lr);
  const c10::OptionalDeviceGuard guard(grads.empty() ? std::nullopt : std::optional(grads[0].device()));
  TaskSgdPlan plan = plan_task_sgd(params, grads, std::nullopt);
  run(plan, lr);
  return plan.outs;
}

// Learnable rates are not checked for finiteness here: that would cost a host sync on every inner step.
std::vector<at::Tensor> task_sgd_tensor_lr_cuda(at::TensorList params, at::TensorList grads, at::TensorList lr) {
  const c10::OptionalDeviceGuard guard(grads.empty() ? std::nullopt : std::optional(grads[0].device()));
  TaskSgdPlan plan = plan_task_sgd(params, grads, lr);
  run(plan, 0.0);
  return plan.outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CUDA, m) {
  m.impl("task_sgd", &task_sgd_cuda);
  m.impl("task_sgd.tensor_lr", &task_sgd_tensor_lr_cuda);
}

}  // namespace mamlext
