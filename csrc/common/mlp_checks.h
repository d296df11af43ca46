// Argument validation of the fused MLP ops (mlp_loss_grad, mlp_hvp, mlp_maml), shared by the CPU and CUDA
// launchers (host code only). Every message names the op, the argument and its index.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/mlp_passes.h"

namespace mamlext {

// What the checks learn about a call.
struct MlpCall {
  MlpConfig config;
  int64_t tasks = 0;
  std::vector<bool> per_task;  // params[i] is [T, *S_i] (else shared, S_i)
};

inline void check_mlp_codes(const char* op, int64_t activation, double act_param, int64_t loss) {
  TORCH_CHECK_VALUE(activation >= 0 && activation < kNumActivations, op,
              ": activation must be 0 (relu), 1 (leaky_relu), 2 (tanh), 3 (sigmoid), 4 (gelu) or 5 (elu), got ",
              activation);
  TORCH_CHECK_VALUE(std::isfinite(act_param), op, ": act_param must be finite, got ", act_param);
  TORCH_CHECK_VALUE(loss >= 0 && loss < kNumLosses, op, ": loss must be 0 (mse), 1 (ce) or 2 (gaussian), got ", loss);
}

inline void check_mlp_floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same_device_dtype(const char* op, const at::Tensor& t, const std::string& name, const at::Tensor& ref,
                                    const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type());
}

inline std::string indexed(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// The layer widths from params = [W_0, b_0, W_1, b_1, ...] (and, for a loss with a parameter of its own, that
// parameter last: gaussian's log_std [out]), each shared (S_i) or, when tasks >= 0, also per task ([tasks, *S_i]);
// checks the ranks, the chaining of widths and each tensor's dtype and device against ref.
inline MlpCall check_mlp_params(const char* op, at::TensorList params, int64_t tasks, const at::Tensor& ref,
                                const char* ref_name, Loss loss = Loss::kMse) {
  const bool with_loss_param = loss_has_param(loss);
  if (with_loss_param) {
    TORCH_CHECK_VALUE(params.size() >= 3 && params.size() % 2 == 1, op,
                      ": params must be [W_1, b_1, ..., W_L, b_L, log_std] for loss gaussian (an odd number >= 3 of "
                      "tensors), got ", params.size(), " tensors");
  } else {
    TORCH_CHECK_VALUE(!params.empty() && params.size() % 2 == 0, op,
                      ": params must be [W_1, b_1, ..., W_L, b_L] (an even, nonzero number of tensors), got ",
                      params.size(), " tensors");
  }
  const int64_t layers = static_cast<int64_t>(params.size() / 2);
  TORCH_CHECK_VALUE(layers <= kMlpMaxLayers, op, ": at most ", kMlpMaxLayers, " layers are supported, got ", layers);
  const bool allow_per_task = tasks >= 0;
  MlpCall call;
  call.tasks = tasks;
  MlpDims& d = call.config.dims;
  d.layers = static_cast<int>(layers);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    check_same_device_dtype(op, p, indexed("params", i), ref, ref_name);
    if (with_loss_param && i + 1 == params.size()) {  // log_std: [out] or [T, out], after the layers' widths are known
      const int64_t out = d.width[layers];
      const bool per_task = allow_per_task && p.dim() == 2;
      TORCH_CHECK_VALUE((p.dim() == 1 && p.size(0) == out) || (per_task && p.size(1) == out), op, ": params[", i,
                        "] (the gaussian loss's log_std) must be [", out, "] (the network's outputs)",
                        allow_per_task ? " or [T, " + std::to_string(out) + "] (per task)" : std::string(), ", got ",
                        p.sizes());
      TORCH_CHECK_VALUE(!per_task || p.size(0) == tasks, op, ": params[", i, "] is per task with ", p.size(0),
                        " tasks (leading dimension), but ", ref_name, " has T = ", tasks, ", got shape ", p.sizes());
      call.per_task.push_back(per_task);
      d.loss_param_numel = out;
      break;
    }
    const int64_t l = static_cast<int64_t>(i / 2);
    const bool weight = i % 2 == 0;
    const int64_t rank = weight ? 2 : 1;
    const char* shape = weight ? "[out, in]" : "[out]";
    if (allow_per_task) {
      TORCH_CHECK_VALUE(p.dim() == rank || p.dim() == rank + 1, op, ": params[", i, "] (layer ", l + 1, "'s ",
                  weight ? "weight" : "bias", ") must be ", shape, " (shared) or [T, ", shape + 1, " (per task), got ",
                  p.sizes());
    } else {
      TORCH_CHECK_VALUE(p.dim() == rank, op, ": params[", i, "] (layer ", l + 1, "'s ", weight ? "weight" : "bias",
                  ") must be a shared ", shape, " tensor (the meta-parameters have no task dimension), got ",
                  p.sizes());
    }
    const bool per_task = p.dim() == rank + 1;
    if (per_task) {
      TORCH_CHECK_VALUE(p.size(0) == tasks, op, ": params[", i, "] is per task with ", p.size(0),
                  " tasks (leading dimension), but ", ref_name, " has T = ", tasks, ", got shape ", p.sizes());
    }
    call.per_task.push_back(per_task);
    const auto s = per_task ? p.sizes().slice(1) : p.sizes();
    if (weight) {
      if (l == 0) {
        d.width[0] = s[1];
      } else {
        TORCH_CHECK_VALUE(s[1] == d.width[l], op, ": params[", i, "] is ", p.sizes(), " but must have ", d.width[l],
                    " input features, the outputs of params[", i - 2, "] ", params[i - 2].sizes());
      }
      d.width[l + 1] = s[0];
    } else {
      TORCH_CHECK_VALUE(s[0] == d.width[l + 1], op, ": params[", i, "] must be [", d.width[l + 1], "]",
                  allow_per_task ? " (shared) or [T, " + std::to_string(d.width[l + 1]) + "] (per task)" : "",
                  " to match params[", i - 1, "] ", params[i - 1].sizes(), ", got ", p.sizes());
    }
  }
  d.set_offsets();
  return call;
}

// x [T, K, in]; tasks < 0 takes T from x.
inline void check_mlp_input(const char* op, const at::Tensor& x, const char* name, const MlpDims& d, int64_t tasks,
                            at::TensorList params) {
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(2) == d.width[0] && (tasks < 0 || x.size(0) == tasks), op, ": ", name,
              " must be [T, K, in] with ", tasks < 0 ? std::string() : "T = " + std::to_string(tasks) + ", ",
              "in = ", d.width[0], " (params[0] is ", params[0].sizes(), "), got ", x.sizes());
}

// y for x [T, K, in]: mse [T, K, out] of x's dtype, ce [T, K] int64 class indices in [0, out).
inline void check_mlp_target(const char* op, const at::Tensor& y, const char* name, const at::Tensor& x,
                             const char* x_name, const MlpConfig& c, at::TensorList params) {
  const int64_t out = c.dims.output_width();
  const auto& last = params[2 * c.dims.layers - 2];
  TORCH_CHECK_VALUE(y.device() == x.device(), op, ": ", name, " is on ", y.device(), " but ", x_name, " is on ", x.device());
  if (c.loss != Loss::kCrossEntropy) {  // real targets: mse's values, gaussian's actions
    const char* loss = c.loss == Loss::kMse ? "mse" : "gaussian";
    TORCH_CHECK_VALUE(y.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", y.scalar_type(), " but ", x_name,
                " has dtype ", x.scalar_type(), " (loss ", loss, " takes real targets)");
    TORCH_CHECK_VALUE(y.dim() == 3 && y.size(0) == x.size(0) && y.size(1) == x.size(1) && y.size(2) == out, op, ": ", name,
                " must be [T, K, out] = [", x.size(0), ", ", x.size(1), ", ", out, "] for loss ", loss, " (", x_name,
                " is ", x.sizes(), ", params[", 2 * c.dims.layers - 2, "] is ", last.sizes(), "), got ", y.sizes());
    return;
  }
  TORCH_CHECK_VALUE(y.scalar_type() == at::kLong, op, ": ", name, " must hold int64 class indices for loss ce, got dtype ",
              y.scalar_type());
  TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == x.size(1), op, ": ", name, " must be [T, K] = [",
              x.size(0), ", ", x.size(1), "] (", x_name, " is ", x.sizes(), "), got ", y.sizes());
  if (y.numel() == 0 || y.device().type() != at::kCPU) return;  // values are checked where it costs no sync
  const at::Tensor yc = y.contiguous();
  const int64_t* cls = yc.data_ptr<int64_t>();
  for (int64_t j = 0; j < yc.numel(); ++j) {
    TORCH_CHECK_VALUE(cls[j] >= 0 && cls[j] < out, op, ": ", name, " must hold class indices in [0, ", out, ") (params[",
                2 * c.dims.layers - 2, "] is ", last.sizes(), "), got ", cls[j], " at ", name, "[", j / y.size(1), ", ",
                j % y.size(1), "]");
  }
}

// A tensor (a rate, a weight, mlp_maml's data) holds no nan or inf; checked where that costs no device sync (CPU
// tensors).
// (A loop over the elements: at::isfinite(t).all() would cost more than a small meta-iteration's arithmetic.)
inline void check_finite_on_cpu(const char* op, const at::Tensor& t, const std::string& name) {
  if (!t.device().is_cpu()) return;
  const at::Tensor values = t.contiguous();
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "check_finite_on_cpu", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    for (int64_t i = 0; i < values.numel() && finite; ++i) finite = std::isfinite(static_cast<double>(v[i]));
  });
  TORCH_CHECK_VALUE(finite, op, ": ", name, " must be finite (it holds nan or inf)");
}

// Per-row weights of the loss (optional): [T, K] for x [T, K, in], x's dtype and device, finite.
inline void check_mlp_row_weights(const char* op, const std::optional<at::Tensor>& weights, const char* name,
                                  const at::Tensor& x, const char* x_name) {
  if (!weights.has_value() || !weights->defined()) return;
  const at::Tensor& w = *weights;
  check_same_device_dtype(op, w, name, x, x_name);
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == x.size(0) && w.size(1) == x.size(1), op, ": ", name,
                    " (one weight per row) must be [T, K] = [", x.size(0), ", ", x.size(1), "] (", x_name, " is ",
                    x.sizes(), "), got ", w.sizes());
  check_finite_on_cpu(op, w, name);
}

inline MlpCall check_mlp_loss_grad(const char* op, at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                   int64_t activation, double act_param, int64_t loss,
                                   const std::optional<at::Tensor>& weights) {
  check_mlp_codes(op, activation, act_param, loss);
  check_mlp_floating(op, x, "x");
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be [T, K, in], got ", x.sizes());
  MlpCall call = check_mlp_params(op, params, x.size(0), x, "x", static_cast<Loss>(loss));
  call.config.activation = static_cast<Activation>(activation);
  call.config.act_param = act_param;
  call.config.loss = static_cast<Loss>(loss);
  check_mlp_input(op, x, "x", call.config.dims, -1, params);
  check_mlp_target(op, y, "y", x, "x", call.config, params);
  check_mlp_row_weights(op, weights, "weights", x, "x");
  return call;
}

inline void check_mlp_vectors(const char* op, at::TensorList vectors, at::TensorList params, const MlpCall& call,
                              const at::Tensor& x) {
  TORCH_CHECK_VALUE(vectors.size() == params.size(), op, ": vectors must hold one tensor per parameter (", params.size(),
              "), got ", vectors.size());
  for (size_t i = 0; i < vectors.size(); ++i) {
    const at::Tensor& v = vectors[i];
    check_same_device_dtype(op, v, indexed("vectors", i), x, "x");
    const auto s = call.per_task[i] ? params[i].sizes().slice(1) : params[i].sizes();
    std::vector<int64_t> want{call.tasks};
    want.insert(want.end(), s.begin(), s.end());
    TORCH_CHECK_VALUE(v.sizes() == at::IntArrayRef(want), op, ": vectors[", i, "] must be [T, *S_", i, "] = ",
                at::IntArrayRef(want), " (params[", i, "] is ", params[i].sizes(), "), got ", v.sizes());
  }
}

// _mlp_hvp_from_passes's passes: [T, 4 K W] (z, h, dz, dh of every task, W the sum of the layers' widths) of x's
// dtype and device.
inline void check_mlp_passes(const char* op, const at::Tensor& passes, const MlpCall& call, const at::Tensor& x) {
  check_same_device_dtype(op, passes, "passes", x, "x");
  const int64_t per_task = 4 * x.size(1) * call.config.dims.layer_outputs_width();
  TORCH_CHECK_VALUE(passes.dim() == 2 && passes.size(0) == call.tasks && passes.size(1) == per_task, op,
                    ": passes must be [T, 4 K W] = [", call.tasks, ", ", per_task,
                    "] (_mlp_passes' of these params and x), got ", passes.sizes());
}

// mlp_maml's lrs: lrs[i] is [N] or [N, *S_i].
inline std::vector<bool> check_mlp_maml_lrs(const char* op, at::TensorList lrs, at::TensorList params, int64_t steps) {
  TORCH_CHECK_VALUE(lrs.size() == params.size(), op, ": lrs must hold one tensor per parameter (", params.size(), "), got ",
              lrs.size());
  std::vector<bool> per_element;
  for (size_t i = 0; i < lrs.size(); ++i) {
    const at::Tensor& lr = lrs[i];
    check_same_device_dtype(op, lr, indexed("lrs", i), params[0], "params[0]");
    std::vector<int64_t> full{steps};
    full.insert(full.end(), params[i].sizes().begin(), params[i].sizes().end());
    const bool is_per_tensor = lr.dim() == 1 && lr.size(0) == steps;
    const bool is_per_element = lr.sizes() == at::IntArrayRef(full);
    TORCH_CHECK_VALUE(is_per_tensor || is_per_element, op, ": lrs[", i, "] must be [N] = [", steps,
                "] (one rate per step) or [N, *S_", i, "] = ", at::IntArrayRef(full),
                " (one rate per element per step), N = step_weights.numel(), got ", lr.sizes());
    check_finite_on_cpu(op, lr, indexed("lrs", i));
    per_element.push_back(!is_per_tensor);
  }
  return per_element;
}

// mlp_maml's optional per-row weights of the support and query losses ([T, Ks], [T, Kq]: common/losses.h).
struct MamlRowWeights {
  std::optional<at::Tensor> support, query;
};

// All of mlp_maml's arguments: params shared only, xs/xq [T, K, in], ys/yq, step_weights (N >= 1 floating values on
// the CPU or the params' device), lrs [N] or [N, *S_i], the rows' weights.
struct MlpMamlCall {
  MlpCall call;
  int64_t steps = 0;
  std::vector<bool> lr_per_element;
};

inline MlpMamlCall check_mlp_maml(const char* op, at::TensorList params, const at::Tensor& xs, const at::Tensor& ys,
                                  const at::Tensor& xq, const at::Tensor& yq, at::TensorList lrs,
                                  const at::Tensor& step_weights, int64_t activation, double act_param, int64_t loss,
                                  const MamlRowWeights& row_weights) {
  check_mlp_codes(op, activation, act_param, loss);
  TORCH_CHECK_VALUE(!params.empty(), op, ": params must be [W_1, b_1, ..., W_L, b_L], got an empty list");
  check_mlp_floating(op, params[0], "params[0]");
  MlpMamlCall m;
  m.call = check_mlp_params(op, params, -1, params[0], "params[0]", static_cast<Loss>(loss));
  MlpConfig& c = m.call.config;
  c.activation = static_cast<Activation>(activation);
  c.act_param = act_param;
  c.loss = static_cast<Loss>(loss);
  check_same_device_dtype(op, xs, "xs", params[0], "params[0]");
  check_mlp_input(op, xs, "xs", c.dims, -1, params);
  const int64_t tasks = xs.size(0);
  m.call.tasks = tasks;
  check_same_device_dtype(op, xq, "xq", params[0], "params[0]");
  check_mlp_input(op, xq, "xq", c.dims, tasks, params);
  check_mlp_target(op, ys, "ys", xs, "xs", c, params);
  check_mlp_target(op, yq, "yq", xq, "xq", c, params);
  check_mlp_row_weights(op, row_weights.support, "support_weights", xs, "xs");
  check_mlp_row_weights(op, row_weights.query, "query_weights", xq, "xq");
  // On the CPU whatever the params' device: the host then reads which query passes to run without waiting for the GPU.
  TORCH_CHECK_VALUE(step_weights.device() == params[0].device() || step_weights.device().is_cpu(), op,
                    ": step_weights must be on the CPU or on params[0]'s device (", params[0].device(), "), got ",
                    step_weights.device());
  TORCH_CHECK_VALUE(is_kernel_float(step_weights.scalar_type()), op,
                    ": step_weights must be a floating-point tensor (float64, float32, float16 or bfloat16), got ",
                    step_weights.scalar_type());
  m.steps = step_weights.numel();
  TORCH_CHECK_VALUE(m.steps >= 1, op, ": step_weights must hold one weight per inner step (N >= 1), got shape ",
              step_weights.sizes());
  check_finite_on_cpu(op, step_weights, "step_weights");
  m.lr_per_element = check_mlp_maml_lrs(op, lrs, params, m.steps);
  // The data, as the kernel is about to read it (a CPU loop, cheaper than a separate pass from Python).
  check_finite_on_cpu(op, xs, "xs");
  check_finite_on_cpu(op, xq, "xq");
  if (c.loss != Loss::kCrossEntropy) {
    check_finite_on_cpu(op, ys, "ys");
    check_finite_on_cpu(op, yq, "yq");
  }
  return m;
}

}  // namespace mamlext
