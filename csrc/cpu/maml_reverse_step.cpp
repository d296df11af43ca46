// CPU kernel of maml_reverse_step: the per-task elements of all tensors are cut into chunks that one
// at::parallel_for shares out; each element runs reverse_step_element (csrc/common/reverse_math.h) over the tasks.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/reverse_step_plan.h"

namespace mamlext {
namespace {

constexpr int64_t kChunkElements = 1 << 12;          // per-task elements per chunk (times T tasks of work)
constexpr int64_t kSerialBelowWork = 1 << 15;       // elements x tasks below which one thread does it all

struct Chunk {
  size_t tensor;
  int64_t begin, end;  // per-task elements [begin, end)
};

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> maml_reverse_step_cpu(
    at::TensorList v, at::TensorList hv, at::TensorList grads, bool sum_tasks) {
  ReverseStepPlan plan = plan_reverse_step(v, hv, grads, sum_tasks);
  if (plan.tasks == 0) {  // no task: the sums are empty
    for (auto& t : plan.v_next) t.zero_();
    for (auto& t : plan.lr_grads) t.zero_();
    return {plan.v_next, plan.lr_grads};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "maml_reverse_step_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<ReverseStepOperands<scalar_t>> operands;
    std::vector<Chunk> chunks;
    int64_t work = 0;
    for (size_t i = 0; i < plan.v.size(); ++i) {
      operands.push_back(plan.operands<scalar_t>(i));
      const int64_t n = operands.back().numel;
      work += n * plan.tasks;
      for (int64_t begin = 0; begin < n; begin += kChunkElements) {
        chunks.push_back({i, begin, std::min(n, begin + kChunkElements)});
      }
    }
    auto run_chunks = [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const auto& ops = operands[chunks[c].tensor];
        for (int64_t e = chunks[c].begin; e < chunks[c].end; ++e) reverse_step_element<opmath_t>(ops, e);
      }
    };
    const auto num_chunks = static_cast<int64_t>(chunks.size());
    if (work < kSerialBelowWork) {
      run_chunks(0, num_chunks);
    } else {
      at::parallel_for(0, num_chunks, 1, run_chunks);
    }
  });
  return {plan.v_next, plan.lr_grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CPU, m) { m.impl("maml_reverse_step", &maml_reverse_step_cpu); }

}  // namespace mamlext
