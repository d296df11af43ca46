// The CUDA kernels of the fused MLP ops. mlp_maml on narrow networks (every width <= 64) is one launch of the block
// kernel: one thread block per task runs the task's whole inner loop and reverse recursion (common/mlp_math.h
// mlp_maml_task on a BlockTeam), with the task's scratch (MamlScratch: thetas, gradients, transposed weights,
// activations) in shared memory when it fits, else in a global workspace. Wider networks, and mlp_loss_grad and
// mlp_hvp, run the batched implementation (batched/mlp_batched.h: cuBLAS GEMMs + cuda/mlp_elementwise.cu).
//
// MAMLEXT_MLP_CUDA_PATH, read on every mlp_maml call, forces a path: block (scratch in shared memory where it fits),
// block_global (scratch in the global workspace), batched, or auto (or unset/empty): the rule of use_block_kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "batched/mlp_batched.h"
#include "common/mlp_tasks.h"
#include "common/team.h"

namespace mamlext {
namespace {

constexpr int kBlockThreads = 128;  // a multiple of 32 (BlockTeam)
constexpr int64_t kMaxBlockWidth = 64;
// The global workspace holds one scratch per block: a task's scratch is at most this, and the grid at most
// kWorkspaceBlocksPerSm blocks per multiprocessor, the tasks beyond it taken in turn (grid stride).
constexpr int64_t kMaxGlobalScratchBytes = int64_t(1) << 20;
constexpr int64_t kWorkspaceBlocksPerSm = 8;
constexpr int64_t kMaxGrid = int64_t(1) << 20;

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    maml_block_kernel(const MamlArgs<scalar_t> m, int64_t tasks, scalar_t* workspace) {
  extern __shared__ __align__(16) unsigned char shared_scratch[];
  __shared__ double partials[BlockTeam::kMaxWarps];
  const BlockTeam team{partials};
  if (m.config.loss == Loss::kCrossEntropy) {  // the host checks class indices only for CPU tensors (no sync)
    const int64_t classes = m.config.dims.output_width();
    for (int64_t t = blockIdx.x; t < tasks; t += gridDim.x) {
      const int64_t* ys = m.ys.at(t).classes;
      const int64_t* yq = m.yq.at(t).classes;
      for (int64_t k = team.rank(); k < m.support_rows; k += team.size()) {
        CUDA_KERNEL_ASSERT(ys[k] >= 0 && ys[k] < classes);
      }
      for (int64_t k = team.rank(); k < m.query_rows; k += team.size()) {
        CUDA_KERNEL_ASSERT(yq[k] >= 0 && yq[k] < classes);
      }
    }
  }
  scalar_t* buffer = workspace == nullptr ? reinterpret_cast<scalar_t*>(shared_scratch)
                                          : workspace + static_cast<int64_t>(blockIdx.x) * m.scratch_numel();
  maml_tasks(team, m, blockIdx.x, tasks, gridDim.x, buffer);
}

// mlp_maml by the block kernel; global_scratch: the scratch in the global workspace even where shared memory holds it.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_maml_block(
    at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList lrs, const at::Tensor& step_weights, bool first_order, int64_t activation, double act_param,
    int64_t loss, bool global_scratch) {
  const MamlTensors m(params, xs, ys, xq, yq, lrs, step_weights, activation, act_param, loss);
  const int64_t tasks = m.checked.call.tasks;
  if (tasks == 0) return m.outputs();
  const c10::cuda::CUDAGuard guard(m.params[0].device());
  const int device = m.params[0].get_device();
  int shared_optin = 0, multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));

  AT_DISPATCH_FLOATING_TYPES(m.params[0].scalar_type(), "mlp_maml_block", [&] {
    const MamlArgs<scalar_t> args(m, first_order);
    const int64_t scratch_bytes = args.scratch_numel() * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t shared_limit = shared_optin - BlockTeam::kMaxWarps * static_cast<int64_t>(sizeof(double));
    const bool in_shared = !global_scratch && scratch_bytes <= shared_limit;
    at::Tensor workspace;
    int64_t grid = std::min(tasks, kMaxGrid);
    if (!in_shared) {
      grid = std::min(grid, kWorkspaceBlocksPerSm * multiprocessors);
      workspace = at::empty({grid, args.scratch_numel()}, m.params[0].options());
    }
    const auto kernel = maml_block_kernel<scalar_t>;
    if (in_shared) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(scratch_bytes)));
    }
    kernel<<<static_cast<unsigned>(grid), kBlockThreads, in_shared ? scratch_bytes : 0,
             c10::cuda::getCurrentCUDAStream()>>>(args, tasks,
                                                  in_shared ? nullptr : workspace.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return m.outputs();
}

enum class CudaPath { kBlock, kBlockGlobal, kBatched };

// auto: the block kernel when every width is at most kMaxBlockWidth and a task's scratch fits the global workspace's
// limit. The shapes are read before the op's checks (which run on either path), so they may be missing here.
bool use_block_kernel(at::TensorList params, const at::Tensor& xs, const at::Tensor& xq,
                      const at::Tensor& step_weights, bool first_order) {
  const MlpDims d = peek_mlp_dims(params);
  if (d.layers == 0 || xs.dim() != 3 || xq.dim() != 3) return false;
  for (int l = 0; l <= d.layers; ++l) {
    if (d.width[l] > kMaxBlockWidth) return false;
  }
  const int64_t scratch_numel =
      mlp_maml_scratch_numel(d, step_weights.numel(), xs.size(1), xq.size(1), first_order);
  return scratch_numel * static_cast<int64_t>(params[0].element_size()) <= kMaxGlobalScratchBytes;
}

CudaPath mlp_maml_cuda_path(at::TensorList params, const at::Tensor& xs, const at::Tensor& xq,
                            const at::Tensor& step_weights, bool first_order) {
  const char* env = std::getenv("MAMLEXT_MLP_CUDA_PATH");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) {
    return use_block_kernel(params, xs, xq, step_weights, first_order) ? CudaPath::kBlock : CudaPath::kBatched;
  }
  if (std::strcmp(env, "block") == 0) return CudaPath::kBlock;
  if (std::strcmp(env, "block_global") == 0) return CudaPath::kBlockGlobal;
  if (std::strcmp(env, "batched") == 0) return CudaPath::kBatched;
  TORCH_CHECK(false, "mamlext: MAMLEXT_MLP_CUDA_PATH must be block, block_global, batched or auto (or unset), got '",
              env, "'");
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_maml_cuda(
    at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList lrs, const at::Tensor& step_weights, bool first_order, int64_t activation, double act_param,
    int64_t loss) {
  switch (mlp_maml_cuda_path(params, xs, xq, step_weights, first_order)) {
    case CudaPath::kBlock:
      return mlp_maml_block(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss, false);
    case CudaPath::kBlockGlobal:
      return mlp_maml_block(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss, true);
    case CudaPath::kBatched:
    default:
      return mlp_maml_batched(params, xs, ys, xq, yq, lrs, step_weights, first_order, activation, act_param, loss);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CUDA, m) {
  m.impl("mlp_loss_grad", &mlp_loss_grad_batched);
  m.impl("mlp_hvp", &mlp_hvp_batched);
  m.impl("mlp_maml", &mlp_maml_cuda);
}

}  // namespace mamlext
