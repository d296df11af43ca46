// CPU kernels of the fused MLP ops mlp_loss_grad, mlp_hvp and mlp_maml. Two implementations:
//   per task: validation and allocation on the host, then one at::parallel_for over tasks, each chunk of tasks with
//     its own scratch buffer; the per-task math is common/mlp_math.h;
//   batched:  batched/mlp_batched.h (ATen batched GEMMs over the tasks + the shared element-wise math).
// mlp_cpu_path picks one per call (see there).
#include "cpu/mlp_path.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "batched/mlp_batched.h"
#include "common/mlp_checks.h"
#include "common/mlp_math.h"

namespace mamlext {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Path selection.
//
// The environment variable MAMLEXT_MLP_CPU_PATH, read on every call, forces a path:
//   per_task  the per-task kernel below;   batched  batched/mlp_batched.h;   auto (or unset/empty)  the rule below.
// Rule (auto), from measurements of mlp_maml (second order, float32, 2 cores with OpenMP; 1-40-40-1 ... 1-256-256-1
// and a 784-256-256-5 classifier, K = 10/25, T = 25/250/1000, N = 1/5): with W = T * K * P multiply-adds per
// forward pass of all tasks (P = parameters of the network) and T * P per-task parameter values,
//   batched  iff  K >= 20  and  W >= 2^18  and  T * P <= 2M.
// The per-task kernel, parallel over tasks with one task's matrices in cache, wins almost everywhere: 1.3-2.5x at
// K = 10 (1-40-40-1 T = 25: 0.22 vs 0.34 ms; 1-128-128-1 T = 1000: 63 vs 156 ms) and when T * P is large (the
// batched path streams every [T, *S_i] tensor through memory a few times per step). The batched GEMMs only win,
// by 5-8%, with many rows per task and a moderate footprint (1-256-256-1, K = 25, T = 25: 13.2 vs 14.2 ms).

enum class CpuPath : int { kUnset = 0, kPerTask = 1, kBatched = 2 };

std::atomic<int> last_path{static_cast<int>(CpuPath::kUnset)};

bool batched_is_faster(const MlpDims& d, int64_t tasks, int64_t rows) {
  constexpr int64_t kMinRows = 20;
  constexpr int64_t kMinWork = int64_t(1) << 18;
  constexpr int64_t kMaxFootprint = int64_t(2) << 20;
  const int64_t footprint = tasks * d.total_param_numel();
  return rows >= kMinRows && footprint * rows >= kMinWork && footprint <= kMaxFootprint;
}

// tasks, rows: T and K of x (of xs for mlp_maml).
CpuPath mlp_cpu_path(const MlpDims& d, int64_t tasks, int64_t rows) {
  const char* env = std::getenv("MAMLEXT_MLP_CPU_PATH");
  CpuPath path;
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) {
    path = batched_is_faster(d, tasks, rows) ? CpuPath::kBatched : CpuPath::kPerTask;
  } else if (std::strcmp(env, "per_task") == 0) {
    path = CpuPath::kPerTask;
  } else if (std::strcmp(env, "batched") == 0) {
    path = CpuPath::kBatched;
  } else {
    TORCH_CHECK(false, "mamlext: MAMLEXT_MLP_CPU_PATH must be per_task, batched or auto (or unset), got '", env, "'");
  }
  last_path.store(static_cast<int>(path), std::memory_order_relaxed);
  return path;
}

// Size dim of x [T, K, in] for the rule, 0 when x has another rank (the op's checks then fail on either path).
int64_t peek_size(const at::Tensor& x, int64_t dim) { return x.dim() == 3 ? x.size(dim) : 0; }

// The widths of the network in params (shared [out, in] or per task [T, out, in] weights), for the rule; the ops'
// own checks run later, on either path, so this only reads shapes that exist.
MlpDims peek_dims(at::TensorList params) {
  MlpDims d;
  const int64_t layers = std::min<int64_t>(static_cast<int64_t>(params.size() / 2), kMlpMaxLayers);
  d.layers = static_cast<int>(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor& W = params[2 * l];
    if (W.dim() < 2) return MlpDims();
    d.width[l] = W.size(-1);
    d.width[l + 1] = W.size(-2);
  }
  return d;
}

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
  scalar_t* transposed = scratch + mlp_activations_numel(c.dims, g.rows, false);
  for (int64_t t = begin; t < end; ++t) {
    const MlpParams<scalar_t*> grads = g.out.at(t);
    const MlpParams<const scalar_t*> theta_t = g.params.at(t);
    g.losses[t] = mlp_loss_and_grad(c, g.rows, g.x + t * g.rows * c.dims.width[0], g.y->at(t), theta_t,
                                    transpose_weights(c.dims, theta_t, transposed), a, &grads);
  }
}

template <typename scalar_t>
void hvp_tasks(const LossGradArgs<scalar_t>& g, int64_t begin, int64_t end, scalar_t* scratch) {
  const MlpConfig& c = g.config;
  MlpActivations<scalar_t> a = carve_activations(c.dims, g.rows, true, scratch);
  scalar_t* transposed = scratch + mlp_activations_numel(c.dims, g.rows, true);
  const int64_t transposed_numel = mlp_transposed_numel(c.dims);
  for (int64_t t = begin; t < end; ++t) {
    const scalar_t* x_t = g.x + t * g.rows * c.dims.width[0];
    const MlpParams<const scalar_t*> theta_t = g.params.at(t), v_t = as_const(g.vectors.at(t));
    const MlpForwardWeights<scalar_t> theta_fw = transpose_weights(c.dims, theta_t, transposed);
    const MlpForwardWeights<scalar_t> v_fw = transpose_weights(c.dims, v_t, transposed + transposed_numel);
    mlp_loss_and_grad(c, g.rows, x_t, g.y->at(t), theta_t, theta_fw, a,
                      static_cast<const MlpParams<scalar_t*>*>(nullptr));
    mlp_hessian_vector(c, g.rows, x_t, theta_t, theta_fw, v_t, v_fw, a, g.out.at(t));
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
  prepare_maml_scratch(c.dims, m.theta0, scratch);
  for (int64_t t = begin; t < end; ++t) {
    m.query_losses[t] = mlp_maml_task(c, m.steps, m.step_weights, m.first_order, m.support_rows,
                                      m.xs + t * m.support_rows * in, m.ys->at(t), m.query_rows,
                                      m.xq + t * m.query_rows * in, m.yq->at(t), m.theta0, m.lrs, scratch,
                                      m.meta_grads.at(t), m.lr_grads.at(t));
  }
}

// The per-task loops, compiled per instruction set (MAMLEXT_HOST_ISA_CLONES, common/mlp_math.h).
#define MAMLEXT_MLP_TASK_CLONES(T)                                                                              \
  MAMLEXT_HOST_ISA_CLONES void loss_grad_tasks_isa(const LossGradArgs<T>& g, int64_t begin, int64_t end, T* s) { \
    loss_grad_tasks(g, begin, end, s);                                                                          \
  }                                                                                                             \
  MAMLEXT_HOST_ISA_CLONES void hvp_tasks_isa(const LossGradArgs<T>& g, int64_t begin, int64_t end, T* s) {       \
    hvp_tasks(g, begin, end, s);                                                                                \
  }                                                                                                             \
  MAMLEXT_HOST_ISA_CLONES void maml_tasks_isa(const MamlArgs<T>& m, int64_t begin, int64_t end, T* s) {          \
    maml_tasks(m, begin, end, s);                                                                               \
  }
MAMLEXT_MLP_TASK_CLONES(float)
MAMLEXT_MLP_TASK_CLONES(double)
#undef MAMLEXT_MLP_TASK_CLONES

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_loss_grad_cpu(at::TensorList params, const at::Tensor& x,
                                                                  const at::Tensor& y, int64_t activation,
                                                                  double act_param, int64_t loss) {
  if (mlp_cpu_path(peek_dims(params), peek_size(x, 0), peek_size(x, 1)) == CpuPath::kBatched) {
    return mlp_loss_grad_batched(params, x, y, activation, act_param, loss);
  }
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
    const int64_t scratch_numel = mlp_activations_numel(c.dims, rows, false) + mlp_transposed_numel(c.dims);
    at::parallel_for(0, tasks, task_grain(tasks, 3 * forward_work(c.dims, rows)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(scratch_numel);
      loss_grad_tasks_isa(args, begin, end, scratch.data());
    });
  });
  return {losses, grads};
}

std::vector<at::Tensor> mlp_hvp_cpu(at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                    const at::Tensor& y, int64_t activation, double act_param, int64_t loss) {
  if (mlp_cpu_path(peek_dims(params), peek_size(x, 0), peek_size(x, 1)) == CpuPath::kBatched) {
    return mlp_hvp_batched(params, vectors, x, y, activation, act_param, loss);
  }
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
    const int64_t scratch_numel = mlp_activations_numel(c.dims, rows, true) + 2 * mlp_transposed_numel(c.dims);
    at::parallel_for(0, tasks, task_grain(tasks, 8 * forward_work(c.dims, rows)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(scratch_numel);
      hvp_tasks_isa(args, begin, end, scratch.data());
    });
  });
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_maml_cpu(
    at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList lrs, const at::Tensor& step_weights, bool first_order, int64_t activation, double act_param,
    int64_t loss) {
  if (mlp_cpu_path(peek_dims(params), peek_size(xs, 0), peek_size(xs, 1)) == CpuPath::kBatched) {
    return mlp_maml_batched(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss);
  }
  const MlpMamlCall checked =
      check_mlp_maml("mlp_maml", params, xs, ys, xq, yq, lrs, step_weights, activation, act_param, loss);
  const MlpCall& call = checked.call;
  const MlpConfig& c = call.config;
  const int64_t tasks = call.tasks, steps = checked.steps;
  const std::vector<bool>& lr_per_element = checked.lr_per_element;

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
      maml_tasks_isa(args, begin, end, scratch.data());
    });
  });
  return {query_losses, meta_grads, lr_grads};
}

}  // namespace

std::string mlp_cpu_last_path() {
  switch (static_cast<CpuPath>(last_path.load(std::memory_order_relaxed))) {
    case CpuPath::kPerTask: return "per_task";
    case CpuPath::kBatched: return "batched";
    default: return "";
  }
}

TORCH_LIBRARY_IMPL(mamlext, CPU, m) {
  m.impl("mlp_loss_grad", &mlp_loss_grad_cpu);
  m.impl("mlp_hvp", &mlp_hvp_cpu);
  m.impl("mlp_maml", &mlp_maml_cpu);
}

}  // namespace mamlext
