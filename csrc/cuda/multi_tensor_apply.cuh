// Multi-tensor launches: one kernel launch covers many tensors. The kernel argument carries each tensor's
// operands and a block -> (tensor, chunk) table; when either is full the batch is launched and a new one begun,
// a tensor whose chunks straddle two launches being carried into the next. Sized to stay within the 4 KB
// kernel-argument limit that every CUDA version and GPU accepts.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace mamlext {

constexpr int kMaxTensorsPerLaunch = 32;
constexpr int kMaxBlocksPerLaunch = 320;
constexpr int64_t kChunkElements = 1 << 16;
constexpr int kThreadsPerBlock = 512;

template <typename Operands>
struct TensorTable {
  Operands tensors[kMaxTensorsPerLaunch];
  bool vectorized[kMaxTensorsPerLaunch];
  uint8_t block_tensor[kMaxBlocksPerLaunch];
  int32_t block_chunk[kMaxBlocksPerLaunch];
};

// Calls launch(table, blocks) as often as needed to cover every chunk of every non-empty tensor.
// operands(i) describes tensor i, numel(i) its element count, vectorized(i) whether its pointers allow
// aligned vector access.
template <typename Operands, typename OperandsFn, typename NumelFn, typename VectorizedFn, typename LaunchFn>
void multi_tensor_apply(size_t num_tensors, OperandsFn operands, NumelFn numel, VectorizedFn vectorized,
                        LaunchFn launch) {
  static_assert(sizeof(TensorTable<Operands>) + 64 <= 4096, "kernel argument exceeds 4 KB");
  TensorTable<Operands> table;
  int tensors = 0;
  int blocks = 0;
  for (size_t i = 0; i < num_tensors; ++i) {
    const int64_t n = numel(i);
    if (n == 0) continue;
    table.tensors[tensors] = operands(i);
    table.vectorized[tensors] = vectorized(i);
    ++tensors;
    const int64_t chunks = (n + kChunkElements - 1) / kChunkElements;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      table.block_tensor[blocks] = static_cast<uint8_t>(tensors - 1);
      table.block_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      const bool last_chunk = chunk == chunks - 1;
      if (blocks == kMaxBlocksPerLaunch || (last_chunk && tensors == kMaxTensorsPerLaunch)) {
        launch(table, blocks);
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the rest of this tensor's chunks go into the next launch
          table.tensors[0] = table.tensors[tensors - 1];
          table.vectorized[0] = table.vectorized[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(table, blocks);
}

}  // namespace mamlext
