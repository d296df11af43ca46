// Autograd of mlp_forward and mlp_backward, in C++ so that a learner's forward costs a handful of autograd nodes and
// no Python autograd layer (what makes mamlext.MAML's per-task loop faster than the module's own layers).
//   mlp_forward's output is differentiable w.r.t. params and x; its backward is the op mlp_backward, through the
//   dispatcher, so that with create_graph=True (second-order MAML) the backward is itself recorded;
//   mlp_backward's outputs are differentiable w.r.t. params, x and grad_out, by mlp_backward_backward (the
//   analytic second derivatives). That backward is not differentiable again (no third derivatives).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace mamlext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOut = std::tuple<at::Tensor, at::Tensor>;
using BackwardOut = std::tuple<std::vector<at::Tensor>, at::Tensor>;
using BackwardBackwardOut = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor>;

ForwardOut forward_below_autograd(at::TensorList params, const at::Tensor& x, int64_t activation, double act_param) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::mlp_forward", "").typed<ForwardOut(
      at::TensorList, const at::Tensor&, int64_t, double)>();
  return op.call(params, x, activation, act_param);
}

// mlp_backward through the dispatcher: from its autograd key (MlpBackwardFunction when a gradient is to be
// recorded), or below it (backward_below_autograd).
BackwardOut backward_op(at::TensorList params, const at::Tensor& x, const at::Tensor& activations,
                        const at::Tensor& grad_out, int64_t activation, double act_param, bool input_grad) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::mlp_backward", "").typed<BackwardOut(
      at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, bool)>();
  return op.call(params, x, activations, grad_out, activation, act_param, input_grad);
}

BackwardOut backward_below_autograd(at::TensorList params, const at::Tensor& x, const at::Tensor& activations,
                                    const at::Tensor& grad_out, int64_t activation, double act_param,
                                    bool input_grad) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return backward_op(params, x, activations, grad_out, activation, act_param, input_grad);
}

BackwardBackwardOut backward_backward_below_autograd(at::TensorList params, const at::Tensor& x,
                                                     const at::Tensor& activations, const at::Tensor& grad_out,
                                                     at::TensorList grad_param_grads,
                                                     const std::optional<at::Tensor>& grad_grad_x,
                                                     int64_t activation, double act_param, bool input_grad) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::mlp_backward_backward", "")
                       .typed<BackwardBackwardOut(at::TensorList, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, at::TensorList, const std::optional<at::Tensor>&,
                                                  int64_t, double, bool)>();
  return op.call(params, x, activations, grad_out, grad_param_grads, grad_grad_x, activation, act_param, input_grad);
}

bool any_requires_grad(at::TensorList ts) {
  for (const auto& t : ts) {
    if (t.requires_grad()) return true;
  }
  return false;
}

class MlpForwardFunction : public torch::autograd::Function<MlpForwardFunction> {
 public:
  // Returns [out, activations]; activations is not differentiable.
  static variable_list forward(AutogradContext* ctx, at::TensorList params, const at::Tensor& x, int64_t activation,
                               double act_param) {
    auto [out, activations] = forward_below_autograd(params, x, activation, act_param);
    ctx->mark_non_differentiable({activations});
    variable_list saved(params.begin(), params.end());
    saved.push_back(x);
    saved.push_back(activations);
    ctx->save_for_backward(saved);
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["act_param"] = act_param;
    return {out, activations};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outs) {
    const auto saved = ctx->get_saved_variables();
    const size_t n = saved.size() - 2;
    const at::TensorList params(saved.data(), n);
    // Gradients of: params (n), x, activation, act_param.
    variable_list result(n + 3);
    if (!grad_outs[0].defined()) return result;
    const bool input_grad = ctx->needs_input_grad(n);
    auto [param_grads, grad_x] =
        backward_op(params, saved[n], saved[n + 1], grad_outs[0], ctx->saved_data["activation"].toInt(),
                    ctx->saved_data["act_param"].toDouble(), input_grad);
    for (size_t i = 0; i < n; ++i) {
      if (ctx->needs_input_grad(i)) result[i] = param_grads[i];
    }
    if (input_grad) result[n] = grad_x;
    return result;
  }
};

class MlpBackwardFunction : public torch::autograd::Function<MlpBackwardFunction> {
 public:
  // Returns [param grads..., grad_x] (grad_x empty unless input_grad).
  static variable_list forward(AutogradContext* ctx, at::TensorList params, const at::Tensor& x,
                               const at::Tensor& activations, const at::Tensor& grad_out, int64_t activation,
                               double act_param, bool input_grad) {
    auto [param_grads, grad_x] =
        backward_below_autograd(params, x, activations, grad_out, activation, act_param, input_grad);
    variable_list saved(params.begin(), params.end());
    saved.insert(saved.end(), {x, activations, grad_out});
    ctx->save_for_backward(saved);
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["act_param"] = act_param;
    ctx->saved_data["input_grad"] = input_grad;
    if (!input_grad) ctx->mark_non_differentiable({grad_x});
    variable_list out(param_grads.begin(), param_grads.end());
    out.push_back(grad_x);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "mamlext::mlp_backward: its backward (the MLP's second derivatives) is not differentiable again "
                "(no third derivatives); differentiate without create_graph=True at this level");
    const auto saved = ctx->get_saved_variables();
    const size_t n = saved.size() - 3;
    const at::TensorList params(saved.data(), n);
    const at::Tensor &x = saved[n], &activations = saved[n + 1], &grad_out = saved[n + 2];
    const bool input_grad = ctx->saved_data["input_grad"].toBool();
    // Gradients of: params (n), x, activations, grad_out, activation, act_param, input_grad.
    variable_list result(n + 6);
    std::vector<at::Tensor> directions;
    bool any = false;
    for (size_t i = 0; i < n; ++i) {
      any = any || grad_outs[i].defined();
      directions.push_back(grad_outs[i].defined() ? grad_outs[i] : at::zeros_like(params[i]));
    }
    std::optional<at::Tensor> grad_grad_x;
    if (input_grad && grad_outs[n].defined()) grad_grad_x = grad_outs[n];
    if (!any && !grad_grad_x.has_value()) return result;
    auto [d_params, d_x, d_grad_out] =
        backward_backward_below_autograd(params, x, activations, grad_out, directions, grad_grad_x,
                                         ctx->saved_data["activation"].toInt(),
                                         ctx->saved_data["act_param"].toDouble(), ctx->needs_input_grad(n));
    for (size_t i = 0; i < n; ++i) {
      if (ctx->needs_input_grad(i)) result[i] = d_params[i];
    }
    if (ctx->needs_input_grad(n)) result[n] = d_x;
    if (ctx->needs_input_grad(n + 2)) result[n + 2] = d_grad_out;
    return result;
  }
};

ForwardOut mlp_forward_autograd(at::TensorList params, const at::Tensor& x, int64_t activation, double act_param) {
  // Without a gradient to record, skip building the autograd node.
  if (!at::GradMode::is_enabled() || !(any_requires_grad(params) || x.requires_grad())) {
    return forward_below_autograd(params, x, activation, act_param);
  }
  const variable_list out = MlpForwardFunction::apply(params, x, activation, act_param);
  return {out[0], out[1]};
}

BackwardOut mlp_backward_autograd(at::TensorList params, const at::Tensor& x, const at::Tensor& activations,
                                  const at::Tensor& grad_out, int64_t activation, double act_param, bool input_grad) {
  if (!at::GradMode::is_enabled() || !(any_requires_grad(params) || x.requires_grad() || grad_out.requires_grad())) {
    return backward_below_autograd(params, x, activations, grad_out, activation, act_param, input_grad);
  }
  const variable_list out =
      MlpBackwardFunction::apply(params, x, activations, grad_out, activation, act_param, input_grad);
  return {std::vector<at::Tensor>(out.begin(), out.end() - 1), out.back()};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, Autograd, m) {
  m.impl("mlp_forward", &mlp_forward_autograd);
  m.impl("mlp_backward", &mlp_backward_autograd);
}

}  // namespace mamlext
