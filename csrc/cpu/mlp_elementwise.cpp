// CPU variants of the layerwise MLP implementation's element-wise kernels (declared in layerwise/mlp_layerwise.h):
// at::parallel_for over elements (or tasks), each chunk one call of the shared C10_HOST_DEVICE loops of
// common/activations.h, common/losses.h and common/sgd_math.h (through mlp_layerwise.h's maml_update), the ones
// cuda/mlp_elementwise.cu runs on the GPU.
#include <ATen/Parallel.h>

#include <algorithm>

#include "layerwise/mlp_layerwise.h"

namespace mamlext {
namespace cpu_elementwise {
namespace {

// Elements per parallel chunk of an element-wise pass (the transcendental activations cost ~10-50 flops each).
constexpr int64_t kElementGrain = 1 << 14;

// Tasks per chunk so that a chunk holds at least ~kElementGrain elements.
int64_t task_grain(int64_t per_task) { return std::max<int64_t>(1, kElementGrain / std::max<int64_t>(per_task, 1)); }

template <MamlUpdate U, typename scalar_t>
void maml_update_rows(const MamlUpdateArgs<scalar_t>& m) {
  const int64_t S = m.per_task;
  at::parallel_for(0, m.tasks * S, kElementGrain, [&](int64_t begin, int64_t end) {
    // [begin, end) split at task boundaries, so that the inner loop runs over one task's contiguous elements.
    for (int64_t e = begin; e < end;) {
      const int64_t t = e / S, s0 = e - t * S, s1 = std::min(S, s0 + (end - e));
      scalar_t* out = m.out.ptr + t * m.out.task_stride;
      for (int64_t s = s0; s < s1; ++s) {
        out[s * m.out.elem_stride] = maml_update_value<U, scalar_t>(operand_value(m.a, t, s), operand_value(m.b, t, s),
                                                              operand_value(m.c, t, s), m.w);
      }
      e += s1 - s0;
    }
  });
}

}  // namespace

template <typename scalar_t>
void activation_forward(Activation act, scalar_t param, int64_t n, const scalar_t* z, scalar_t* h) {
  at::parallel_for(0, n, kElementGrain, [&](int64_t begin, int64_t end) {
    ::mamlext::activation_forward(SerialTeam(), act, param, end - begin, z + begin, h + begin);
  });
}

template <typename scalar_t>
void activation_backward(Activation act, scalar_t param, int64_t n, const scalar_t* z, const scalar_t* h,
                         const scalar_t* in, scalar_t* out) {
  at::parallel_for(0, n, kElementGrain, [&](int64_t begin, int64_t end) {
    ::mamlext::activation_backward(SerialTeam(), act, param, end - begin, z + begin, h + begin, in + begin,
                                   out + begin);
  });
}

template <typename scalar_t>
void activation_r_backward(Activation act, scalar_t param, int64_t n, const scalar_t* z, const scalar_t* h,
                           const scalar_t* dh, const scalar_t* rz, scalar_t* rdz) {
  at::parallel_for(0, n, kElementGrain, [&](int64_t begin, int64_t end) {
    ::mamlext::activation_r_backward(SerialTeam(), act, param, end - begin, z + begin, h + begin, dh + begin,
                                     rz + begin, rdz + begin);
  });
}

template <typename scalar_t>
void loss_forward_backward(Loss loss, int64_t tasks, int64_t K, int64_t O, const scalar_t* z,
                           TaskTargets<scalar_t> y, TaskLossParams<scalar_t> param, scalar_t* losses, scalar_t* dz) {
  const int64_t n = K * O;
  at::parallel_for(0, tasks, task_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      losses[t] = ::mamlext::loss_forward_backward(SerialTeam(), loss, K, O, z + t * n, y.at(t),
                                                   dz == nullptr ? dz : dz + t * n, param.at(t));
    }
  });
}

template <typename scalar_t>
void loss_r_backward(Loss loss, int64_t tasks, int64_t K, int64_t O, const scalar_t* z, TaskTargets<scalar_t> y,
                     TaskLossParams<scalar_t> param, bool fisher, const scalar_t* rz, scalar_t* rdz) {
  const int64_t n = K * O;
  at::parallel_for(0, tasks, task_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      ::mamlext::loss_r_backward(SerialTeam(), loss, K, O, z + t * n, y.at(t), rz + t * n, rdz + t * n, param.at(t),
                                 fisher);
    }
  });
}

template <typename scalar_t>
void maml_update(const MamlUpdateArgs<scalar_t>& args) {
  switch (args.update) {
    case MamlUpdate::kSgdStep: maml_update_rows<MamlUpdate::kSgdStep>(args); break;
    case MamlUpdate::kDirection: maml_update_rows<MamlUpdate::kDirection>(args); break;
    case MamlUpdate::kLrGrad: maml_update_rows<MamlUpdate::kLrGrad>(args); break;
    case MamlUpdate::kVUpdate: maml_update_rows<MamlUpdate::kVUpdate>(args); break;
  }
}

MAMLEXT_INSTANTIATE_ELEMENTWISE(float)
MAMLEXT_INSTANTIATE_ELEMENTWISE(double)

}  // namespace cpu_elementwise
}  // namespace mamlext
