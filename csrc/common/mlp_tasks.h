// The per-task kernels' view of the fused MLP ops' tensors (raw pointers per task) and their loops over tasks, shared
// by the CPU per-task kernel (cpu/mlp.cpp, one task per thread or a team of threads per task) and the CUDA block
// kernel (cuda/mlp_block.cu, one thread block per task). The host half prepares mlp_maml's tensors: checks,
// contiguous inputs, outputs.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/mlp_checks.h"
#include "common/mlp_maml_math.h"
#include "common/mlp_passes.h"

namespace mamlext {

// Tensors shaped like the parameters, each shared (stride 0) or per task ([T, *S_i], stride numel(S_i)): the table
// that task t's MlpParams views read (it must outlive them; in a kernel, the kernel's arguments hold it).
template <typename ptr_t>
struct TaskBatched {
  ptr_t ptr[kMlpMaxParams] = {};
  int64_t stride[kMlpMaxParams] = {};

  C10_HOST_DEVICE MlpParams<ptr_t> at(int64_t t) const { return MlpParams<ptr_t>(ptr, stride, t); }
};

// The targets y ([T, K, out] values or [T, K] classes) and row weights ([T, K], or undefined) of a call, both
// contiguous.
template <typename scalar_t>
TaskTargets<scalar_t> task_targets(const at::Tensor& y, Loss loss, const at::Tensor& weights) {
  TaskTargets<scalar_t> targets;
  targets.stride = y.size(0) == 0 ? 0 : y.numel() / y.size(0);
  targets.rows = y.dim() >= 2 ? y.size(1) : 0;
  if (loss == Loss::kCrossEntropy) {
    targets.classes = y.data_ptr<int64_t>();
  } else {
    targets.values = y.data_ptr<scalar_t>();
  }
  if (weights.defined()) targets.weights = weights.data_ptr<scalar_t>();
  return targets;
}

// The widths of the network in params (shared [out, in] or per task [T, out, in] weights, the loss's parameter
// last when their number is odd), for choosing a kernel before the ops' own checks, which run on every kernel: reads
// only shapes that exist.
inline MlpDims peek_mlp_dims(at::TensorList params) {
  MlpDims d;
  const int64_t layers = std::min<int64_t>(static_cast<int64_t>(params.size() / 2), kMlpMaxLayers);
  d.layers = static_cast<int>(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor& W = params[2 * l];
    if (W.dim() < 2) return MlpDims();
    d.width[l] = W.size(-1);
    d.width[l + 1] = W.size(-2);
  }
  if (params.size() % 2 == 1) d.loss_param_numel = d.width[layers];  // gaussian's log_std, last
  d.set_offsets();
  return d;
}

// Size dim of an input x [T, K, in], 0 when x has another rank (the op's checks then fail on every kernel).
inline int64_t peek_input_size(const at::Tensor& x, int64_t dim) { return x.dim() == 3 ? x.size(dim) : 0; }

// Per-task tensors [T, ...]: stride = elements per task.
template <typename scalar_t>
TaskBatched<scalar_t*> batched_outputs(const std::vector<at::Tensor>& ts) {
  TaskBatched<scalar_t*> b;
  for (size_t i = 0; i < ts.size(); ++i) {
    b.ptr[i] = ts[i].data_ptr<scalar_t>();
    b.stride[i] = ts[i].size(0) == 0 ? 0 : ts[i].numel() / ts[i].size(0);
  }
  return b;
}

// An optional argument as a contiguous tensor, undefined when absent.
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

inline std::vector<at::Tensor> contiguous(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// Outputs [T, *shape_i] for each tensor, shape_i its shape without a task dimension.
inline std::vector<at::Tensor> per_task_outputs(at::TensorList like, const std::vector<bool>& per_task, int64_t tasks,
                                                const at::TensorOptions& options) {
  std::vector<at::Tensor> out;
  out.reserve(like.size());
  for (size_t i = 0; i < like.size(); ++i) {
    const auto s = per_task[i] ? like[i].sizes().slice(1) : like[i].sizes();
    std::vector<int64_t> shape{tasks};
    shape.insert(shape.end(), s.begin(), s.end());
    out.push_back(at::empty(shape, options));
  }
  return out;
}

template <typename scalar_t>
TaskBatched<const scalar_t*> batched_inputs(const std::vector<at::Tensor>& ts, const MlpCall& call) {
  TaskBatched<const scalar_t*> b;
  for (size_t i = 0; i < ts.size(); ++i) {
    b.ptr[i] = ts[i].data_ptr<scalar_t>();
    b.stride[i] = call.per_task[i] ? call.config.dims.param_numel(static_cast<int>(i)) : 0;
  }
  return b;
}

// ---------------------------------------------------------------------------------------------------------------
// mlp_loss_grad and mlp_hvp

// Elements of one task's kept passes (_mlp_passes, _mlp_hvp_from_passes): z, h, dz, dh of every layer.
C10_HOST_DEVICE inline int64_t mlp_passes_numel(const MlpDims& d, int64_t rows) {
  return mlp_activations_numel(d, rows, false);
}

// An mlp_loss_grad call (hvp: an mlp_hvp call, with vectors) checked, its inputs made contiguous and its outputs
// allocated.
struct LossGradTensors {
  bool hvp;
  bool gauss_newton;  // mlp_hvp's Gauss-Newton product instead of H v
  // Each task's passes [T, mlp_passes_numel], or undefined (the scratch holds them): mlp_loss_grad writes them there,
  // mlp_hvp reads them from there instead of recomputing them (the caller set them: passes at the same params, x,
  // y and weights).
  at::Tensor passes;
  MlpCall call;
  at::Tensor x, y;
  at::Tensor weights;  // the rows' [T, K], or undefined
  std::vector<at::Tensor> params, vectors;
  at::Tensor losses;            // mlp_loss_grad's
  std::vector<at::Tensor> out;  // the gradients (mlp_loss_grad) or H v (mlp_hvp)

  LossGradTensors(bool hvp_in, at::TensorList params_in, at::TensorList vectors_in, const at::Tensor& x_in,
                  const at::Tensor& y_in, int64_t activation, double act_param, int64_t loss,
                  const std::optional<at::Tensor>& weights_in, bool gauss_newton_in = false)
      : hvp(hvp_in),
        gauss_newton(gauss_newton_in),
        call(check_mlp_loss_grad(hvp_in ? "mlp_hvp" : "mlp_loss_grad", params_in, x_in, y_in, activation, act_param,
                                 loss, weights_in)),
        x(x_in.contiguous()),
        y(y_in.contiguous()),
        weights(contiguous_or_undefined(weights_in)),
        params(contiguous(params_in)) {
    if (hvp) {
      check_mlp_vectors("mlp_hvp", vectors_in, params_in, call, x_in);
      vectors = contiguous(vectors_in);
    } else {
      losses = at::empty({call.tasks}, x_in.options());
    }
    out = per_task_outputs(params_in, call.per_task, call.tasks, x_in.options());
  }
};

// Elements of the activations that one task's scratch buffer for mlp_loss_grad (hvp: mlp_hvp) over `rows` rows holds:
// all of them, or with kept passes only the R-passes' (hvp) or none.
C10_HOST_DEVICE inline int64_t mlp_loss_grad_scratch_activations(const MlpDims& d, int64_t rows, bool hvp,
                                                                  bool kept_passes) {
  if (!kept_passes) return mlp_activations_numel(d, rows, hvp);
  return hvp ? mlp_activations_numel(d, rows, true) - mlp_passes_numel(d, rows) : 0;
}

// Elements of one task's scratch buffer: its activations and the forward weights of theta (and of v).
C10_HOST_DEVICE inline int64_t mlp_loss_grad_scratch_numel(const MlpDims& d, int64_t rows, bool hvp,
                                                           bool kept_passes) {
  return mlp_loss_grad_scratch_activations(d, rows, hvp, kept_passes) + (hvp ? 2 : 1) * mlp_transposed_numel(d);
}

// mlp_loss_grad's or mlp_hvp's arguments as the per-task loops read them.
template <typename scalar_t>
struct LossGradArgs {
  bool hvp = false;
  bool gauss_newton = false;
  MlpConfig config;
  int64_t rows = 0;
  const scalar_t* x = nullptr;
  TaskBatched<const scalar_t*> params;
  TaskTargets<scalar_t> y;
  TaskBatched<scalar_t*> out;      // grads (mlp_loss_grad) or H v (mlp_hvp)
  TaskBatched<scalar_t*> vectors;  // mlp_hvp's v
  scalar_t* losses = nullptr;      // mlp_loss_grad's
  scalar_t* passes = nullptr;      // LossGradTensors::passes, or null

  explicit LossGradArgs(const LossGradTensors& g)
      : hvp(g.hvp),
        gauss_newton(g.gauss_newton),
        config(g.call.config),
        rows(g.x.size(1)),
        x(g.x.data_ptr<scalar_t>()),
        params(batched_inputs<scalar_t>(g.params, g.call)),
        y(task_targets<scalar_t>(g.y, config.loss, g.weights)),
        out(batched_outputs<scalar_t>(g.out)) {
    if (hvp) {
      vectors = batched_outputs<scalar_t>(g.vectors);
    } else {
      losses = g.losses.data_ptr<scalar_t>();
    }
    if (g.passes.defined()) passes = g.passes.data_ptr<scalar_t>();
  }

  C10_HOST_DEVICE int64_t scratch_numel() const {
    return mlp_loss_grad_scratch_numel(config.dims, rows, hvp, passes != nullptr);
  }
};

// Tasks first, first + step, ... < end of mlp_loss_grad or mlp_hvp, run by the team with the scratch buffer
// [g.scratch_numel()] that its members share.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void loss_grad_tasks(const Team& team, const LossGradArgs<scalar_t>& g, int64_t first,
                                            int64_t end, int64_t step, scalar_t* scratch) {
  const MlpConfig& c = g.config;
  const bool kept = g.passes != nullptr;
  scalar_t* transposed = scratch + mlp_loss_grad_scratch_activations(c.dims, g.rows, g.hvp, kept);
  for (int64_t t = first; t < end; t += step) {
    const MlpActivations<scalar_t> a =
        kept ? carve_activations_at(c.dims, g.rows, g.passes + t * mlp_passes_numel(c.dims, g.rows),
                                    g.hvp ? scratch : static_cast<scalar_t*>(nullptr))
             : carve_activations(c.dims, g.rows, g.hvp, scratch);
    const scalar_t* x_t = g.x + t * g.rows * c.dims.width[0];
    const MlpParams<const scalar_t*> theta_t = g.params.at(t);
    const MlpForwardWeights<scalar_t> theta_fw = transpose_weights(team, c.dims, theta_t, transposed);
    if (!g.hvp) {
      const MlpParams<scalar_t*> grads = g.out.at(t);
      const scalar_t loss = mlp_loss_and_grad(team, c, g.rows, x_t, g.y.at(t), theta_t, theta_fw, a, &grads);
      if (team.rank() == 0) g.losses[t] = loss;
      continue;
    }
    const MlpParams<const scalar_t*> v_t = as_const(g.vectors.at(t));
    const MlpForwardWeights<scalar_t> v_fw =
        transpose_weights(team, c.dims, v_t, transposed + mlp_transposed_numel(c.dims));
    if (!kept) {
      mlp_loss_and_grad(team, c, g.rows, x_t, g.y.at(t), theta_t, theta_fw, a,
                        static_cast<const MlpParams<scalar_t*>*>(nullptr));
    }
    mlp_hessian_vector(team, c, g.rows, x_t, g.y.at(t), theta_t, theta_fw, v_t, v_fw, a, g.out.at(t),
                       g.gauss_newton);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// mlp_maml

// An mlp_maml call checked, its inputs made contiguous and its outputs allocated.
struct MamlTensors {
  MlpMamlCall checked;
  int64_t support_rows = 0, query_rows = 0;
  at::Tensor xs, ys, xq, yq, step_weights;  // step_weights: [N] in the params' dtype
  at::Tensor support_weights, query_weights;  // the rows' [T, K], or undefined
  std::vector<at::Tensor> params, lrs;
  at::Tensor query_losses;
  std::vector<at::Tensor> meta_grads, lr_grads;

  MamlTensors(at::TensorList params_in, const at::Tensor& xs_in, const at::Tensor& ys_in, const at::Tensor& xq_in,
              const at::Tensor& yq_in, at::TensorList lrs_in, const at::Tensor& step_weights_in,
              int64_t activation, double act_param, int64_t loss, const MamlRowWeights& row_weights)
      : checked(check_mlp_maml("mlp_maml", params_in, xs_in, ys_in, xq_in, yq_in, lrs_in, step_weights_in,
                               activation, act_param, loss, row_weights)),
        support_rows(xs_in.size(1)),
        query_rows(xq_in.size(1)),
        xs(xs_in.contiguous()),
        ys(ys_in.contiguous()),
        xq(xq_in.contiguous()),
        yq(yq_in.contiguous()),
        // Weights on the CPU for params on the GPU: a staged copy, which does not wait for the GPU.
        step_weights(step_weights_in.reshape({-1})
                         .to(params_in[0].device(), params_in[0].scalar_type(), /*non_blocking=*/true)
                         .contiguous()),
        support_weights(contiguous_or_undefined(row_weights.support)),
        query_weights(contiguous_or_undefined(row_weights.query)),
        params(contiguous(params_in)),
        lrs(contiguous(lrs_in)) {
    const auto options = params_in[0].options();
    const int64_t tasks = checked.call.tasks;
    query_losses = at::empty({tasks}, options);
    meta_grads = per_task_outputs(params_in, checked.call.per_task, tasks, options);
    lr_grads = per_task_outputs(lrs_in, std::vector<bool>(lrs_in.size(), false), tasks, options);
  }

  std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> outputs() const {
    return {query_losses, meta_grads, lr_grads};
  }
};

// mlp_maml's arguments as the per-task loop reads them.
template <typename scalar_t>
struct MamlArgs {
  MlpConfig config;
  int64_t steps = 0, support_rows = 0, query_rows = 0;
  bool first_order = false;
  const scalar_t* step_weights = nullptr;
  const scalar_t* xs = nullptr;
  const scalar_t* xq = nullptr;
  TaskTargets<scalar_t> ys, yq;
  TaskBatched<const scalar_t*> theta0;  // shared
  MamlLrs<scalar_t> lrs;
  TaskBatched<scalar_t*> meta_grads, lr_grads;
  scalar_t* query_losses = nullptr;

  MamlArgs(const MamlTensors& m, bool first_order_in)
      : config(m.checked.call.config),
        steps(m.checked.steps),
        support_rows(m.support_rows),
        query_rows(m.query_rows),
        first_order(first_order_in),
        step_weights(m.step_weights.data_ptr<scalar_t>()),
        xs(m.xs.data_ptr<scalar_t>()),
        xq(m.xq.data_ptr<scalar_t>()),
        ys(task_targets<scalar_t>(m.ys, config.loss, m.support_weights)),
        yq(task_targets<scalar_t>(m.yq, config.loss, m.query_weights)),
        meta_grads(batched_outputs<scalar_t>(m.meta_grads)),
        lr_grads(batched_outputs<scalar_t>(m.lr_grads)),
        query_losses(m.query_losses.data_ptr<scalar_t>()) {
    for (size_t i = 0; i < m.params.size(); ++i) {
      theta0.ptr[i] = m.params[i].data_ptr<scalar_t>();
      lrs.lr[i] = m.lrs[i].data_ptr<scalar_t>();
      lrs.per_element[i] = m.checked.lr_per_element[i];
    }
  }

  // Elements of one task's scratch buffer (MamlScratch).
  C10_HOST_DEVICE int64_t scratch_numel() const {
    return mlp_maml_scratch_numel(config.dims, steps, support_rows, query_rows, first_order);
  }
};

// Tasks first, first + step, ... < end of mlp_maml, run by the team with the scratch buffer
// [args.scratch_numel()] that its members share.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void maml_tasks(const Team& team, const MamlArgs<scalar_t>& m, int64_t first, int64_t end,
                                       int64_t step, scalar_t* buffer) {
  const MlpConfig& c = m.config;
  const int64_t in = c.dims.width[0];
  MamlScratch<scalar_t> scratch =
      carve_maml_scratch(c.dims, m.steps, m.support_rows, m.query_rows, m.first_order, buffer);
  const MlpParams<const scalar_t*> theta0 = m.theta0.at(0);
  prepare_maml_scratch(team, c.dims, theta0, scratch);
  for (int64_t t = first; t < end; t += step) {
    const scalar_t query_loss =
        mlp_maml_task(team, c, m.steps, m.step_weights, m.first_order, m.support_rows, m.xs + t * m.support_rows * in,
                      m.ys.at(t), m.query_rows, m.xq + t * m.query_rows * in, m.yq.at(t), theta0, m.lrs, scratch,
                      m.meta_grads.at(t), m.lr_grads.at(t));
    if (team.rank() == 0) m.query_losses[t] = query_loss;
  }
}

}  // namespace mamlext
