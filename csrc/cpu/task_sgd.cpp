// CPU kernel of task_sgd: the work of all tensors is cut into chunks that one at::parallel_for shares out,
// so a call over many small tensors costs one parallel region, not one per tensor.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/task_sgd_plan.h"

namespace mamlext {
namespace {

constexpr int64_t kChunkElements = 1 << 14;
constexpr int64_t kSerialBelowElements = 1 << 15;

struct Chunk {
  size_t tensor;
  int64_t begin, end;  // flat output elements [begin, end)
};

// One contiguous row: out[j] = param[j] - lr * grad[j] with one rate, or with lr[j].
template <typename scalar_t, typename opmath_t>
inline void update_row(int64_t n, const scalar_t* __restrict__ param, const scalar_t* __restrict__ grad, opmath_t lr,
                       scalar_t* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] = sgd_update<opmath_t>(param[j], grad[j], lr);
}

template <typename scalar_t, typename opmath_t>
inline void update_row(int64_t n, const scalar_t* __restrict__ param, const scalar_t* __restrict__ grad,
                       const scalar_t* __restrict__ lr, scalar_t* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] = sgd_update<opmath_t>(param[j], grad[j], lr[j]);
}

// float and double rows are also compiled for AVX2 and AVX-512 and picked when the library loads, as ATen does for
// its own kernels: the build targets the baseline ISA, which would leave the op slower than torch's own add.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MAMLEXT_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MAMLEXT_ISA_CLONES
#endif

#define MAMLEXT_ROW_CLONES(T, LR)                                                                                     \
  MAMLEXT_ISA_CLONES void update_row_isa(int64_t n, const T* param, const T* grad, LR lr, T* out) {                 \
    update_row<T, T>(n, param, grad, lr, out);                                                                        \
  }
MAMLEXT_ROW_CLONES(float, float)
MAMLEXT_ROW_CLONES(float, const float*)
MAMLEXT_ROW_CLONES(double, double)
MAMLEXT_ROW_CLONES(double, const double*)
#undef MAMLEXT_ROW_CLONES

template <typename scalar_t, typename LR>
inline void dispatch_row(int64_t n, const scalar_t* param, const scalar_t* grad, LR lr, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    update_row_isa(n, param, grad, lr, out);
  } else {
    update_row<scalar_t, at::opmath_type<scalar_t>>(n, param, grad, lr, out);
  }
}

// Updates elements [begin, end) in runs over contiguous memory: one task row at a time where the param or the rate
// repeats per task, else in one run.
template <typename scalar_t>
void update_range(const SgdOperands<scalar_t>& ops, int64_t begin, int64_t end, at::opmath_type<scalar_t> float_lr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const bool by_row = ops.param_shared || ops.lr_kind == LrKind::kPerElement;
  for (int64_t e = begin; e < end;) {
    const int64_t row_end = by_row ? std::min(end, e - e % ops.per_task + ops.per_task) : end;
    const int64_t n = row_end - e;
    const scalar_t* param = ops.param + ops.param_index(e);
    if (ops.lr_kind == LrKind::kPerElement) {
      dispatch_row(n, param, ops.grad + e, ops.lr + ops.lr_index(e), ops.out + e);
    } else {
      const opmath_t lr = ops.lr_kind == LrKind::kScalar ? float_lr : static_cast<opmath_t>(ops.lr[0]);
      dispatch_row(n, param, ops.grad + e, lr, ops.out + e);
    }
    e = row_end;
  }
}

void run(const TaskSgdPlan& plan, double float_lr) {
  int64_t total = 0;
  for (const auto& out : plan.outs) total += out.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "task_sgd_cpu", [&] {
    const auto lr = static_cast<at::opmath_type<scalar_t>>(float_lr);
    if (total < kSerialBelowElements) {  // not worth waking the thread pool, nor cutting chunks
      for (size_t i = 0; i < plan.outs.size(); ++i) update_range(plan.operands<scalar_t>(i), 0, plan.outs[i].numel(), lr);
      return;
    }
    std::vector<SgdOperands<scalar_t>> operands;
    std::vector<Chunk> chunks;
    for (size_t i = 0; i < plan.outs.size(); ++i) {
      operands.push_back(plan.operands<scalar_t>(i));
      const int64_t numel = plan.outs[i].numel();
      for (int64_t begin = 0; begin < numel; begin += kChunkElements) {
        chunks.push_back({i, begin, std::min(numel, begin + kChunkElements)});
      }
    }
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        update_range(operands[chunks[c].tensor], chunks[c].begin, chunks[c].end, lr);
      }
    });
  });
}

std::vector<at::Tensor> task_sgd_cpu(at::TensorList params, at::TensorList grads, double lr) {
  check_task_sgd_lr(lr);
  TaskSgdPlan plan = plan_task_sgd(params, grads, std::nullopt);
  run(plan, lr);
  return plan.outs;
}

std::vector<at::Tensor> task_sgd_tensor_lr_cpu(at::TensorList params, at::TensorList grads, at::TensorList lr) {
  TaskSgdPlan plan = plan_task_sgd(params, grads, lr);
  for (size_t i = 0; i < plan.lrs.size(); ++i) {
    TORCH_CHECK_VALUE(at::isfinite(plan.lrs[i]).all().item<bool>(), "task_sgd: lr[", i, "] must be finite");
  }
  run(plan, 0.0);
  return plan.outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CPU, m) {
  m.impl("task_sgd", &task_sgd_cpu);
  m.impl("task_sgd.tensor_lr", &task_sgd_tensor_lr_cpu);
}

}  // namespace mamlext
