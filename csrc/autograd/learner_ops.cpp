// clone_tensors and sgd_update: a per-task learner's copy of its parameters and its inner SGD step, each one
// autograd node for the whole parameter list. mamlext.MAML runs one task at a time, so per-tensor nodes (six
// CloneBackward, six multiplications in the foreach add's backward) cost more than the arithmetic on a small model.
//   clone_tensors: out_i = copy of t_i;       d t_i = d out_i.
//   sgd_update:    out_i = p_i - lr * g_i;    d p_i = d out_i,  d g_i = -lr * d out_i.
// Both backwards are differentiable ATen ops (or no op at all), so higher-order MAML differentiates through them.
// The forward kernels are device-generic ATen calls (CompositeExplicitAutograd): clone and the multi-tensor add.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/checks.h"

namespace mamlext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<at::Tensor> clone_tensors_kernel(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.clone());
  return out;
}

std::vector<at::Tensor> sgd_update_kernel(at::TensorList params, at::TensorList grads, double lr) {
  check_sgd_update(params, grads, lr);
  if (params.empty()) return {};
  return at::_foreach_add(params, grads, -lr);
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

class CloneTensorsFunction : public torch::autograd::Function<CloneTensorsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList tensors) {
    ctx->set_materialize_grads(false);  // an unused copy's original gets no gradient, not zeros
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<std::vector<at::Tensor>(at::TensorList)>("mamlext::clone_tensors");
    return op.call(tensors);
  }

  static variable_list backward(AutogradContext*, variable_list grad_outs) { return grad_outs; }
};

class SgdUpdateFunction : public torch::autograd::Function<SgdUpdateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList params, at::TensorList grads, double lr) {
    ctx->saved_data["lr"] = lr;
    ctx->set_materialize_grads(false);  // an unused output's inputs get no gradient, not zeros
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op =
        op_handle<std::vector<at::Tensor>(at::TensorList, at::TensorList, double)>("mamlext::sgd_update");
    return op.call(params, grads, lr);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outs) {
    const double lr = ctx->saved_data["lr"].toDouble();
    const size_t n = grad_outs.size();
    // Gradients of: params (n), grads (n), lr.
    variable_list result(grad_outs.begin(), grad_outs.end());
    result.resize(2 * n + 1);
    std::vector<at::Tensor> defined;
    for (const auto& go : grad_outs) {
      if (go.defined()) defined.push_back(go);
    }
    if (defined.empty()) return result;
    // -lr as a tensor of the gradients' dtype: a float scalar is converted again for every tensor of the list.
    const std::vector<at::Tensor> scaled = at::_foreach_mul(defined, at::scalar_tensor(-lr, defined[0].options()));
    for (size_t i = 0, j = 0; i < n; ++i) {
      if (grad_outs[i].defined()) result[n + i] = scaled[j++];
    }
    return result;
  }
};

// The Function runs on the entries with a gradient to record (tensor i for `differentiable(i)`), the kernel below
// autograd on the others, so that an output requires grad exactly when t.clone() or p - lr * g would.
template <typename Differentiable, typename RunFunction, typename RunKernel>
std::vector<at::Tensor> split_by_grad(size_t n, Differentiable differentiable, RunFunction run_function,
                                      RunKernel run_kernel) {
  std::vector<size_t> recorded, plain;
  if (at::GradMode::is_enabled()) {
    for (size_t i = 0; i < n; ++i) (differentiable(i) ? recorded : plain).push_back(i);
  }
  if (recorded.empty()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return run_kernel(std::vector<size_t>());
  }
  if (plain.empty()) return run_function(std::vector<size_t>());
  std::vector<at::Tensor> out(n);
  const auto with_grad = run_function(recorded);
  for (size_t j = 0; j < recorded.size(); ++j) out[recorded[j]] = with_grad[j];
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto without_grad = run_kernel(plain);
  for (size_t j = 0; j < plain.size(); ++j) out[plain[j]] = without_grad[j];
  return out;
}

// The tensors at `indices` (all of them when empty).
std::vector<at::Tensor> pick(at::TensorList tensors, const std::vector<size_t>& indices) {
  if (indices.empty()) return tensors.vec();
  std::vector<at::Tensor> picked;
  picked.reserve(indices.size());
  for (size_t i : indices) picked.push_back(tensors[i]);
  return picked;
}

std::vector<at::Tensor> clone_tensors_autograd(at::TensorList tensors) {
  return split_by_grad(
      tensors.size(), [&](size_t i) { return tensors[i].requires_grad(); },
      [&](const std::vector<size_t>& idx) {
        const auto picked = pick(tensors, idx);
        return CloneTensorsFunction::apply(at::TensorList(picked));  // a TensorList: apply records its tensors
      },
      [&](const std::vector<size_t>& idx) { return clone_tensors_kernel(pick(tensors, idx)); });
}

std::vector<at::Tensor> sgd_update_autograd(at::TensorList params, at::TensorList grads, double lr) {
  check_sgd_update(params, grads, lr);  // before grads is indexed by params' positions
  return split_by_grad(
      params.size(), [&](size_t i) { return params[i].requires_grad() || grads[i].requires_grad(); },
      [&](const std::vector<size_t>& idx) {
        const auto picked_params = pick(params, idx), picked_grads = pick(grads, idx);
        return SgdUpdateFunction::apply(at::TensorList(picked_params), at::TensorList(picked_grads), lr);
      },
      [&](const std::vector<size_t>& idx) { return sgd_update_kernel(pick(params, idx), pick(grads, idx), lr); });
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CompositeExplicitAutograd, m) {
  m.impl("clone_tensors", &clone_tensors_kernel);
  m.impl("sgd_update", &sgd_update_kernel);
}

TORCH_LIBRARY_IMPL(mamlext, Autograd, m) {
  m.impl("clone_tensors", &clone_tensors_autograd);
  m.impl("sgd_update", &sgd_update_autograd);
}

}  // namespace mamlext
