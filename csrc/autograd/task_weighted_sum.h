// sum_t go[t] * per_task[t]: the backward of an op whose output t is a loss of task t with a known per-task
// gradient (mlp_maml's meta-gradients, mlp_loss_grad's gradients); and task_mean, the same with go = 1/T.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace mamlext {

// sum_t go[t] * per_task[t], shaped like per_task[0]. On the CPU a loop of its own: for the small tensors of a
// small meta-iteration, at::matmul's dispatch costs more than the arithmetic (six of them, one per parameter of a
// 1-40-40-1 MLP, took a tenth of a 25-task meta-iteration).
// (Only on tensors with memory behind them: not under torch.compile or opcheck, which trace the backward with
// fake or functional tensors.)
inline bool has_cpu_memory(const at::Tensor& t) {
  const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                    c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper});
  return t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage() && !t.key_set().has_any(traced);
}

// out = sum_t weight(t) * per_task[t] over the tasks' contiguous rows, on the CPU.
template <typename scalar_t, typename Weight>
void sum_over_tasks(const at::Tensor& per_task, at::Tensor& out, Weight weight) {
  const int64_t tasks = per_task.size(0), n = out.numel();
  const scalar_t* x = per_task.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) o[e] = 0;
    for (int64_t t = 0; t < tasks; ++t) {
      const scalar_t w = weight(t);
      for (int64_t e = begin; e < end; ++e) o[e] += w * x[t * n + e];
    }
  });
}

inline at::Tensor task_weighted_sum(const at::Tensor& go, const at::Tensor& per_task) {
  const auto shape = per_task.sizes().slice(1);
  if (!has_cpu_memory(per_task) || !has_cpu_memory(go) || !per_task.is_contiguous() ||
      go.scalar_type() != per_task.scalar_type()) {
    return at::matmul(go, per_task.reshape({per_task.size(0), -1})).view(shape);
  }
  at::Tensor out = at::empty(shape, per_task.options());
  const at::Tensor weights = go.contiguous();
  AT_DISPATCH_FLOATING_TYPES(per_task.scalar_type(), "task_weighted_sum", [&] {
    const scalar_t* w = weights.data_ptr<scalar_t>();
    sum_over_tasks<scalar_t>(per_task, out, [w](int64_t t) { return w[t]; });
  });
  return out;
}

// mean_t per_task[t], shaped like per_task[0] (a 0-dim tensor for per_task [T]): the gradient of a mean over the
// tasks, and the mean of the per-task losses, without the separate ATen calls a mean costs.
inline at::Tensor task_mean(const at::Tensor& per_task) {
  if (!has_cpu_memory(per_task) || !per_task.is_contiguous() || per_task.size(0) == 0) return per_task.mean(0);
  at::Tensor out = at::empty(per_task.sizes().slice(1), per_task.options());
  AT_DISPATCH_FLOATING_TYPES(per_task.scalar_type(), "task_mean", [&] {
    const scalar_t scale = scalar_t(1) / static_cast<scalar_t>(per_task.size(0));
    sum_over_tasks<scalar_t>(per_task, out, [scale](int64_t) { return scale; });
  });
  return out;
}

}  // namespace mamlext
