// The CUDA kernels of the fused MLP ops. On narrow networks (every width <= 64) each op is one launch of a block
// kernel: one thread block per task runs the task's whole computation (for mlp_maml the inner loop and the reverse
// recursion: common/mlp_maml_math.h mlp_maml_task on a BlockTeam), with the task's scratch (activations, transposed
// weights and, for mlp_maml, the MamlScratch thetas and gradients) in shared memory when it fits, else in a global
// workspace. Wider networks run the layerwise implementation (layerwise/mlp_layerwise.h: cuBLAS GEMMs +
// cuda/mlp_elementwise.cu).
//
// The public ops choose by the rule of resolve_cuda_path. The private ops _mlp_loss_grad_path, _mlp_hvp_path and
// _mlp_maml_path take the path as an argument, for tests: block (scratch in shared memory where it fits),
// block_global (scratch in the global workspace), layerwise, or auto (that rule).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/mlp_tasks.h"
#include "common/team.h"
#include "layerwise/mlp_layerwise.h"

namespace mamlext {
namespace {

constexpr int kBlockThreads = 128;  // a multiple of 32 (BlockTeam)
constexpr int64_t kMaxBlockWidth = 64;
// The global workspace holds one scratch per block: a task's scratch is at most this, and the grid at most
// kWorkspaceBlocksPerSm blocks per multiprocessor (about as many as fit one at a time: the kernels use 96-168
// registers per thread, sm_90), the tasks beyond it taken in turn (grid stride).
constexpr int64_t kMaxGlobalScratchBytes = int64_t(1) << 20;
constexpr int64_t kWorkspaceBlocksPerSm = 4;
constexpr int64_t kMaxGrid = int64_t(1) << 20;

// The host checks class indices only for CPU tensors (no sync): rows [0, rows) of task t's targets.
template <typename scalar_t>
__device__ void assert_classes(const BlockTeam& team, const TaskTargets<scalar_t>& y, int64_t t, int64_t rows,
                               int64_t classes) {
  const int64_t* y_t = y.at(t).classes;
  if (y_t == nullptr) return;
  for (int64_t k = team.rank(); k < rows; k += team.size()) CUDA_KERNEL_ASSERT(y_t[k] >= 0 && y_t[k] < classes);
}

// One op's tasks first, first + step, ... < end on the team.
template <typename scalar_t>
__device__ void run_tasks(const BlockTeam& team, const MamlArgs<scalar_t>& m, int64_t first, int64_t end,
                          int64_t step, scalar_t* buffer) {
  const int64_t classes = m.config.dims.output_width();
  for (int64_t t = first; t < end; t += step) {
    assert_classes(team, m.ys, t, m.support_rows, classes);
    assert_classes(team, m.yq, t, m.query_rows, classes);
  }
  maml_tasks(team, m, first, end, step, buffer);
}

template <typename scalar_t>
__device__ void run_tasks(const BlockTeam& team, const LossGradArgs<scalar_t>& g, int64_t first, int64_t end,
                          int64_t step, scalar_t* buffer) {
  for (int64_t t = first; t < end; t += step) assert_classes(team, g.y, t, g.rows, g.config.dims.output_width());
  loss_grad_tasks(team, g, first, end, step, buffer);
}

// The op's arguments copied into shared memory, for the per-task views (common/mlp_passes.h MlpParams, ...) to
// point at: a view that may point into the kernel's parameter space or elsewhere (theta_0 or an inner step's
// theta_k) makes the compiler copy all the arguments into every thread's local-memory stack frame.
template <typename Args>
__device__ const Args& arguments_in_shared(const Args& args) {
  static_assert(std::is_trivially_copyable<Args>::value && sizeof(Args) % sizeof(uint64_t) == 0 &&
                alignof(Args) <= alignof(uint64_t));
  constexpr int kWords = sizeof(Args) / sizeof(uint64_t);
  __shared__ uint64_t words[kWords];
  const uint64_t* source = reinterpret_cast<const uint64_t*>(&args);
  for (int i = threadIdx.x; i < kWords; i += blockDim.x) words[i] = source[i];
  __syncthreads();
  return *reinterpret_cast<const Args*>(words);
}

// One block per task (grid stride), its scratch in dynamic shared memory, or at its block's place in workspace.
template <typename Args, typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads, 1) block_kernel(const Args kernel_args, int64_t tasks,
                                                              scalar_t* workspace) {
  extern __shared__ __align__(16) unsigned char shared_scratch[];
  __shared__ double partials[BlockTeam::kMaxWarps];
  const BlockTeam team{partials};
  const Args& args = arguments_in_shared(kernel_args);
  scalar_t* buffer = workspace == nullptr ? reinterpret_cast<scalar_t*>(shared_scratch)
                                          : workspace + static_cast<int64_t>(blockIdx.x) * args.scratch_numel();
  run_tasks(team, args, blockIdx.x, tasks, gridDim.x, buffer);
}

// Launches block_kernel on the current stream of like's device; global_scratch: the scratch in the global workspace
// even where shared memory holds it.
template <typename scalar_t, typename Args>
void launch_block_kernel(const Args& args, int64_t tasks, const at::Tensor& like, bool global_scratch) {
  const int device = like.get_device();
  int shared_optin = 0, multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  const int64_t scratch_bytes = args.scratch_numel() * static_cast<int64_t>(sizeof(scalar_t));
  // The dynamic shared memory's share: what the kernel's static shared memory (partials, arguments) leaves.
  const int64_t shared_limit = shared_optin - BlockTeam::kMaxWarps * static_cast<int64_t>(sizeof(double)) -
                               static_cast<int64_t>(sizeof(Args));
  const bool in_shared = !global_scratch && scratch_bytes <= shared_limit;
  at::Tensor workspace;
  int64_t grid = std::min(tasks, kMaxGrid);
  if (!in_shared) {
    grid = std::min(grid, kWorkspaceBlocksPerSm * multiprocessors);
    workspace = at::empty({grid, args.scratch_numel()}, like.options());
  }
  const auto kernel = block_kernel<Args, scalar_t>;
  if (in_shared) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(scratch_bytes)));
  }
  kernel<<<static_cast<unsigned>(grid), kBlockThreads, in_shared ? scratch_bytes : 0,
           c10::cuda::getCurrentCUDAStream()>>>(args, tasks, in_shared ? nullptr : workspace.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

LossGradTensors loss_grad_block(bool hvp, at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                const at::Tensor& y, int64_t activation, double act_param, int64_t loss,
                                const std::optional<at::Tensor>& weights, bool global_scratch,
                                bool gauss_newton = false) {
  LossGradTensors g(hvp, params, vectors, x, y, activation, act_param, loss, weights, gauss_newton);
  if (g.call.tasks == 0) return g;
  const c10::cuda::CUDAGuard guard(g.x.device());
  AT_DISPATCH_FLOATING_TYPES(g.x.scalar_type(), "mlp_loss_grad_block", [&] {
    launch_block_kernel<scalar_t>(LossGradArgs<scalar_t>(g), g.call.tasks, g.x, global_scratch);
  });
  return g;
}

MamlTensors maml_block(at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                       const at::Tensor& yq, at::TensorList lrs, const at::Tensor& step_weights, bool first_order,
                       int64_t activation, double act_param, int64_t loss, const MamlRowWeights& row_weights,
                       bool global_scratch) {
  MamlTensors m(params, xs, ys, xq, yq, lrs, step_weights, activation, act_param, loss, row_weights);
  if (m.checked.call.tasks == 0) return m;
  const c10::cuda::CUDAGuard guard(m.params[0].device());
  AT_DISPATCH_FLOATING_TYPES(m.params[0].scalar_type(), "mlp_maml_block", [&] {
    launch_block_kernel<scalar_t>(MamlArgs<scalar_t>(m, first_order), m.checked.call.tasks, m.params[0],
                                  global_scratch);
  });
  return m;
}

enum class CudaPath { kAuto, kBlock, kBlockGlobal, kLayerwise };

// The path and team_threads arguments of the private ops.
CudaPath parse_cuda_path(c10::string_view path, int64_t team_threads) {
  TORCH_CHECK_VALUE(team_threads == 0, "mamlext: team_threads must be 0 on CUDA (path 'team' is CPU only), got ",
                    team_threads);
  if (path == "auto") return CudaPath::kAuto;
  if (path == "block") return CudaPath::kBlock;
  if (path == "block_global") return CudaPath::kBlockGlobal;
  if (path == "layerwise") return CudaPath::kLayerwise;
  TORCH_CHECK_VALUE(false, "mamlext: path must be block, block_global, layerwise or auto on CUDA, got '", path, "'");
}

// auto: the block kernel when every width is at most kMaxBlockWidth and a task's scratch (scratch_numel elements of
// element_size bytes) fits the global workspace's limit. The shapes are read before the op's checks (which run on
// either path), so they may be missing or wrong here.
CudaPath resolve_cuda_path(CudaPath path, const MlpDims& d, int64_t scratch_numel, int64_t element_size) {
  if (path != CudaPath::kAuto) return path;
  bool narrow = d.layers > 0;
  for (int l = 0; l <= d.layers; ++l) narrow = narrow && d.width[l] <= kMaxBlockWidth;
  return narrow && scratch_numel * element_size <= kMaxGlobalScratchBytes ? CudaPath::kBlock : CudaPath::kLayerwise;
}

CudaPath loss_grad_cuda_path(CudaPath path, bool hvp, at::TensorList params, const at::Tensor& x) {
  const MlpDims d = peek_mlp_dims(params);
  return resolve_cuda_path(path, d, mlp_loss_grad_scratch_numel(d, peek_input_size(x, 1), hvp, false),
                           x.element_size());
}

using LossGradOutputs = std::tuple<at::Tensor, std::vector<at::Tensor>>;
using MamlOutputs = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

LossGradOutputs mlp_loss_grad_on(CudaPath requested, at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                 int64_t activation, double act_param, int64_t loss,
                                 const std::optional<at::Tensor>& weights) {
  const CudaPath path = loss_grad_cuda_path(requested, false, params, x);
  if (path == CudaPath::kLayerwise) {
    return mlp_loss_grad_layerwise(params, x, y, activation, act_param, loss, weights);
  }
  const LossGradTensors g = loss_grad_block(false, params, {}, x, y, activation, act_param, loss, weights,
                                            path == CudaPath::kBlockGlobal);
  return {g.losses, g.out};
}

std::vector<at::Tensor> mlp_hvp_on(CudaPath requested, at::TensorList params, at::TensorList vectors,
                                   const at::Tensor& x, const at::Tensor& y, int64_t activation, double act_param,
                                   int64_t loss, const std::optional<at::Tensor>& weights, bool gauss_newton) {
  const CudaPath path = loss_grad_cuda_path(requested, true, params, x);
  if (path == CudaPath::kLayerwise) {
    return mlp_hvp_layerwise(params, vectors, x, y, activation, act_param, loss, weights, gauss_newton);
  }
  return loss_grad_block(true, params, vectors, x, y, activation, act_param, loss, weights,
                         path == CudaPath::kBlockGlobal, gauss_newton)
      .out;
}

MamlOutputs mlp_maml_on(CudaPath requested, at::TensorList params, const at::Tensor& xs, const at::Tensor& ys,
                        const at::Tensor& xq, const at::Tensor& yq, at::TensorList lrs, const at::Tensor& step_weights,
                        bool first_order, int64_t activation, double act_param, int64_t loss,
                        const MamlRowWeights& row_weights) {
  const MlpDims d = peek_mlp_dims(params);
  const int64_t scratch_numel =
      mlp_maml_scratch_numel(d, step_weights.numel(), peek_input_size(xs, 1), peek_input_size(xq, 1), first_order);
  const CudaPath path = resolve_cuda_path(requested, d, scratch_numel, xs.element_size());
  if (path == CudaPath::kLayerwise) {
    return mlp_maml_layerwise(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss,
                              row_weights);
  }
  return maml_block(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss, row_weights,
                    path == CudaPath::kBlockGlobal)
      .outputs();
}

// The public ops.
LossGradOutputs mlp_loss_grad_cuda(at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                   int64_t activation, double act_param, int64_t loss,
                                   const std::optional<at::Tensor>& weights) {
  return mlp_loss_grad_on(CudaPath::kAuto, params, x, y, activation, act_param, loss, weights);
}

std::vector<at::Tensor> mlp_hvp_cuda(at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                     const at::Tensor& y, int64_t activation, double act_param, int64_t loss,
                                     const std::optional<at::Tensor>& weights, bool gauss_newton) {
  return mlp_hvp_on(CudaPath::kAuto, params, vectors, x, y, activation, act_param, loss, weights, gauss_newton);
}

MamlOutputs mlp_maml_cuda(at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
                          const at::Tensor& yq, at::TensorList lrs, const at::Tensor& step_weights, bool first_order,
                          int64_t activation, double act_param, int64_t loss,
                          const std::optional<at::Tensor>& support_weights,
                          const std::optional<at::Tensor>& query_weights) {
  return mlp_maml_on(CudaPath::kAuto, params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param,
                     loss, {support_weights, query_weights});
}

// The private ops: the same on the path their last two arguments name.
LossGradOutputs mlp_loss_grad_path_cuda(at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                        int64_t activation, double act_param, int64_t loss, c10::string_view path,
                                        int64_t team_threads, const std::optional<at::Tensor>& weights) {
  return mlp_loss_grad_on(parse_cuda_path(path, team_threads), params, x, y, activation, act_param, loss, weights);
}

std::vector<at::Tensor> mlp_hvp_path_cuda(at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                          const at::Tensor& y, int64_t activation, double act_param, int64_t loss,
                                          c10::string_view path, int64_t team_threads,
                                          const std::optional<at::Tensor>& weights, bool gauss_newton) {
  return mlp_hvp_on(parse_cuda_path(path, team_threads), params, vectors, x, y, activation, act_param, loss,
                    weights, gauss_newton);
}

MamlOutputs mlp_maml_path_cuda(at::TensorList params, const at::Tensor& xs, const at::Tensor& ys,
                               const at::Tensor& xq, const at::Tensor& yq, at::TensorList lrs,
                               const at::Tensor& step_weights, bool first_order, int64_t activation, double act_param,
                               int64_t loss, c10::string_view path, int64_t team_threads,
                               const std::optional<at::Tensor>& support_weights,
                               const std::optional<at::Tensor>& query_weights) {
  return mlp_maml_on(parse_cuda_path(path, team_threads), params, xs, ys, xq, yq, lrs, step_weights, first_order,
                     activation, act_param, loss, {support_weights, query_weights});
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CUDA, m) {
  m.impl("mlp_loss_grad", &mlp_loss_grad_cuda);
  m.impl("mlp_hvp", &mlp_hvp_cuda);
  m.impl("mlp_maml", &mlp_maml_cuda);
  m.impl("_mlp_loss_grad_path", &mlp_loss_grad_path_cuda);
  m.impl("_mlp_hvp_path", &mlp_hvp_path_cuda);
  m.impl("_mlp_maml_path", &mlp_maml_path_cuda);
}

}  // namespace mamlext
