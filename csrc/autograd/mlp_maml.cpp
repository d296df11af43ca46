// Autograd of mlp_maml, in C++ so that a meta-iteration pays no Python autograd layer (its forward and backward
// cost a sizeable part of a small call, e.g. a 1-40-40-1 MLP over 25 tasks).
//   query_losses [T] is differentiable w.r.t. params and lrs: d params_i = sum_t go_t meta_grads_i[t],
//   d lrs_i = sum_t go_t lr_grads_i[t]; the data, step_weights and the rows' weights get no gradient, and
//   meta_grads / lr_grads are outputs without a graph. The backward is not itself differentiable (no third derivatives).
// Also mlp_maml_mean (mamlext._C.mlp_maml_mean, for eager calls of BatchedMAML): the mean query loss and the
// per-task losses, the mean's meta-gradient computed with the forward.
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

using MamlOutputs = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

MamlOutputs call_below_autograd(at::TensorList params, const at::Tensor& xs, const at::Tensor& ys,
                                const at::Tensor& xq, const at::Tensor& yq, at::TensorList lrs,
                                const at::Tensor& step_weights, bool first_order, int64_t activation,
                                double act_param, int64_t loss, const std::optional<at::Tensor>& support_weights,
                                const std::optional<at::Tensor>& query_weights) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::mlp_maml", "").typed<MamlOutputs(
      at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
      const at::Tensor&, bool, int64_t, double, int64_t, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&)>();
  return op.call(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss, support_weights,
                 query_weights);
}

// Whether a call would record a gradient: grad mode on and a parameter or rate requiring grad.
bool records_grad(at::TensorList params, at::TensorList lrs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto list : {params, lrs}) {
    for (const auto& t : list) {
      if (t.requires_grad()) return true;
    }
  }
  return false;
}

class MlpMamlFunction : public torch::autograd::Function<MlpMamlFunction> {
 public:
  // Returns [query_losses, meta_grads..., lr_grads...].
  static variable_list forward(AutogradContext* ctx, at::TensorList params, const at::Tensor& xs, const at::Tensor& ys,
                               const at::Tensor& xq, const at::Tensor& yq, at::TensorList lrs,
                               const at::Tensor& step_weights, bool first_order, int64_t activation, double act_param,
                               int64_t loss, const std::optional<at::Tensor>& support_weights,
                               const std::optional<at::Tensor>& query_weights) {
    auto [losses, meta_grads, lr_grads] = call_below_autograd(params, xs, ys, xq, yq, lrs, step_weights, first_order,
                                                              activation, act_param, loss, support_weights,
                                                              query_weights);
    variable_list out{losses};
    out.insert(out.end(), meta_grads.begin(), meta_grads.end());
    out.insert(out.end(), lr_grads.begin(), lr_grads.end());
    const variable_list per_task(out.begin() + 1, out.end());
    ctx->mark_non_differentiable(per_task);
    ctx->set_materialize_grads(false);  // no zero tensors for the outputs without a gradient
    ctx->save_for_backward(per_task);
    ctx->saved_data["params"] = static_cast<int64_t>(params.size());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "mamlext::mlp_maml: its backward is not differentiable (no third derivatives); differentiate the "
                "query losses without create_graph=True");
    const auto saved = ctx->get_saved_variables();
    const size_t n = static_cast<size_t>(ctx->saved_data["params"].toInt());
    // Gradients of: params (n), xs, ys, xq, yq, lrs (n), step_weights, first_order, activation, act_param, loss,
    // support_weights, query_weights.
    variable_list result(2 * n + 11);
    const at::Tensor& go = grad_outs[0];
    if (!go.defined()) return result;
    for (size_t i = 0; i < n; ++i) {
      if (ctx->needs_input_grad(i)) result[i] = task_weighted_sum(go, saved[i]);
      if (ctx->needs_input_grad(n + 4 + i)) result[n + 4 + i] = task_weighted_sum(go, saved[n + i]);
    }
    return result;
  }
};

MamlOutputs mlp_maml_autograd(at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                              const at::Tensor& yq, at::TensorList lrs, const at::Tensor& step_weights,
                              bool first_order, int64_t activation, double act_param, int64_t loss,
                              const std::optional<at::Tensor>& support_weights,
                              const std::optional<at::Tensor>& query_weights) {
  // Without a gradient to record, skip building the autograd node.
  if (!records_grad(params, lrs)) {
    return call_below_autograd(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss,
                               support_weights, query_weights);
  }
  const variable_list out = MlpMamlFunction::apply(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation,
                                                   act_param, loss, support_weights, query_weights);
  const auto meta_begin = out.begin() + 1, lr_begin = meta_begin + static_cast<std::ptrdiff_t>(params.size());
  return {out[0], std::vector<at::Tensor>(meta_begin, lr_begin), std::vector<at::Tensor>(lr_begin, out.end())};
}

// The mean of the query losses as one node whose gradient is computed in the forward: d mean / d params_i =
// mean_t meta_grads_i[t] (likewise lrs), scaled by grad_output in the backward. What BatchedMAML needs, without
// a separate mean node and a weighted sum over tasks per parameter at backward time.
class MlpMamlMeanFunction : public torch::autograd::Function<MlpMamlMeanFunction> {
 public:
  // Returns [mean query loss, query_losses].
  static variable_list forward(AutogradContext* ctx, at::TensorList params, const at::Tensor& xs, const at::Tensor& ys,
                               const at::Tensor& xq, const at::Tensor& yq, at::TensorList lrs,
                               const at::Tensor& step_weights, bool first_order, int64_t activation, double act_param,
                               int64_t loss) {
    auto [losses, meta_grads, lr_grads] = call_below_autograd(params, xs, ys, xq, yq, lrs, step_weights, first_order,
                                                              activation, act_param, loss, std::nullopt,
                                                              std::nullopt);
    variable_list mean_grads;
    for (const auto* per_task : {&meta_grads, &lr_grads}) {
      for (const auto& g : *per_task) mean_grads.push_back(task_mean(g));
    }
    ctx->save_for_backward(mean_grads);
    ctx->saved_data["params"] = static_cast<int64_t>(params.size());
    ctx->mark_non_differentiable({losses});
    ctx->set_materialize_grads(false);
    return {task_mean(losses), losses};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "mamlext: the meta-loss's backward is not differentiable (no third derivatives); differentiate it "
                "without create_graph=True");
    const auto saved = ctx->get_saved_variables();
    const size_t n = static_cast<size_t>(ctx->saved_data["params"].toInt());
    variable_list result(2 * n + 9);  // params (n), xs, ys, xq, yq, lrs (n), and the five non-tensor arguments
    const at::Tensor& go = grad_outs[0];
    if (!go.defined()) return result;
    for (size_t i = 0; i < n; ++i) {
      if (ctx->needs_input_grad(i)) result[i] = saved[i] * go;
      if (ctx->needs_input_grad(n + 4 + i)) result[n + 4 + i] = saved[n + i] * go;
    }
    return result;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> mlp_maml_mean(const std::vector<at::Tensor>& params, const at::Tensor& xs,
                                                 const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
                                                 const std::vector<at::Tensor>& lrs, const at::Tensor& step_weights,
                                                 bool first_order, int64_t activation, double act_param,
                                                 int64_t loss) {
  if (!records_grad(params, lrs)) {
    const auto losses = std::get<0>(call_below_autograd(params, xs, ys, xq, yq, lrs, step_weights, first_order,
                                                        activation, act_param, loss, std::nullopt, std::nullopt));
    return {task_mean(losses), losses};
  }
  // TensorLists, not vectors: apply() takes the graph's inputs from the Tensor and TensorList arguments.
  const variable_list out = MlpMamlMeanFunction::apply(at::TensorList(params), xs, ys, xq, yq, at::TensorList(lrs),
                                                       step_weights, first_order, activation, act_param, loss);
  return {out[0], out[1]};
}

TORCH_LIBRARY_IMPL(mamlext, Autograd, m) { m.impl("mlp_maml", &mlp_maml_autograd); }

}  // namespace mamlext
