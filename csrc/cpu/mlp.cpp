// CPU kernels of the fused MLP ops mlp_loss_grad, mlp_hvp and mlp_maml. Two implementations:
//   per task: validation and allocation on the host, then one at::parallel_for over tasks, each chunk of tasks with
//     its own scratch buffer; the per-task math is common/mlp_maml_math.h and common/mlp_passes.h (on a SerialTeam);
//   batched:  layerwise/mlp_layerwise.h (ATen batched GEMMs over the tasks + the shared element-wise math).
// mlp_cpu_path picks one per call (see there; the per-task one unless told otherwise). A third path, for tests only, runs the per-task math on a team of
// std::threads per task, the way the CUDA block kernel (cuda/mlp_block.cu) runs it on a thread block.
#include "cpu/mlp_path.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "layerwise/mlp_layerwise.h"
#include "common/mlp_checks.h"
#include "common/mlp_passes.h"
#include "common/mlp_tasks.h"
#include "common/small_gemm.h"

namespace mamlext {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Path selection.
//
// The environment variable MAMLEXT_MLP_CPU_PATH, read on every call, forces a path:
//   per_task  the per-task kernel below;   batched  layerwise/mlp_layerwise.h;   auto (or unset/empty)  per_task;
//   team      for tests: the per-task math with MAMLEXT_TEAM_THREADS (default 4) std::threads per task, one task
//             after another (see ThreadTeam).
// auto runs the per-task kernel: with the register-tiled products it beats the batched path wherever both were
// measured (2 cores, float32; per_task vs batched ms): mlp_maml 1-256-256-1 K = 25 T = 25 N = 1 4.0-4.4 vs 13-19,
// N = 5 16.6-16.9 vs 52-56; 1-128-128-1 K = 25 T = 250 10.6 vs 33-37; 1-64-64-1 K = 50 T = 1000 21.6 vs 75-79;
// mlp_loss_grad and mlp_hvp 1.2-2x faster too, but a tie on mlp_hvp 1-784-784-1 (40.4 vs 40.0). The batched path
// stays reachable (batched) because CUDA runs it for wide networks and the CPU tests cover it that way.

enum class CpuPath : int { kUnset = 0, kPerTask = 1, kBatched = 2, kTeam = 3 };

std::atomic<int> last_path{static_cast<int>(CpuPath::kUnset)};

CpuPath mlp_cpu_path() {
  const char* env = std::getenv("MAMLEXT_MLP_CPU_PATH");
  CpuPath path;
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0 || std::strcmp(env, "per_task") == 0) {
    path = CpuPath::kPerTask;
  } else if (std::strcmp(env, "batched") == 0) {
    path = CpuPath::kBatched;
  } else if (std::strcmp(env, "team") == 0) {
    path = CpuPath::kTeam;
  } else {
    TORCH_CHECK(false, "mamlext: MAMLEXT_MLP_CPU_PATH must be per_task, batched, team or auto (or unset), got '", env,
                "'");
  }
  last_path.store(static_cast<int>(path), std::memory_order_relaxed);
  return path;
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

// MAMLEXT_TEAM_THREADS: the team's size, 4 when unset.
int team_threads() {
  constexpr int kDefault = 4, kMax = 64;
  const char* env = std::getenv("MAMLEXT_TEAM_THREADS");
  if (env == nullptr || env[0] == '\0') return kDefault;
  char* end = nullptr;
  const long threads = std::strtol(env, &end, 10);
  TORCH_CHECK(*end == '\0' && threads >= 1 && threads <= kMax,
              "mamlext: MAMLEXT_TEAM_THREADS must be an integer in [1, ", kMax, "], got '", env, "'");
  return static_cast<int>(threads);
}

// Runs work(team) on every member of a team of team_threads() threads (the calling thread is member 0).
template <typename Work>
void run_on_thread_team(const Work& work) {
  const int size = team_threads();
  std::barrier<> barrier(size);
  std::vector<double> partials(size);
  std::vector<std::thread> members;
  for (int r = 1; r < size; ++r) members.emplace_back([&, r] { work(ThreadTeam(r, size, barrier, partials.data())); });
  work(ThreadTeam(0, size, barrier, partials.data()));
  for (auto& m : members) m.join();
}

// mlp_loss_grad (hvp false) or mlp_hvp on the per-task or team path.
LossGradTensors loss_grad_per_task(CpuPath path, bool hvp, at::TensorList params, at::TensorList vectors,
                                   const at::Tensor& x, const at::Tensor& y, int64_t activation, double act_param,
                                   int64_t loss) {
  LossGradTensors g(hvp, params, vectors, x, y, activation, act_param, loss);
  const int64_t tasks = g.call.tasks;
  if (tasks == 0) return g;
  AT_DISPATCH_FLOATING_TYPES(g.x.scalar_type(), "mlp_loss_grad_cpu", [&] {
    const LossGradArgs<scalar_t> args(g);
    if (path == CpuPath::kTeam) {
      std::vector<scalar_t> scratch(args.scratch_numel());
      run_on_thread_team([&](const ThreadTeam& team) { loss_grad_tasks(team, args, 0, tasks, 1, scratch.data()); });
      return;
    }
    const int64_t work = (hvp ? 8 : 3) * forward_work(args.config.dims, args.rows);
    at::parallel_for(0, tasks, task_grain(tasks, work), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(args.scratch_numel());
      loss_grad_tasks_isa(args, begin, end, scratch.data());
    });
  });
  return g;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_loss_grad_cpu(at::TensorList params, const at::Tensor& x,
                                                                  const at::Tensor& y, int64_t activation,
                                                                  double act_param, int64_t loss) {
  const CpuPath path = mlp_cpu_path();
  if (path == CpuPath::kBatched) return mlp_loss_grad_layerwise(params, x, y, activation, act_param, loss);
  const LossGradTensors g = loss_grad_per_task(path, false, params, {}, x, y, activation, act_param, loss);
  return {g.losses, g.out};
}

std::vector<at::Tensor> mlp_hvp_cpu(at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                    const at::Tensor& y, int64_t activation, double act_param, int64_t loss) {
  const CpuPath path = mlp_cpu_path();
  if (path == CpuPath::kBatched) return mlp_hvp_layerwise(params, vectors, x, y, activation, act_param, loss);
  return loss_grad_per_task(path, true, params, vectors, x, y, activation, act_param, loss).out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_maml_cpu(
    at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList lrs, const at::Tensor& step_weights, bool first_order, int64_t activation, double act_param,
    int64_t loss) {
  const CpuPath path = mlp_cpu_path();
  if (path == CpuPath::kBatched) {
    return mlp_maml_layerwise(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss);
  }
  const MamlTensors m(params, xs, ys, xq, yq, lrs, step_weights, activation, act_param, loss);
  const int64_t tasks = m.checked.call.tasks;
  if (tasks == 0) return m.outputs();

  AT_DISPATCH_FLOATING_TYPES(m.params[0].scalar_type(), "mlp_maml_cpu", [&] {
    const MamlArgs<scalar_t> args(m, first_order);
    const MlpDims& d = args.config.dims;
    if (path == CpuPath::kTeam) {
      std::vector<scalar_t> scratch(args.scratch_numel());
      run_on_thread_team([&](const ThreadTeam& team) { maml_tasks(team, args, 0, tasks, 1, scratch.data()); });
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

}  // namespace

std::string mlp_cpu_last_path() {
  switch (static_cast<CpuPath>(last_path.load(std::memory_order_relaxed))) {
    case CpuPath::kPerTask: return "per_task";
    case CpuPath::kBatched: return "batched";
    case CpuPath::kTeam: return "team";
    default: return "";
  }
}

TORCH_LIBRARY_IMPL(mamlext, CPU, m) {
  m.impl("mlp_loss_grad", &mlp_loss_grad_cpu);
  m.impl("mlp_hvp", &mlp_hvp_cpu);
  m.impl("mlp_maml", &mlp_maml_cpu);
}

}  // namespace mamlext
