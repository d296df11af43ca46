// Which implementation the CPU kernels of the fused MLP ops (cpu/mlp.cpp) run: the per-task kernel of
// common/mlp_tasks.h (one task per thread, its matrices in cache; the faster one wherever measured) or the batched
// GEMM one of layerwise/mlp_layerwise.h (what CUDA runs for wide networks). See mlp_cpu_path in cpu/mlp.cpp for the
// MAMLEXT_MLP_CPU_PATH environment variable that chooses.
#pragma once

#include <string>

namespace mamlext {

// The path of the most recent CPU call of mlp_loss_grad / mlp_hvp / mlp_maml in this process: "per_task",
// "batched", "team", or "" before the first (for tests; exposed as mamlext._C.mlp_cpu_last_path()).
std::string mlp_cpu_last_path();

}  // namespace mamlext
