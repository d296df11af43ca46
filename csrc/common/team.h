// Teams: the threads that run one task's MLP math (common/mlp_passes.h, common/mlp_maml_math.h) together.
//
// The per-task passes are written once, for any team: member rank() of size() takes the elements
// rank, rank + size, ... of an element-wise loop and its share of a product's register blocks; sync() separates a
// pass from the next one that reads what other members wrote; sum(x) adds every member's x and returns the total to
// all of them (a reduction is also a sync). Every member runs the same control flow: a value that steers it (a loss,
// a step weight) is the same in every member.
//
//   SerialTeam  one thread (the CPU per-task kernel): all constexpr, so the loops compile as plain loops.
//   BlockTeam   a CUDA thread block (cuda/mlp_block.cu).
// A team of std::threads for testing the partitioning on the CPU is in cpu/mlp.cpp.
#pragma once

#include <c10/macros/Macros.h>

namespace mamlext {

struct SerialTeam {
  C10_HOST_DEVICE static constexpr int rank() { return 0; }
  C10_HOST_DEVICE static constexpr int size() { return 1; }
  C10_HOST_DEVICE static constexpr void sync() {}
  template <typename scalar_t>
  C10_HOST_DEVICE static constexpr scalar_t sum(scalar_t x) {
    return x;
  }
};

#if defined(__CUDACC__)
// The threads of a one-dimensional block of a multiple of 32 threads. partials: shared memory for one value per
// warp (kMaxWarps).
struct BlockTeam {
  static constexpr int kMaxWarps = 32;
  double* partials;

  __device__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }

  // In double, by warp shuffles then over the warps in order: the same total in every thread.
  template <typename scalar_t>
  __device__ scalar_t sum(scalar_t x) const {
    double s = static_cast<double>(x);
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
    const int warps = (size() + 31) / 32;
    if (rank() % 32 == 0) partials[rank() / 32] = s;
    __syncthreads();
    double total = 0;
    for (int w = 0; w < warps; ++w) total += partials[w];
    __syncthreads();  // before partials is written again
    return static_cast<scalar_t>(total);
  }
};
#endif

}  // namespace mamlext
