// CPU kernels of the fused MLP ops mlp_loss_grad, mlp_hvp and mlp_maml: validation and allocation on the host, then
// one at::parallel_for over tasks, each chunk of tasks with its own scratch buffer; the per-task math is
// common/mlp_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/mlp_checks.h"
#include "common/mlp_math.h"

namespace mamlext {
namespace {

// Multiply-adds a parallel chunk should hold at least, so that small calls are not spread over the thread pool.
constexpr int64_t kMinWorkPerChunk = 1 << 16;

int64_t task_grain(int64_t tasks, int64_t work_per_task) {
  const int64_t grain = (kMinWorkPerChunk + std::max<int64_t>(work_per_task, 1) - 1) / std::max<int64_t>(work_per_task, 1);
  return std::clamp<int64_t>(grain, 1, std::max<int64_t>(tasks, 1));
}

// Multiply-adds of one forward pass over `rows` rows.
int64_t forward_work(const MlpDims& d, int64_t rows) { return rows * d.total_param_numel(); }

// Tensors shaped like the parameters, each shared (stride 0) or per task ([T, *S_i], stride numel(S_i)).
template <typename ptr_t>
struct TaskBatched {
  MlpParams<ptr_t> base;
  int64_t stride[2 * kMlpMaxLayers] = {};

  MlpParams<ptr_t> at(int64_t t) const {
    MlpParams<ptr_t> p;
    for (int i = 0; i < 2 * kMlpMaxLayers; ++i) p.ptr[i] = base.ptr[i] == nullptr ? nullptr : base.ptr[i] + t * stride[i];
    return p;
  }
};

template <typename scalar_t>
TaskBatched<const scalar_t*> batched_inputs(const std::vector<at::Tensor>& ts, const MlpCall& call) {
  TaskBatched<const scalar_t*> b;
  for (size_t i = 0; i < ts.size(); ++i) {
    b.base.ptr[i] = ts[i].data_ptr<scalar_t>();
    b.stride[i] = call.per_task[i] ? call.config.dims.param_numel(static_cast<int>(i)) : 0;
  }
  return b;
}

// Per-task tensors [T, ...]: stride = elements per task.
template <typename scalar_t>
TaskBatched<scalar_t*> batched_outputs(const std::vector<at::Tensor>& ts) {
  TaskBatched<scalar_t*> b;
  for (size_t i = 0; i < ts.size(); ++i) {
    b.base.ptr[i] = ts[i].data_ptr<scalar_t>();
    b.stride[i] = ts[i].size(0) == 0 ? 0 : ts[i].numel() / ts[i].size(0);
  }
  return b;
}

std::vector<at::Tensor> contiguous(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// Outputs [T, *shape_i] for each tensor, shape_i its shape without a task dimension.
std::vector<at::Tensor> per_task_outputs(at::TensorList like, const std::vector<bool>& per_task, int64_t tasks,
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

// Task t's targets in y ([T, K, out] values or [T, K] classes, contiguous).
template <typename scalar_t>
struct TaskTargets {
  const scalar_t* values = nullptr;
  const int64_t* classes = nullptr;
  int64_t stride = 0;

  TaskTargets(const at::Tensor& y, Loss loss) {
    stride = y.size(0) == 0 ? 0 : y.numel() / y.size(0);
    if (loss == Loss::kMse) {
      values = y.data_ptr<scalar_t>();
    } else {
      classes = y.data_ptr<int64_t>();
    }
  }
  LossTarget<scalar_t> at(int64_t t) const {
    LossTarget<scalar_t> target;
    if (values != nullptr) target.values = values + t * stride;
    if (classes != nullptr) target.classes = classes + t * stride;
    return target;
  }
};

// The per-task loops of each parallel chunk, given the chunk's scratch buffer.
template <typename scalar_t>
struct LossGradArgs {
  MlpConfig config;
  int64_t rows = 0;
  const scalar_t* x = nullptr;
  TaskBatched<const scalar_t*> params;
  const TaskTargets<scalar_t>* y = nullptr;
  TaskBatched<scalar_t*> out;      // grads (mlp_loss_grad) or H v (mlp_hvp)
  TaskBatched<scalar_t*> vectors;  // mlp_hvp's v
  scalar_t* losses = nullptr;      // mlp_loss_grad's
};

template <typename scalar_t>
void loss_grad_tasks(const LossGradArgs<scalar_t>& g, int64_t begin, int64_t end, scalar_t* scratch) {
  const MlpConfig& c = g.config;
  MlpActivations<scalar_t> a = carve_activations(c.dims, g.rows, false, scratch);
  for (int64_t t = begin; t < end; ++t) {
    const MlpParams<scalar_t*> grads = g.out.at(t);
    g.losses[t] = mlp_loss_and_grad(c, g.rows, g.x + t * g.rows * c.dims.width[0], g.y->at(t), g.params.at(t), a,
                                    &grads);
  }
}

template <typename scalar_t>
void hvp_tasks(const LossGradArgs<scalar_t>& g, int64_t begin, int64_t end, scalar_t* scratch) {
  const MlpConfig& c = g.config;
  MlpActivations<scalar_t> a = carve_activations(c.dims, g.rows, true, scratch);
  for (int64_t t = begin; t < end; ++t) {
    const scalar_t* x_t = g.x + t * g.rows * c.dims.width[0];
    const MlpParams<const scalar_t*> theta_t = g.params.at(t);
    mlp_loss_and_grad(c, g.rows, x_t, g.y->at(t), theta_t, a, static_cast<const MlpParams<scalar_t*>*>(nullptr));
    mlp_hessian_vector(c, g.rows, x_t, theta_t, as_const(g.vectors.at(t)), a, g.out.at(t));
  }
}

template <typename scalar_t>
struct MamlArgs {
  MlpConfig config;
  int64_t steps = 0, support_rows = 0, query_rows = 0;
  bool first_order = false;
  const scalar_t* step_weights = nullptr;
  const scalar_t* xs = nullptr;
  const scalar_t* xq = nullptr;
  const TaskTargets<scalar_t>* ys = nullptr;
  const TaskTargets<scalar_t>* yq = nullptr;
  MlpParams<const scalar_t*> theta0;
  MamlLrs<scalar_t> lrs;
  TaskBatched<scalar_t*> meta_grads, lr_grads;
  scalar_t* query_losses = nullptr;
};

template <typename scalar_t>
void maml_tasks(const MamlArgs<scalar_t>& m, int64_t begin, int64_t end, scalar_t* buffer) {
  const MlpConfig& c = m.config;
  const int64_t in = c.dims.width[0];
  MamlScratch<scalar_t> scratch =
      carve_maml_scratch(c.dims, m.steps, m.support_rows, m.query_rows, m.first_order, buffer);
  for (int64_t t = begin; t < end; ++t) {
    m.query_losses[t] = mlp_maml_task(c, m.steps, m.step_weights, m.first_order, m.support_rows,
                                      m.xs + t * m.support_rows * in, m.ys->at(t), m.query_rows,
                                      m.xq + t * m.query_rows * in, m.yq->at(t), m.theta0, m.lrs, scratch,
                                      m.meta_grads.at(t), m.lr_grads.at(t));
  }
}


std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_loss_grad_cpu(at::TensorList params, const at::Tensor& x,
                                                                  const at::Tensor& y, int64_t activation,
                                                                  double act_param, int64_t loss) {
  const MlpCall call = check_mlp_loss_grad("mlp_loss_grad", params, x, y, activation, act_param, loss);
  const MlpConfig& c = call.config;
  const int64_t tasks = call.tasks, rows = x.size(1);
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const std::vector<at::Tensor> ps = contiguous(params);
  at::Tensor losses = at::empty({tasks}, x.options());
  std::vector<at::Tensor> grads = per_task_outputs(params, call.per_task, tasks, x.options());
  if (tasks == 0) return {losses, grads};

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_loss_grad_cpu", [&] {
    const TaskTargets<scalar_t> target(yc, c.loss);
    LossGradArgs<scalar_t> args;
    args.config = c;
    args.rows = rows;
    args.x = xc.data_ptr<scalar_t>();
    args.params = batched_inputs<scalar_t>(ps, call);
    args.y = &target;
    args.out = batched_outputs<scalar_t>(grads);
    args.losses = losses.data_ptr<scalar_t>();
    const int64_t scratch_numel = mlp_activations_numel(c.dims, rows, false);
    at::parallel_for(0, tasks, task_grain(tasks, 3 * forward_work(c.dims, rows)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(scratch_numel);
      loss_grad_tasks(args, begin, end, scratch.data());
    });
  });
  return {losses, grads};
}

std::vector<at::Tensor> mlp_hvp_cpu(at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                    const at::Tensor& y, int64_t activation, double act_param, int64_t loss) {
  const MlpCall call = check_mlp_loss_grad("mlp_hvp", params, x, y, activation, act_param, loss);
  check_mlp_vectors("mlp_hvp", vectors, params, call, x);
  const MlpConfig& c = call.config;
  const int64_t tasks = call.tasks, rows = x.size(1);
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const std::vector<at::Tensor> ps = contiguous(params), vs = contiguous(vectors);
  std::vector<at::Tensor> out = per_task_outputs(params, call.per_task, tasks, x.options());
  if (tasks == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_hvp_cpu", [&] {
    const TaskTargets<scalar_t> target(yc, c.loss);
    LossGradArgs<scalar_t> args;
    args.config = c;
    args.rows = rows;
    args.x = xc.data_ptr<scalar_t>();
    args.params = batched_inputs<scalar_t>(ps, call);
    args.y = &target;
    args.out = batched_outputs<scalar_t>(out);
    args.vectors = batched_outputs<scalar_t>(vs);
    const int64_t scratch_numel = mlp_activations_numel(c.dims, rows, true);
    at::parallel_for(0, tasks, task_grain(tasks, 8 * forward_work(c.dims, rows)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(scratch_numel);
      hvp_tasks(args, begin, end, scratch.data());
    });
  });
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_maml_cpu(
    at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList lrs, const at::Tensor& step_weights, bool first_order, int64_t activation, double act_param,
    int64_t loss) {
  const char* op = "mlp_maml";
  check_mlp_codes(op, activation, act_param, loss);
  TORCH_CHECK(!params.empty(), op, ": params must be [W_1, b_1, ..., W_L, b_L], got an empty list");
  check_mlp_floating(op, params[0], "params[0]");
  MlpCall call = check_mlp_params(op, params, -1, params[0], "params[0]");
  MlpConfig& c = call.config;
  c.activation = static_cast<Activation>(activation);
  c.act_param = act_param;
  c.loss = static_cast<Loss>(loss);
  check_same_device_dtype(op, xs, "xs", params[0], "params[0]");
  check_mlp_input(op, xs, "xs", c.dims, -1, params);
  const int64_t tasks = xs.size(0);
  call.tasks = tasks;
  check_same_device_dtype(op, xq, "xq", params[0], "params[0]");
  check_mlp_input(op, xq, "xq", c.dims, tasks, params);
  check_mlp_target(op, ys, "ys", xs, "xs", c, params);
  check_mlp_target(op, yq, "yq", xq, "xq", c, params);
  TORCH_CHECK(step_weights.device() == params[0].device(), op, ": step_weights is on ", step_weights.device(),
              " but params[0] is on ", params[0].device());
  TORCH_CHECK(at::isFloatingType(step_weights.scalar_type()), op, ": step_weights must be a floating-point tensor, got ",
              step_weights.scalar_type());
  const int64_t steps = step_weights.numel();
  TORCH_CHECK(steps >= 1, op, ": step_weights must hold one weight per inner step (N >= 1), got shape ",
              step_weights.sizes());
  const std::vector<bool> lr_per_element = check_mlp_maml_lrs(op, lrs, params, steps);

  const int64_t support_rows = xs.size(1), query_rows = xq.size(1);
  const auto options = params[0].options();
  const at::Tensor xsc = xs.contiguous(), ysc = ys.contiguous(), xqc = xq.contiguous(), yqc = yq.contiguous();
  const at::Tensor weights = step_weights.reshape({-1}).to(params[0].scalar_type()).contiguous();
  const std::vector<at::Tensor> ps = contiguous(params), lrc = contiguous(lrs);
  at::Tensor query_losses = at::empty({tasks}, options);
  std::vector<at::Tensor> meta_grads = per_task_outputs(params, call.per_task, tasks, options);
  std::vector<at::Tensor> lr_grads = per_task_outputs(lrs, std::vector<bool>(lrs.size(), false), tasks, options);
  if (tasks == 0) return {query_losses, meta_grads, lr_grads};

  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "mlp_maml_cpu", [&] {
    const TaskTargets<scalar_t> support_target(ysc, c.loss), query_target(yqc, c.loss);
    MamlArgs<scalar_t> args;
    args.config = c;
    args.steps = steps;
    args.support_rows = support_rows;
    args.query_rows = query_rows;
    args.first_order = first_order;
    args.step_weights = weights.data_ptr<scalar_t>();
    args.xs = xsc.data_ptr<scalar_t>();
    args.xq = xqc.data_ptr<scalar_t>();
    args.ys = &support_target;
    args.yq = &query_target;
    for (size_t i = 0; i < ps.size(); ++i) {
      args.theta0.ptr[i] = ps[i].data_ptr<scalar_t>();
      args.lrs.lr[i] = lrc[i].data_ptr<scalar_t>();
      args.lrs.per_element[i] = lr_per_element[i];
    }
    args.meta_grads = batched_outputs<scalar_t>(meta_grads);
    args.lr_grads = batched_outputs<scalar_t>(lr_grads);
    args.query_losses = query_losses.data_ptr<scalar_t>();
    const int64_t scratch_numel = mlp_maml_scratch_numel(c.dims, steps, support_rows, query_rows, first_order);
    const int64_t work = steps * ((first_order ? 3 : 8) * forward_work(c.dims, support_rows) +
                                  3 * forward_work(c.dims, query_rows));
    at::parallel_for(0, tasks, task_grain(tasks, work), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(scratch_numel);
      maml_tasks(args, begin, end, scratch.data());
    });
  });
  return {query_losses, meta_grads, lr_grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CPU, m) {
  m.impl("mlp_loss_grad", &mlp_loss_grad_cpu);
  m.impl("mlp_hvp", &mlp_hvp_cpu);
  m.impl("mlp_maml", &mlp_maml_cpu);
}

}  // namespace mamlext
