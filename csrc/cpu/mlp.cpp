// CPU kernels of the fused MLP ops mlp_loss_grad, mlp_hvp and mlp_maml. Two implementations:
//   per task:  validation and allocation on the host, then one at::parallel_for over tasks, each chunk of tasks with
//     its own scratch buffer; the per-task math is common/mlp_maml_math.h and common/mlp_passes.h (on a SerialTeam);
//   layerwise: layerwise/mlp_layerwise.h (ATen GEMMs over all tasks, layer by layer + the shared element-wise math).
// The public ops run the per-task one. The private ops _mlp_loss_grad_path, _mlp_hvp_path and _mlp_maml_path take
// the path as an argument, for tests: besides these two, "team" runs the per-task math on a team of std::threads per
// task, the way the CUDA block kernel (cuda/mlp_block.cu) runs it on a thread block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <barrier>
#include <thread>
#include <tuple>
#include <vector>

#include "common/mlp_checks.h"
#include "common/mlp_passes.h"
#include "common/mlp_tasks.h"
#include "common/small_gemm.h"
#include "layerwise/mlp_layerwise.h"

namespace mamlext {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Path selection.
//
// The public ops run the per-task kernel: with the register-tiled products it beats the layerwise path wherever both
// were measured (2 cores, float32; per_task vs layerwise ms): mlp_maml 1-256-256-1 K = 25 T = 25 N = 1 4.0-4.4 vs
// 13-19, N = 5 16.6-16.9 vs 52-56; 1-128-128-1 K = 25 T = 250 10.6 vs 33-37; 1-64-64-1 K = 50 T = 1000 21.6 vs 75-79;
// mlp_loss_grad and mlp_hvp 1.2-2x faster too, but a tie on mlp_hvp 1-784-784-1 (40.4 vs 40.0). At meta-RL sizes
// (2-W-W-4 policies, T = 20, ce with row weights; another 2-core VM): W = 100, mlp_maml K = 200 9.2 vs 14.2,
// K = 2000 111 vs 150, mlp_hvp K = 2000 71 vs 119; W = 256 K = 2000 565 vs 738; W = 40 ties. The layerwise path
// stays reachable through the private ops because CUDA runs it for wide networks and the CPU tests cover it so.

struct CpuPath {
  enum Kind { kPerTask, kLayerwise, kTeam } kind;
  int team_threads;  // the team's size on kTeam
};

constexpr CpuPath kAutoPath{CpuPath::kPerTask, 0};
constexpr int64_t kMaxTeamThreads = 64;

// The path and team_threads arguments of the private ops.
CpuPath parse_cpu_path(c10::string_view path, int64_t team_threads) {
  if (path == "team") {
    TORCH_CHECK_VALUE(team_threads >= 1 && team_threads <= kMaxTeamThreads, "mamlext: team_threads must be in [1, ",
                      kMaxTeamThreads, "] on path 'team', got ", team_threads);
    return {CpuPath::kTeam, static_cast<int>(team_threads)};
  }
  TORCH_CHECK_VALUE(path == "auto" || path == "per_task" || path == "layerwise",
                    "mamlext: path must be per_task, layerwise, team or auto on the CPU, got '", path, "'");
  TORCH_CHECK_VALUE(team_threads == 0, "mamlext: team_threads is for path 'team' only and must be 0 on path '", path,
                    "', got ", team_threads);
  return path == "layerwise" ? CpuPath{CpuPath::kLayerwise, 0} : kAutoPath;
}

// Multiply-adds a parallel chunk should hold at least, so that small calls are not spread over the thread pool.
constexpr int64_t kMinWorkPerChunk = 1 << 16;

int64_t task_grain(int64_t tasks, int64_t work_per_task) {
  const int64_t grain = (kMinWorkPerChunk + std::max<int64_t>(work_per_task, 1) - 1) / std::max<int64_t>(work_per_task, 1);
  return std::clamp<int64_t>(grain, 1, std::max<int64_t>(tasks, 1));
}

// Multiply-adds of one forward pass over `rows` rows.
int64_t forward_work(const MlpDims& d, int64_t rows) { return rows * d.total_param_numel(); }

// The per-task loops, compiled per instruction set (MAMLEXT_HOST_ISA_CLONES, common/small_gemm.h).
#define MAMLEXT_MLP_TASK_CLONES(T)                                                                              \
  MAMLEXT_HOST_ISA_CLONES void loss_grad_tasks_isa(const LossGradArgs<T>& g, int64_t begin, int64_t end, T* s) { \
    loss_grad_tasks(SerialTeam(), g, begin, end, 1, s);                                                         \
  }                                                                                                             \
  MAMLEXT_HOST_ISA_CLONES void maml_tasks_isa(const MamlArgs<T>& m, int64_t begin, int64_t end, T* s) {          \
    maml_tasks(SerialTeam(), m, begin, end, 1, s);                                                              \
  }
MAMLEXT_MLP_TASK_CLONES(float)
MAMLEXT_MLP_TASK_CLONES(double)
#undef MAMLEXT_MLP_TASK_CLONES

// The team path: a team of std::threads that share a std::barrier runs each task, as a thread block does on the GPU
// (common/team.h BlockTeam), so that CPU tests exercise how the block kernel splits the work and syncs.
class ThreadTeam {
 public:
  ThreadTeam(int rank, int size, std::barrier<>& barrier, double* partials)
      : rank_(rank), size_(size), barrier_(&barrier), partials_(partials) {}

  int rank() const { return rank_; }
  int size() const { return size_; }
  void sync() const { barrier_->arrive_and_wait(); }
  // In double, over the members in order: the same total in every member.
  template <typename scalar_t>
  scalar_t sum(scalar_t x) const {
    partials_[rank_] = static_cast<double>(x);
    sync();
    double total = 0;
    for (int r = 0; r < size_; ++r) total += partials_[r];
    sync();  // before partials_ is written again
    return static_cast<scalar_t>(total);
  }

 private:
  int rank_, size_;
  std::barrier<>* barrier_;
  double* partials_;
};

// Runs work(team) on every member of a team of `size` threads (the calling thread is member 0).
template <typename Work>
void run_on_thread_team(int size, const Work& work) {
  std::barrier<> barrier(size);
  std::vector<double> partials(size);
  std::vector<std::thread> members;
  for (int r = 1; r < size; ++r) members.emplace_back([&, r] { work(ThreadTeam(r, size, barrier, partials.data())); });
  work(ThreadTeam(0, size, barrier, partials.data()));
  for (auto& m : members) m.join();
}

// Runs the mlp_loss_grad or mlp_hvp call g on the per-task or team path.
void run_loss_grad(CpuPath path, const LossGradTensors& g) {
  const int64_t tasks = g.call.tasks;
  const bool hvp = g.hvp;
  if (tasks == 0) return;
  AT_DISPATCH_FLOATING_TYPES(g.x.scalar_type(), "mlp_loss_grad_cpu", [&] {
    const LossGradArgs<scalar_t> args(g);
    if (path.kind == CpuPath::kTeam) {
      std::vector<scalar_t> scratch(args.scratch_numel());
      run_on_thread_team(path.team_threads,
                         [&](const ThreadTeam& team) { loss_grad_tasks(team, args, 0, tasks, 1, scratch.data()); });
      return;
    }
    const int64_t work = (hvp ? 8 : 3) * forward_work(args.config.dims, args.rows);
    at::parallel_for(0, tasks, task_grain(tasks, work), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(args.scratch_numel());
      loss_grad_tasks_isa(args, begin, end, scratch.data());
    });
  });
}

// mlp_loss_grad (hvp false) or mlp_hvp on the per-task or team path.
LossGradTensors loss_grad_per_task(CpuPath path, bool hvp, at::TensorList params, at::TensorList vectors,
                                   const at::Tensor& x, const at::Tensor& y, int64_t activation, double act_param,
                                   int64_t loss, const std::optional<at::Tensor>& weights,
                                   bool gauss_newton = false) {
  LossGradTensors g(hvp, params, vectors, x, y, activation, act_param, loss, weights, gauss_newton);
  run_loss_grad(path, g);
  return g;
}

using LossGradOutputs = std::tuple<at::Tensor, std::vector<at::Tensor>>;
using MamlOutputs = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

LossGradOutputs mlp_loss_grad_on(CpuPath path, at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                 int64_t activation, double act_param, int64_t loss,
                                 const std::optional<at::Tensor>& weights) {
  if (path.kind == CpuPath::kLayerwise) {
    return mlp_loss_grad_layerwise(params, x, y, activation, act_param, loss, weights);
  }
  const LossGradTensors g = loss_grad_per_task(path, false, params, {}, x, y, activation, act_param, loss, weights);
  return {g.losses, g.out};
}

std::vector<at::Tensor> mlp_hvp_on(CpuPath path, at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                   const at::Tensor& y, int64_t activation, double act_param, int64_t loss,
                                   const std::optional<at::Tensor>& weights, bool gauss_newton) {
  if (path.kind == CpuPath::kLayerwise) {
    return mlp_hvp_layerwise(params, vectors, x, y, activation, act_param, loss, weights, gauss_newton);
  }
  return loss_grad_per_task(path, true, params, vectors, x, y, activation, act_param, loss, weights, gauss_newton)
      .out;
}

MamlOutputs mlp_maml_on(CpuPath path, at::TensorList params, const at::Tensor& xs, const at::Tensor& ys,
                        const at::Tensor& xq, const at::Tensor& yq, at::TensorList lrs, const at::Tensor& step_weights,
                        bool first_order, int64_t activation, double act_param, int64_t loss,
                        const MamlRowWeights& row_weights) {
  if (path.kind == CpuPath::kLayerwise) {
    return mlp_maml_layerwise(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss,
                              row_weights);
  }
  const MamlTensors m(params, xs, ys, xq, yq, lrs, step_weights, activation, act_param, loss, row_weights);
  const int64_t tasks = m.checked.call.tasks;
  if (tasks == 0) return m.outputs();

  AT_DISPATCH_FLOATING_TYPES(m.params[0].scalar_type(), "mlp_maml_cpu", [&] {
    const MamlArgs<scalar_t> args(m, first_order);
    const MlpDims& d = args.config.dims;
    if (path.kind == CpuPath::kTeam) {
      std::vector<scalar_t> scratch(args.scratch_numel());
      run_on_thread_team(path.team_threads,
                         [&](const ThreadTeam& team) { maml_tasks(team, args, 0, tasks, 1, scratch.data()); });
      return;
    }
    const int64_t work = args.steps * ((first_order ? 3 : 8) * forward_work(d, args.support_rows) +
                                       3 * forward_work(d, args.query_rows));
    at::parallel_for(0, tasks, task_grain(tasks, work), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(args.scratch_numel());
      maml_tasks_isa(args, begin, end, scratch.data());
    });
  });
  return m.outputs();
}

// The public ops.
LossGradOutputs mlp_loss_grad_cpu(at::TensorList params, const at::Tensor& x, const at::Tensor& y, int64_t activation,
                                  double act_param, int64_t loss, const std::optional<at::Tensor>& weights) {
  return mlp_loss_grad_on(kAutoPath, params, x, y, activation, act_param, loss, weights);
}

std::vector<at::Tensor> mlp_hvp_cpu(at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                    const at::Tensor& y, int64_t activation, double act_param, int64_t loss,
                                    const std::optional<at::Tensor>& weights, bool gauss_newton) {
  return mlp_hvp_on(kAutoPath, params, vectors, x, y, activation, act_param, loss, weights, gauss_newton);
}

MamlOutputs mlp_maml_cpu(at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                         const at::Tensor& yq, at::TensorList lrs, const at::Tensor& step_weights, bool first_order,
                         int64_t activation, double act_param, int64_t loss,
                         const std::optional<at::Tensor>& support_weights,
                         const std::optional<at::Tensor>& query_weights) {
  return mlp_maml_on(kAutoPath, params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss,
                     {support_weights, query_weights});
}

// mlp_loss_grad that keeps each task's passes (z, h, dz, dh), and mlp_hvp that reads them instead of recomputing
// them: conjugate gradient's repeated products at the same parameters (mamlext.rl) cost the R-passes only.
LossGradOutputs mlp_passes_cpu(at::TensorList params, const at::Tensor& x, const at::Tensor& y, int64_t activation,
                               double act_param, int64_t loss, const std::optional<at::Tensor>& weights,
                               const at::Tensor& passes) {
  LossGradTensors g(false, params, {}, x, y, activation, act_param, loss, weights);
  check_mlp_passes("_mlp_passes", passes, g.call, x);
  TORCH_CHECK_VALUE(passes.is_contiguous(), "_mlp_passes: passes (the buffer to write into) must be contiguous");
  g.passes = passes;
  run_loss_grad(kAutoPath, g);
  return {g.losses, g.out};
}

std::vector<at::Tensor> mlp_hvp_from_passes_cpu(at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                                const at::Tensor& y, const at::Tensor& passes, int64_t activation,
                                                double act_param, int64_t loss,
                                                const std::optional<at::Tensor>& weights, bool gauss_newton) {
  LossGradTensors g(true, params, vectors, x, y, activation, act_param, loss, weights, gauss_newton);
  check_mlp_passes("_mlp_hvp_from_passes", passes, g.call, x);
  g.passes = passes.contiguous();
  run_loss_grad(kAutoPath, g);
  return g.out;
}

// The private ops: the same on the path their last two arguments name.
LossGradOutputs mlp_loss_grad_path_cpu(at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                       int64_t activation, double act_param, int64_t loss, c10::string_view path,
                                       int64_t team_threads, const std::optional<at::Tensor>& weights) {
  return mlp_loss_grad_on(parse_cpu_path(path, team_threads), params, x, y, activation, act_param, loss, weights);
}

std::vector<at::Tensor> mlp_hvp_path_cpu(at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                         const at::Tensor& y, int64_t activation, double act_param, int64_t loss,
                                         c10::string_view path, int64_t team_threads,
                                         const std::optional<at::Tensor>& weights, bool gauss_newton) {
  return mlp_hvp_on(parse_cpu_path(path, team_threads), params, vectors, x, y, activation, act_param, loss,
                    weights, gauss_newton);
}

MamlOutputs mlp_maml_path_cpu(at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                              const at::Tensor& yq, at::TensorList lrs, const at::Tensor& step_weights,
                              bool first_order, int64_t activation, double act_param, int64_t loss,
                              c10::string_view path, int64_t team_threads,
                              const std::optional<at::Tensor>& support_weights,
                              const std::optional<at::Tensor>& query_weights) {
  return mlp_maml_on(parse_cpu_path(path, team_threads), params, xs, ys, xq, yq, lrs, step_weights, first_order,
                     activation, act_param, loss, {support_weights, query_weights});
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CPU, m) {
  m.impl("mlp_loss_grad", &mlp_loss_grad_cpu);
  m.impl("mlp_hvp", &mlp_hvp_cpu);
  m.impl("mlp_maml", &mlp_maml_cpu);
  m.impl("_mlp_loss_grad_path", &mlp_loss_grad_path_cpu);
  m.impl("_mlp_hvp_path", &mlp_hvp_path_cpu);
  m.impl("_mlp_maml_path", &mlp_maml_path_cpu);
  m.impl("_mlp_passes", &mlp_passes_cpu);
  m.impl("_mlp_hvp_from_passes", &mlp_hvp_from_passes_cpu);
}

}  // namespace mamlext
