// Autograd of task_sgd, in C++ so that a call pays no Python autograd layer (it costs more than the kernel
// for the small tensors of an inner loop). The backward is made of differentiable ATen ops, so second-order
// MAML can differentiate through it again.
//   out_i = p_i - lr_i * g_i:  d p_i = sum over tasks of d out_i when p_i is shared, else d out_i;
//                              d g_i = -lr_i * d out_i;   d lr_i = -sum(d out_i * g_i) reduced to lr_i's shape.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace mamlext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<at::Tensor> call_below_autograd(at::TensorList params, at::TensorList grads, at::TensorList lrs,
                                            std::optional<double> lr) {
  at::AutoDispatchBelowADInplaceOrView guard;
  if (lr) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::task_sgd", "").typed<
        std::vector<at::Tensor>(at::TensorList, at::TensorList, double)>();
    return op.call(params, grads, *lr);
  }
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::task_sgd", "tensor_lr").typed<
      std::vector<at::Tensor>(at::TensorList, at::TensorList, at::TensorList)>();
  return op.call(params, grads, lrs);
}

class TaskSgdFunction : public torch::autograd::Function<TaskSgdFunction> {
 public:
  // lrs is empty when the rate is the float lr.
  static variable_list forward(AutogradContext* ctx, at::TensorList params, at::TensorList grads, at::TensorList lrs,
                               std::optional<double> lr) {
    auto outs = call_below_autograd(params, grads, lrs, lr);  // validates the arguments before they are indexed
    c10::List<bool> param_shared;
    for (size_t i = 0; i < params.size(); ++i) param_shared.push_back(params[i].dim() < grads[i].dim());
    ctx->saved_data["param_shared"] = param_shared;
    ctx->saved_data["float_lr"] = lr ? c10::IValue(*lr) : c10::IValue();
    std::vector<at::Tensor> to_save(grads.begin(), grads.end());
    to_save.insert(to_save.end(), lrs.begin(), lrs.end());
    ctx->save_for_backward(to_save);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outs) {
    const auto param_shared = ctx->saved_data["param_shared"].toBoolList();
    const auto float_lr = ctx->saved_data["float_lr"];
    const auto saved = ctx->get_saved_variables();
    const size_t n = grad_outs.size();
    variable_list d_params(n), d_grads(n), d_lrs(float_lr.isNone() ? n : 0);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& go = grad_outs[i];
      if (!go.defined()) continue;
      d_params[i] = param_shared[i] ? go.sum(0) : go;
      if (float_lr.isNone()) {
        const at::Tensor& lr = saved[n + i];
        d_grads[i] = -lr * go;
        const at::Tensor d_lr = -(go * saved[i]);
        d_lrs[i] = lr.dim() == 0 ? d_lr.sum() : d_lr.sum(0);
      } else {
        d_grads[i] = go * -float_lr.toDouble();
      }
    }
    variable_list result;
    result.reserve(3 * n + 1);
    for (auto* part : {&d_params, &d_grads, &d_lrs}) result.insert(result.end(), part->begin(), part->end());
    result.emplace_back();  // the float lr
    return result;
  }
};

// Without a gradient to record, skip building the autograd node: an inner loop's first-order steps and
// evaluation-time adaptation run many small calls where that bookkeeping would dominate.
bool records_grad(std::initializer_list<at::TensorList> lists) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& list : lists) {
    for (const auto& t : list) {
      if (t.requires_grad()) return true;
    }
  }
  return false;
}

std::vector<at::Tensor> task_sgd_autograd(at::TensorList params, at::TensorList grads, double lr) {
  if (!records_grad({params, grads})) return call_below_autograd(params, grads, {}, lr);
  return TaskSgdFunction::apply(params, grads, at::TensorList(), std::optional<double>(lr));
}

std::vector<at::Tensor> task_sgd_tensor_lr_autograd(at::TensorList params, at::TensorList grads, at::TensorList lr) {
  if (!records_grad({params, grads, lr})) return call_below_autograd(params, grads, lr, std::nullopt);
  return TaskSgdFunction::apply(params, grads, lr, std::optional<double>());
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, Autograd, m) {
  m.impl("task_sgd", &task_sgd_autograd);
  m.impl("task_sgd.tensor_lr", &task_sgd_tensor_lr_autograd);
}

}  // namespace mamlext
