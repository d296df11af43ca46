// Autograd of mlp_loss_grad: losses [T] is differentiable w.r.t. params, through the gradients the op returns
// (first order): d params_i = sum_t go_t grads_i[t] for a shared parameter, go_t grads_i[t] per task for a per-task
// one. x, y and the rows' weights get no gradient and the returned grads carry no graph; the backward is not differentiable again (an
// inner step is differentiated through by mlp_hvp or mlp_maml instead).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "autograd/task_weighted_sum.h"

namespace mamlext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LossGradOutputs = std::tuple<at::Tensor, std::vector<at::Tensor>>;

LossGradOutputs call_below_autograd(at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                    int64_t activation, double act_param, int64_t loss,
                                    const std::optional<at::Tensor>& weights) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::mlp_loss_grad", "").typed<
      LossGradOutputs(at::TensorList, const at::Tensor&, const at::Tensor&, int64_t, double, int64_t,
                      const std::optional<at::Tensor>&)>();
  return op.call(params, x, y, activation, act_param, loss, weights);
}

class MlpLossGradFunction : public torch::autograd::Function<MlpLossGradFunction> {
 public:
  // Returns [losses, grads...].
  static variable_list forward(AutogradContext* ctx, at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                               int64_t activation, double act_param, int64_t loss,
                               const std::optional<at::Tensor>& weights) {
    auto [losses, grads] = call_below_autograd(params, x, y, activation, act_param, loss, weights);
    c10::List<bool> shared;  // params[i] is S_i (shared) or [T, *S_i]; its gradient is [T, *S_i]
    for (size_t i = 0; i < params.size(); ++i) shared.push_back(params[i].dim() < grads[i].dim());
    ctx->saved_data["shared"] = shared;
    ctx->mark_non_differentiable(grads);
    ctx->set_materialize_grads(false);  // no zero tensors for the outputs without a gradient
    ctx->save_for_backward(grads);
    variable_list out{losses};
    out.insert(out.end(), grads.begin(), grads.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "mamlext::mlp_loss_grad: its backward is not differentiable (first order only); to differentiate "
                "through an inner step use mlp_hvp or mlp_maml");
    const auto grads = ctx->get_saved_variables();
    const auto shared = ctx->saved_data["shared"].toBoolList();
    const size_t n = grads.size();
    // Gradients of: params (n), x, y, activation, act_param, loss, weights.
    variable_list result(n + 6);
    const at::Tensor& go = grad_outs[0];
    if (!go.defined()) return result;
    for (size_t i = 0; i < n; ++i) {
      if (!ctx->needs_input_grad(i)) continue;
      std::vector<int64_t> per_task_shape(static_cast<size_t>(grads[i].dim()), 1);
      per_task_shape[0] = -1;
      result[i] = shared[i] ? task_weighted_sum(go, grads[i]) : go.reshape(per_task_shape) * grads[i];
    }
    return result;
  }
};

LossGradOutputs mlp_loss_grad_autograd(at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                       int64_t activation, double act_param, int64_t loss,
                                       const std::optional<at::Tensor>& weights) {
  bool records_grad = false;
  if (at::GradMode::is_enabled()) {
    for (const auto& p : params) records_grad = records_grad || p.requires_grad();
  }
  // Without a gradient to record (an inner loop run under no_grad), skip building the autograd node.
  if (!records_grad) return call_below_autograd(params, x, y, activation, act_param, loss, weights);
  const variable_list out = MlpLossGradFunction::apply(params, x, y, activation, act_param, loss, weights);
  return {out[0], std::vector<at::Tensor>(out.begin() + 1, out.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, Autograd, m) { m.impl("mlp_loss_grad", &mlp_loss_grad_autograd); }

}  // namespace mamlext
