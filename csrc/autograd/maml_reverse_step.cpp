// Autograd of maml_reverse_step. v_next_i = v_i - hv_i (summed over tasks when sum_tasks) is linear in v and hv;
// lr_grads_i = -sum_t grads_i[t] * v_i[t] is bilinear in grads and v. The backward is made of differentiable ATen
// ops, so the op can be differentiated twice over.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace mamlext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ReverseStepOutputs = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;

ReverseStepOutputs call_below_autograd(at::TensorList v, at::TensorList hv, at::TensorList grads, bool sum_tasks) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::maml_reverse_step", "").typed<
      ReverseStepOutputs(at::TensorList, at::TensorList, at::TensorList, bool)>();
  return op.call(v, hv, grads, sum_tasks);
}

class MamlReverseStepFunction : public torch::autograd::Function<MamlReverseStepFunction> {
 public:
  // Returns [v_next..., lr_grads...] (no lr_grads when grads is empty).
  static variable_list forward(AutogradContext* ctx, at::TensorList v, at::TensorList hv, at::TensorList grads,
                               bool sum_tasks) {
    auto [v_next, lr_grads] = call_below_autograd(v, hv, grads, sum_tasks);
    ctx->saved_data["sum_tasks"] = sum_tasks;
    ctx->saved_data["has_grads"] = !grads.empty();
    ctx->set_materialize_grads(false);  // an output without a gradient contributes nothing
    variable_list to_save(v.begin(), v.end());
    to_save.insert(to_save.end(), grads.begin(), grads.end());
    ctx->save_for_backward(to_save);
    variable_list out(v_next.begin(), v_next.end());
    out.insert(out.end(), lr_grads.begin(), lr_grads.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outs) {
    const bool sum_tasks = ctx->saved_data["sum_tasks"].toBool();
    const bool has_grads = ctx->saved_data["has_grads"].toBool();
    const auto saved = ctx->get_saved_variables();
    const size_t n = has_grads ? saved.size() / 2 : saved.size();
    // Gradients of: v (n), hv (n), grads (n or none), sum_tasks.
    variable_list result(2 * n + (has_grads ? n : 0) + 1);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& v = saved[i];
      at::Tensor dv = grad_outs[i];
      if (!dv.defined()) {
        dv = at::zeros_like(v);
      } else if (sum_tasks) {
        dv = dv.unsqueeze(0).expand_as(v);
      }
      result[n + i] = -dv;  // d hv
      if (has_grads && grad_outs[n + i].defined()) {
        const at::Tensor dl = grad_outs[n + i].unsqueeze(0);
        result[2 * n + i] = -v * dl;  // d grads
        dv = dv - saved[n + i] * dl;
      }
      result[i] = dv;
    }
    return result;
  }
};

ReverseStepOutputs maml_reverse_step_autograd(at::TensorList v, at::TensorList hv, at::TensorList grads,
                                              bool sum_tasks) {
  bool records_grad = false;
  if (at::GradMode::is_enabled()) {
    for (const auto* list : {&v, &hv, &grads}) {
      for (const auto& t : *list) records_grad = records_grad || t.requires_grad();
    }
  }
  // Without a gradient to record (the generic engine's low-memory mode runs it under no_grad), no autograd node.
  if (!records_grad) return call_below_autograd(v, hv, grads, sum_tasks);
  const variable_list out = MamlReverseStepFunction::apply(v, hv, grads, sum_tasks);
  const auto split = out.begin() + static_cast<std::ptrdiff_t>(v.size());
  return {std::vector<at::Tensor>(out.begin(), split), std::vector<at::Tensor>(split, out.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, Autograd, m) { m.impl("maml_reverse_step", &maml_reverse_step_autograd); }

}  // namespace mamlext
