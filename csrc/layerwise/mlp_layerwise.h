// The layerwise implementation of the fused MLP ops mlp_loss_grad, mlp_hvp and mlp_maml: layer by layer, each
// layer's GEMMs over all tasks at once, plus fused element-wise kernels; device-generic host code over ATen tensors
// with the T tasks as the batch dimension.
//
// Every layer's matrix products are one at::bmm / at::baddbmm over [T, K, width] activations and [T, out, in]
// weights (a shared weight, [out, in], is one at::mm over the T * K rows instead). Everything element-wise runs in
// the small kernels declared below, which call the scalar C10_HOST_DEVICE functions of common/activations.h,
// common/losses.h and common/sgd_math.h: a CPU variant (at::parallel_for, cpu/mlp_elementwise.cpp) and a CUDA variant
// (grid-stride kernels, cuda/mlp_elementwise.cu). The passes and the MAML reverse recursion are the ones of
// common/mlp_passes.h and common/mlp_maml_math.h (which the per-task CPU kernel runs), spelled over whole [T, ...]
// tensors.
//
// What CUDA runs for wide networks (cuda/mlp_block.cu); on the CPU only the tests run it (see cpu/mlp.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/activations.h"
#include "common/losses.h"
#include "common/mlp_checks.h"  // MamlRowWeights
#include "common/sgd_math.h"

namespace mamlext {

// ---------------------------------------------------------------------------------------------------------------
// The three ops (argument checks included), for tensors on any device with element-wise kernels (CPU, CUDA).

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_loss_grad_layerwise(at::TensorList params, const at::Tensor& x,
                                                                      const at::Tensor& y, int64_t activation,
                                                                      double act_param, int64_t loss,
                                                                      const std::optional<at::Tensor>& weights);

std::vector<at::Tensor> mlp_hvp_layerwise(at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                        const at::Tensor& y, int64_t activation, double act_param, int64_t loss,
                                        const std::optional<at::Tensor>& weights, bool gauss_newton);

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_maml_layerwise(
    at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList lrs, const at::Tensor& step_weights, bool first_order, int64_t activation, double act_param,
    int64_t loss, const MamlRowWeights& row_weights);

// ---------------------------------------------------------------------------------------------------------------
// Element-wise kernels.

// The per-element updates of mlp_maml's inner loop and reverse recursion over a parameter's [T, S] elements, with
// operands a, b, c and a host scalar w (common/mlp_maml_math.h mlp_maml_task spells the same updates per task):
enum class MamlUpdate : int8_t {
  kSgdStep = 0,   // theta_{k+1} = sgd_update(a = theta_k, b = g_k, c = alpha_k)
  kDirection = 1,  // alpha_k * v_{k+1}: c = alpha_k, a = v
  kLrGrad = 2,     // lr_grad_k = -(v_{k+1} * g_k): a = v, b = g
  kVUpdate = 3,    // v_k = v_{k+1} - H(alpha_k * v_{k+1}) + w_k grad L_query(theta_k): a = v, b = H(...), c = grad
};

template <MamlUpdate U, typename scalar_t>
C10_HOST_DEVICE inline scalar_t maml_update_value(scalar_t a, scalar_t b, scalar_t c, scalar_t w) {
  if constexpr (U == MamlUpdate::kSgdStep) {
    return sgd_update<scalar_t>(a, b, c);
  } else if constexpr (U == MamlUpdate::kDirection) {
    return c * a;
  } else if constexpr (U == MamlUpdate::kLrGrad) {
    return -(a * b);
  } else {
    return a - b + w * c;
  }
}

// Element (t, s) of a [T, S] operand: ptr[t * task_stride + s * elem_stride]. task_stride 0: shared by the tasks
// (theta_0, a rate); elem_stride 0: one value for the whole tensor (a per-tensor rate); ptr null: the value 0.
template <typename ptr_t>
struct TaskOperand {
  ptr_t ptr = nullptr;
  int64_t task_stride = 0;
  int64_t elem_stride = 1;

  C10_HOST_DEVICE int64_t index(int64_t t, int64_t s) const { return t * task_stride + s * elem_stride; }
};

template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t operand_value(const TaskOperand<const scalar_t*>& o, int64_t t, int64_t s) {
  return o.ptr == nullptr ? scalar_t(0) : o.ptr[o.index(t, s)];
}

// One maml_update over T x S elements: out(t, s) = maml_update_value<U>(a(t, s), b(t, s), c(t, s), w).
template <typename scalar_t>
struct MamlUpdateArgs {
  MamlUpdate update = MamlUpdate::kSgdStep;
  int64_t tasks = 0, per_task = 0;  // T, S
  TaskOperand<scalar_t*> out;
  TaskOperand<const scalar_t*> a, b, c;
  scalar_t w = 0;
};

// The kernels of one device type. All tensors are contiguous and on that device; `n` counts elements.
//   activation_forward:    h = f(z)
//   activation_backward:   out = f'(z) * in                             (backward and R-forward passes)
//   activation_r_backward: rdz = f'(z) * rdz + f''(z) * dh * rz, in place (R-backward pass)
//   loss_forward_backward: per task t of z [T, K, O]: losses[t] = L_t, dz = dL_t/dz (dz may be null) and the loss
//                          parameter's gradient into param.out (when not null)
//   loss_r_backward:       per task: rdz = H_loss rz (fisher: its expectation over y), with y's rows' weights, and
//                          the loss parameter's part into param.out (common/losses.h loss_r_backward)
//   maml_update:           see MamlUpdateArgs
// CPU: cpu/mlp_elementwise.cpp.
namespace cpu_elementwise {
template <typename scalar_t>
void activation_forward(Activation act, scalar_t param, int64_t n, const scalar_t* z, scalar_t* h);
template <typename scalar_t>
void activation_backward(Activation act, scalar_t param, int64_t n, const scalar_t* z, const scalar_t* h,
                         const scalar_t* in, scalar_t* out);
template <typename scalar_t>
void activation_r_backward(Activation act, scalar_t param, int64_t n, const scalar_t* z, const scalar_t* h,
                           const scalar_t* dh, const scalar_t* rz, scalar_t* rdz);
template <typename scalar_t>
void loss_forward_backward(Loss loss, int64_t tasks, int64_t K, int64_t O, const scalar_t* z,
                           TaskTargets<scalar_t> y, TaskLossParams<scalar_t> param, scalar_t* losses, scalar_t* dz);
template <typename scalar_t>
void loss_r_backward(Loss loss, int64_t tasks, int64_t K, int64_t O, const scalar_t* z, TaskTargets<scalar_t> y,
                     TaskLossParams<scalar_t> param, bool fisher, const scalar_t* rz, scalar_t* rdz);
template <typename scalar_t>
void maml_update(const MamlUpdateArgs<scalar_t>& args);
}  // namespace cpu_elementwise

#ifdef MAMLEXT_WITH_CUDA
// Same signatures; launched on the current CUDA stream of the current device (cuda/mlp_elementwise.cu).
namespace cuda_elementwise {
template <typename scalar_t>
void activation_forward(Activation act, scalar_t param, int64_t n, const scalar_t* z, scalar_t* h);
template <typename scalar_t>
void activation_backward(Activation act, scalar_t param, int64_t n, const scalar_t* z, const scalar_t* h,
                         const scalar_t* in, scalar_t* out);
template <typename scalar_t>
void activation_r_backward(Activation act, scalar_t param, int64_t n, const scalar_t* z, const scalar_t* h,
                           const scalar_t* dh, const scalar_t* rz, scalar_t* rdz);
template <typename scalar_t>
void loss_forward_backward(Loss loss, int64_t tasks, int64_t K, int64_t O, const scalar_t* z,
                           TaskTargets<scalar_t> y, TaskLossParams<scalar_t> param, scalar_t* losses, scalar_t* dz);
template <typename scalar_t>
void loss_r_backward(Loss loss, int64_t tasks, int64_t K, int64_t O, const scalar_t* z, TaskTargets<scalar_t> y,
                     TaskLossParams<scalar_t> param, bool fisher, const scalar_t* rz, scalar_t* rdz);
template <typename scalar_t>
void maml_update(const MamlUpdateArgs<scalar_t>& args);
}  // namespace cuda_elementwise
#endif

// The explicit instantiations of one device type's kernels for scalar_t, in the file that defines them.
#define MAMLEXT_INSTANTIATE_ELEMENTWISE(scalar_t)                                                                    \
  template void activation_forward<scalar_t>(Activation, scalar_t, int64_t, const scalar_t*, scalar_t*);             \
  template void activation_backward<scalar_t>(Activation, scalar_t, int64_t, const scalar_t*, const scalar_t*,       \
                                              const scalar_t*, scalar_t*);                                           \
  template void activation_r_backward<scalar_t>(Activation, scalar_t, int64_t, const scalar_t*, const scalar_t*,     \
                                                const scalar_t*, const scalar_t*, scalar_t*);                        \
  template void loss_forward_backward<scalar_t>(Loss, int64_t, int64_t, int64_t, const scalar_t*,                    \
                                                TaskTargets<scalar_t>, TaskLossParams<scalar_t>, scalar_t*,          \
                                                scalar_t*);                                                          \
  template void loss_r_backward<scalar_t>(Loss, int64_t, int64_t, int64_t, const scalar_t*, TaskTargets<scalar_t>,   \
                                          TaskLossParams<scalar_t>, bool, const scalar_t*, scalar_t*);               \
  template void maml_update<scalar_t>(const MamlUpdateArgs<scalar_t>&);

}  // namespace mamlext
