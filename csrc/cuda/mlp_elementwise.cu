// CUDA variants of the layerwise MLP implementation's element-wise kernels (declared in layerwise/mlp_layerwise.h):
// grid-stride loops whose bodies are the shared C10_HOST_DEVICE functions of common/activations.h, common/losses.h
// and common/sgd_math.h (through mlp_layerwise.h's maml_update), so the GPU runs the CPU's arithmetic.
//
// The activations run one element per thread (the shared n-element loop called with n = 1: its switch over the
// activation is uniform across a warp); the losses run one task per thread (a task's K rows reduce to its loss).
// Every launch is on the current stream of the current device, which the host code has set with a device guard.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "layerwise/mlp_layerwise.h"

namespace mamlext {
namespace cuda_elementwise {
namespace {

constexpr int kThreads = 256;
constexpr int kTaskThreads = 128;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride beyond this

int blocks_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks));
}

__device__ inline int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ inline int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename scalar_t>
__global__ void activation_forward_kernel(Activation act, scalar_t param, int64_t n, const scalar_t* z,
                                          scalar_t* h) {
  for (int64_t e = global_thread(); e < n; e += grid_threads()) {
    ::mamlext::activation_forward(SerialTeam(), act, param, 1, z + e, h + e);
  }
}

template <typename scalar_t>
__global__ void activation_backward_kernel(Activation act, scalar_t param, int64_t n, const scalar_t* z,
                                           const scalar_t* h, const scalar_t* in, scalar_t* out) {
  for (int64_t e = global_thread(); e < n; e += grid_threads()) {
    ::mamlext::activation_backward(SerialTeam(), act, param, 1, z + e, h + e, in + e, out + e);
  }
}

template <typename scalar_t>
__global__ void activation_r_backward_kernel(Activation act, scalar_t param, int64_t n, const scalar_t* z,
                                             const scalar_t* h, const scalar_t* dh, const scalar_t* rz,
                                             scalar_t* rdz) {
  for (int64_t e = global_thread(); e < n; e += grid_threads()) {
    ::mamlext::activation_r_backward(SerialTeam(), act, param, 1, z + e, h + e, dh + e, rz + e, rdz + e);
  }
}

template <typename scalar_t>
__global__ void loss_forward_backward_kernel(Loss loss, int64_t tasks, int64_t K, int64_t O, const scalar_t* z,
                                             TaskTargets<scalar_t> y, TaskLossParams<scalar_t> param,
                                             scalar_t* losses, scalar_t* dz) {
  const int64_t n = K * O;
  for (int64_t t = global_thread(); t < tasks; t += grid_threads()) {
    const LossTarget<scalar_t> target = y.at(t);
    if (target.classes != nullptr) {  // the host checks class indices only for CPU tensors (no sync)
      for (int64_t k = 0; k < K; ++k) CUDA_KERNEL_ASSERT(target.classes[k] >= 0 && target.classes[k] < O);
    }
    losses[t] = ::mamlext::loss_forward_backward(SerialTeam(), loss, K, O, z + t * n, target,
                                                 dz == nullptr ? dz : dz + t * n, param.at(t));
  }
}

template <typename scalar_t>
__global__ void loss_r_backward_kernel(Loss loss, int64_t tasks, int64_t K, int64_t O, const scalar_t* z,
                                       TaskTargets<scalar_t> y, TaskLossParams<scalar_t> param, bool fisher,
                                       const scalar_t* rz, scalar_t* rdz) {
  const int64_t n = K * O;
  for (int64_t t = global_thread(); t < tasks; t += grid_threads()) {
    ::mamlext::loss_r_backward(SerialTeam(), loss, K, O, z + t * n, y.at(t), rz + t * n, rdz + t * n, param.at(t),
                               fisher);
  }
}

template <MamlUpdate U, typename scalar_t>
__global__ void maml_update_kernel(MamlUpdateArgs<scalar_t> m) {
  const int64_t S = m.per_task, n = m.tasks * m.per_task;
  for (int64_t e = global_thread(); e < n; e += grid_threads()) {
    const int64_t t = e / S, s = e - t * S;
    m.out.ptr[m.out.index(t, s)] = maml_update_value<U, scalar_t>(operand_value(m.a, t, s), operand_value(m.b, t, s),
                                                            operand_value(m.c, t, s), m.w);
  }
}

}  // namespace

template <typename scalar_t>
void activation_forward(Activation act, scalar_t param, int64_t n, const scalar_t* z, scalar_t* h) {
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  activation_forward_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(act, param, n, z, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void activation_backward(Activation act, scalar_t param, int64_t n, const scalar_t* z, const scalar_t* h,
                         const scalar_t* in, scalar_t* out) {
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  activation_backward_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(act, param, n, z, h, in,
                                                                                          out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void activation_r_backward(Activation act, scalar_t param, int64_t n, const scalar_t* z, const scalar_t* h,
                           const scalar_t* dh, const scalar_t* rz, scalar_t* rdz) {
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  activation_r_backward_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(act, param, n, z, h, dh,
                                                                                            rz, rdz);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void loss_forward_backward(Loss loss, int64_t tasks, int64_t K, int64_t O, const scalar_t* z,
                           TaskTargets<scalar_t> y, TaskLossParams<scalar_t> param, scalar_t* losses, scalar_t* dz) {
  if (tasks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  loss_forward_backward_kernel<scalar_t><<<blocks_for(tasks, kTaskThreads), kTaskThreads, 0, stream>>>(
      loss, tasks, K, O, z, y, param, losses, dz);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void loss_r_backward(Loss loss, int64_t tasks, int64_t K, int64_t O, const scalar_t* z, TaskTargets<scalar_t> y,
                     TaskLossParams<scalar_t> param, bool fisher, const scalar_t* rz, scalar_t* rdz) {
  if (tasks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  loss_r_backward_kernel<scalar_t><<<blocks_for(tasks, kTaskThreads), kTaskThreads, 0, stream>>>(
      loss, tasks, K, O, z, y, param, fisher, rz, rdz);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void maml_update(const MamlUpdateArgs<scalar_t>& args) {
  const int64_t n = args.tasks * args.per_task;
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = blocks_for(n, kThreads);
  switch (args.update) {
    case MamlUpdate::kSgdStep:
      maml_update_kernel<MamlUpdate::kSgdStep, scalar_t><<<blocks, kThreads, 0, stream>>>(args);
      break;
    case MamlUpdate::kDirection:
      maml_update_kernel<MamlUpdate::kDirection, scalar_t><<<blocks, kThreads, 0, stream>>>(args);
      break;
    case MamlUpdate::kLrGrad:
      maml_update_kernel<MamlUpdate::kLrGrad, scalar_t><<<blocks, kThreads, 0, stream>>>(args);
      break;
    case MamlUpdate::kVUpdate:
      maml_update_kernel<MamlUpdate::kVUpdate, scalar_t><<<blocks, kThreads, 0, stream>>>(args);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

MAMLEXT_INSTANTIATE_ELEMENTWISE(float)
MAMLEXT_INSTANTIATE_ELEMENTWISE(double)

}  // namespace cuda_elementwise
}  // namespace mamlext
