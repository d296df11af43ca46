// CPU kernels of mlp_forward, mlp_backward and mlp_backward_backward: one MLP on one batch of rows (no task
// dimension) and its first and second derivatives, the layers that mamlext.nn.FusedMLP and mamlext.MAML run. The
// arithmetic is common/mlp_passes.h's passes, the ones the fused MAML ops run per task, on one thread:
//   mlp_forward            forward pass; returns the output z_{L-1} and the hidden layers' z and h.
//   mlp_backward           backward pass from grad_out = dL/dz_{L-1}: the gradients of the parameters (and of x).
//   mlp_backward_backward  the backward of mlp_backward. With S = <U, dparams> + <u, dx> for the incoming
//                          gradients U (shaped like the parameters) and u (like x), S = <grad_out, R{out}> along
//                          the direction (U, u), so dS/dgrad_out = R{out} (R-forward) and dS/d(params, x) is the
//                          R-backward pass with R{dL/dz_{L-1}} = 0 (grad_out is an input, not a function of out).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "common/mlp_checks.h"
#include "common/mlp_passes.h"
#include "common/mlp_tasks.h"

namespace mamlext {
namespace {

// A call's network, checked: params [W_1, b_1, ..., W_L, b_L] shared, x [K, in], all of one dtype and device.
MlpConfig check_layers(const char* op, at::TensorList params, const at::Tensor& x, int64_t activation,
                       double act_param) {
  check_mlp_codes(op, activation, act_param, 0);
  check_mlp_floating(op, x, "x");
  MlpConfig c = check_mlp_params(op, params, -1, x, "x").config;
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == c.dims.width[0], op, ": x must be [K, in] with in = ", c.dims.width[0],
              " (params[0] is ", params[0].sizes(), "), got ", x.sizes());
  c.activation = static_cast<Activation>(activation);
  c.act_param = act_param;
  return c;
}

// Elements of the hidden layers' z (or h) for K rows: the layers below the last.
int64_t hidden_numel(const MlpDims& d, int64_t K) { return K * (d.layer_outputs_width() - d.output_width()); }

void check_shaped_like(const char* op, const at::Tensor& t, const std::string& name, at::IntArrayRef shape,
                       const at::Tensor& ref) {
  check_same_device_dtype(op, t, name, ref, "x");
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// The checks of mlp_backward's (and mlp_backward_backward's) saved tensors.
void check_saved(const char* op, const MlpConfig& c, const at::Tensor& x, const at::Tensor& activations,
                 const at::Tensor& grad_out) {
  check_shaped_like(op, activations, "activations", {2 * hidden_numel(c.dims, x.size(0))}, x);
  check_shaped_like(op, grad_out, "grad_out", {x.size(0), c.dims.output_width()}, x);
}

// The tensors' table, for the MlpParams view table.at(0).
template <typename scalar_t, typename ptr_t = const scalar_t*>
TaskBatched<ptr_t> param_table(const std::vector<at::Tensor>& ts) {
  TaskBatched<ptr_t> table;
  for (size_t i = 0; i < ts.size(); ++i) table.ptr[i] = ts[i].data_ptr<scalar_t>();
  return table;
}

// The activations of one call: z and h of the hidden layers from the saved tensor [2 * hidden_numel], z of the last
// layer at `out`.
template <typename scalar_t>
MlpActivations<scalar_t> saved_activations(const MlpDims& d, int64_t K, scalar_t* saved, scalar_t* out) {
  MlpActivations<scalar_t> a;
  a.dims = &d;
  a.rows = K;
  a.z_base = saved;
  a.h_base = saved + hidden_numel(d, K);
  a.z_last = out;
  return a;
}

std::vector<at::Tensor> empty_like_each(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(at::empty_like(t));
  return out;
}

std::tuple<at::Tensor, at::Tensor> mlp_forward_cpu(at::TensorList params_in, const at::Tensor& x_in,
                                                   int64_t activation, double act_param) {
  constexpr const char* op = "mlp_forward";
  const MlpConfig c = check_layers(op, params_in, x_in, activation, act_param);
  const at::Tensor x = x_in.contiguous();
  const auto params = contiguous(params_in);
  const int64_t K = x.size(0);
  at::Tensor out = at::empty({K, c.dims.output_width()}, x.options());
  at::Tensor saved = at::empty({2 * hidden_numel(c.dims, K)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    at::Tensor transposed = at::empty({mlp_transposed_numel(c.dims)}, x.options());
    const SerialTeam team;
    const auto p_table = param_table<scalar_t>(params);
    const auto p = p_table.at(0);
    const auto pt = transpose_weights(team, c.dims, p, transposed.data_ptr<scalar_t>());
    auto a = saved_activations(c.dims, K, saved.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    mlp_forward(team, c, K, x.data_ptr<scalar_t>(), p, pt, a);
  });
  return {out, saved};
}

// The backward pass from grad_out into a (dz, dh in scratch); the parameter gradients to grads when not null, the
// input gradient to dx when not null.
template <typename scalar_t>
MlpActivations<scalar_t> backward_pass(const MlpConfig& c, const at::Tensor& x, const std::vector<at::Tensor>& params,
                                       const at::Tensor& saved, const at::Tensor& grad_out, scalar_t* scratch,
                                       const MlpParams<scalar_t*>* grads, scalar_t* dx) {
  const MlpDims& d = c.dims;
  const int64_t K = x.size(0);
  // z of the last layer is not read by the backward passes: its slot stays empty.
  auto a = saved_activations<scalar_t>(d, K, saved.data_ptr<scalar_t>(), nullptr);
  a.dz_base = scratch;
  a.dh_base = scratch + K * d.layer_outputs_width();
  std::copy(grad_out.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>() + grad_out.numel(), a.dz(d.layers - 1));
  const auto p_table = param_table<scalar_t>(params);
  mlp_backward(SerialTeam(), c, K, x.data_ptr<scalar_t>(), p_table.at(0), a, grads, dx);
  return a;
}

// Elements of backward_pass's scratch: dz of every layer, dh of the hidden ones.
int64_t backward_scratch_numel(const MlpDims& d, int64_t K) {
  return K * d.layer_outputs_width() + hidden_numel(d, K);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mlp_backward_cpu(at::TensorList params_in, const at::Tensor& x_in,
                                                                 const at::Tensor& activations,
                                                                 const at::Tensor& grad_out_in, int64_t activation,
                                                                 double act_param, bool input_grad) {
  constexpr const char* op = "mlp_backward";
  const MlpConfig c = check_layers(op, params_in, x_in, activation, act_param);
  check_saved(op, c, x_in, activations, grad_out_in);
  const at::Tensor x = x_in.contiguous(), saved = activations.contiguous(), grad_out = grad_out_in.contiguous();
  const auto params = contiguous(params_in);
  auto grads = empty_like_each(params);
  at::Tensor dx = input_grad ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    at::Tensor scratch = at::empty({backward_scratch_numel(c.dims, x.size(0))}, x.options());
    const auto g_table = param_table<scalar_t, scalar_t*>(grads);
    const auto g = g_table.at(0);
    backward_pass<scalar_t>(c, x, params, saved, grad_out, scratch.data_ptr<scalar_t>(), &g,
                            input_grad ? dx.data_ptr<scalar_t>() : nullptr);
  });
  return {grads, dx};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> mlp_backward_backward_cpu(
    at::TensorList params_in, const at::Tensor& x_in, const at::Tensor& activations, const at::Tensor& grad_out_in,
    at::TensorList grad_param_grads_in, const std::optional<at::Tensor>& grad_grad_x_in, int64_t activation,
    double act_param, bool input_grad) {
  constexpr const char* op = "mlp_backward_backward";
  const MlpConfig c = check_layers(op, params_in, x_in, activation, act_param);
  const MlpDims& d = c.dims;
  check_saved(op, c, x_in, activations, grad_out_in);
  TORCH_CHECK_VALUE(grad_param_grads_in.size() == params_in.size(), op, ": grad_param_grads must hold one tensor per "
              "parameter (", params_in.size(), "), got ", grad_param_grads_in.size());
  for (size_t i = 0; i < params_in.size(); ++i) {
    check_shaped_like(op, grad_param_grads_in[i], indexed("grad_param_grads", i), params_in[i].sizes(), x_in);
  }
  const bool has_grad_grad_x = grad_grad_x_in.has_value() && grad_grad_x_in->defined();
  if (has_grad_grad_x) check_shaped_like(op, *grad_grad_x_in, "grad_grad_x", x_in.sizes(), x_in);
  const at::Tensor x = x_in.contiguous(), saved = activations.contiguous(), grad_out = grad_out_in.contiguous();
  const at::Tensor grad_grad_x = has_grad_grad_x ? grad_grad_x_in->contiguous() : at::Tensor();
  const auto params = contiguous(params_in);
  const auto directions = contiguous(grad_param_grads_in);
  const int64_t K = x.size(0);
  auto d_params = empty_like_each(params);
  at::Tensor d_x = input_grad ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor d_grad_out = at::empty_like(grad_out);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const SerialTeam team;
    const int64_t transposed = mlp_transposed_numel(d);
    at::Tensor scratch = at::empty({backward_scratch_numel(d, K) + 2 * K * d.layer_outputs_width() +
                                    hidden_numel(d, K) + 2 * transposed}, x.options());
    scalar_t* s = scratch.data_ptr<scalar_t>();
    auto a = backward_pass<scalar_t>(c, x, params, saved, grad_out, s, nullptr, nullptr);
    s += backward_scratch_numel(d, K);
    // R{z} of the last layer is dS/dgrad_out; R{dL/dz} of the last layer is 0.
    a.rz_base = s;
    a.rh_base = s + K * d.layer_outputs_width();
    a.rdz_base = a.rh_base + hidden_numel(d, K);
    a.rz_last = d_grad_out.data_ptr<scalar_t>();
    std::fill(a.rdz(d.layers - 1), a.rdz(d.layers - 1) + K * d.output_width(), scalar_t(0));
    s = a.rdz_base + K * d.layer_outputs_width();
    const auto p_table = param_table<scalar_t>(params), v_table = param_table<scalar_t>(directions);
    const auto d_table = param_table<scalar_t, scalar_t*>(d_params);
    const auto p = p_table.at(0), v = v_table.at(0);
    const auto pt = transpose_weights(team, d, p, s);
    const auto vt = transpose_weights(team, d, v, s + transposed);
    const scalar_t* rx = has_grad_grad_x ? grad_grad_x.data_ptr<scalar_t>() : nullptr;
    // z of the last layer was not kept: R-forward does not read it (no activation after the last layer).
    mlp_r_forward(team, c, K, x.data_ptr<scalar_t>(), pt, v, vt, a, rx);
    mlp_r_backward(team, c, K, x.data_ptr<scalar_t>(), p, v, a, d_table.at(0), rx,
                   input_grad ? d_x.data_ptr<scalar_t>() : nullptr);
  });
  return {d_params, d_x, d_grad_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CPU, m) {
  m.impl("mlp_forward", &mlp_forward_cpu);
  m.impl("mlp_backward", &mlp_backward_cpu);
  m.impl("mlp_backward_backward", &mlp_backward_backward_cpu);
}

}  // namespace mamlext
