// The small dense linear algebra of one task's MLP math (common/mlp_passes.h), on raw pointers, shared by the CPU
// and CUDA kernels so that both run the same arithmetic.
//
// Every matrix product is one call of gemm (C (+)= A B, each operand read through strides, GemmOperands): blocks of C
// stay in registers while the shared dimension streams by in chunks, and each element of C is summed over that
// dimension in order, whatever the tiling; products of at most kGemmDotMaxColumns columns whose operands are both
// contiguous along the shared dimension are dot products instead, vectorized along it.
//
// The team helpers (fill, dot, axpy, team_gemm) take a team (common/team.h), the threads that run a task together:
// one on the CPU (SerialTeam), for which team_gemm is gemm; a thread block on the GPU (cuda/mlp_block.cu), whose
// members deal out small blocks of C (gemm_in_small_blocks), each summed in the same order as by gemm. fill, axpy and
// team_gemm give each member its share and return unsynced.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "common/team.h"

// Host code compiled for AVX-512, AVX2 + FMA and the baseline x86-64 (GCC), the best picked when the library loads
// (the build targets the baseline, on which the matrix loops run 4 floats per instruction, without FMA). flatten
// inlines all that such a function calls, so that all of it is compiled for the clone's instruction set.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define MAMLEXT_HOST_ISA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
// gemm is such a function of its own (called, not inlined, by its callers): one copy of its register blocks per
// instruction set instead of one per call site, which kept the CPU kernels' file compiling for minutes.
#define MAMLEXT_GEMM_FUNCTION MAMLEXT_HOST_ISA_CLONES
#else
#define MAMLEXT_HOST_ISA_CLONES
#define MAMLEXT_GEMM_FUNCTION C10_HOST_DEVICE inline
#endif

namespace mamlext {

// A loop whose partial sums may be reordered so that it vectorizes: `omp simd reduction` on the host (the build
// passes -fopenmp), nothing in device code.
#define MAMLEXT_PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define MAMLEXT_SIMD_SUM(...) MAMLEXT_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define MAMLEXT_SIMD_SUM(...)
#endif

// ---------------------------------------------------------------------------------------------------------------
// Vectors: member rank() of size() takes elements rank, rank + size, ...

template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void fill(const Team& team, int64_t n, scalar_t value, scalar_t* __restrict__ out) {
  for (int64_t j = team.rank(); j < n; j += team.size()) out[j] = value;
}

// <a, b> over n elements, returned to every member (the reduction syncs).
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline scalar_t dot(const Team& team, int64_t n, const scalar_t* __restrict__ a,
                                    const scalar_t* __restrict__ b) {
  scalar_t s = 0;
  MAMLEXT_SIMD_SUM(s)
  for (int64_t j = team.rank(); j < n; j += team.size()) s += a[j] * b[j];
  return team.sum(s);
}

// out[j] += alpha * x[j].
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void axpy(const Team& team, int64_t n, scalar_t alpha, const scalar_t* __restrict__ x,
                                 scalar_t* __restrict__ out) {
  for (int64_t j = team.rank(); j < n; j += team.size()) out[j] += alpha * x[j];
}

// ---------------------------------------------------------------------------------------------------------------
// Matrix products.

// C (+)= A B for C [M, N], A [M, depth] and B [depth, N], each read through two strides: A[r, p] = a[r * a_row +
// p * a_col] (a matrix, its transpose, or with zero strides a constant), B[p, j] = b[p * ldb + j * b_col] (b_col 1:
// row-major; ldb 1: B^T row-major, the dot-product form below), C[r, j] = c[r * ldc + j * c_col] (c_col other than 1:
// C written transposed). Without accumulate, C = bias + A B when bias [N] is not null.
template <typename scalar_t>
struct GemmOperands {
  int64_t M = 0, N = 0, depth = 0;
  const scalar_t* a = nullptr;
  int64_t a_row = 0, a_col = 0;
  const scalar_t* b = nullptr;
  int64_t ldb = 0, b_col = 1;
  scalar_t* c = nullptr;
  int64_t ldc = 0, c_col = 1;
  const scalar_t* bias = nullptr;

  C10_HOST_DEVICE scalar_t* c_at(int64_t r, int64_t j) const { return c + r * ldc + j * c_col; }
  C10_HOST_DEVICE scalar_t initial(int64_t j, bool accumulate, int64_t r) const {
    return accumulate ? *c_at(r, j) : bias != nullptr ? bias[j] : scalar_t(0);
  }
};

template <typename scalar_t>
C10_HOST_DEVICE inline GemmOperands<scalar_t> gemm_operands(int64_t M, int64_t N, int64_t depth, const scalar_t* a,
                                                            int64_t a_row, int64_t a_col, const scalar_t* b,
                                                            int64_t ldb, scalar_t* c, int64_t ldc) {
  GemmOperands<scalar_t> g;
  g.M = M, g.N = N, g.depth = depth;
  g.a = a, g.a_row = a_row, g.a_col = a_col;
  g.b = b, g.ldb = ldb;
  g.c = c, g.ldc = ldc;
  return g;
}

// The same operands over the shared dimension's [p0, p0 + depth) only.
template <typename scalar_t>
C10_HOST_DEVICE inline GemmOperands<scalar_t> depth_slice(GemmOperands<scalar_t> g, int64_t p0, int64_t depth) {
  g.a += p0 * g.a_col;
  g.b += p0 * g.ldb;
  g.depth = depth;
  return g;
}

// Products with at most this many columns whose A rows and B columns are both contiguous (a_col == 1, ldb == 1) are
// dot products, vectorized along the shared dimension: a tile of C would use a few lanes of each vector. A layer
// with this many outputs or fewer (a policy's actions) keeps its weight untransposed for that (common/mlp_passes.h).
constexpr int64_t kGemmDotMaxColumns = 4;

template <typename scalar_t>
C10_HOST_DEVICE inline bool is_dot_form(const GemmOperands<scalar_t>& g) {
  return g.N <= kGemmDotMaxColumns && g.a_col == 1 && g.ldb == 1;
}

// Rows [r0, r0 + MR) x columns [c0, c0 + NR) of C, held in registers over the whole shared dimension.
#if defined(__GNUC__) && !defined(__CUDACC__)
// Host: with GCC's vector types, spelled out so that the compiler keeps the accumulators in registers (from plain
// arrays it kept them on the stack outside the inner loop). NR * sizeof(scalar_t) is 128, 32, 16 or 8 bytes (two
// 64-byte vectors or one vector per row), or NR is 1. The arithmetic is the same as the portable version below.
template <typename scalar_t, int Bytes>
struct HostVector {
  typedef scalar_t type __attribute__((vector_size(Bytes)));
};

// kContiguousC false: C written transposed (g.c_col), lane by lane; a template argument, since a run-time choice in
// the block made the compiler keep the accumulators in memory.
template <int MR, int NR, typename scalar_t, bool kContiguousC = true>
inline void gemm_block(const GemmOperands<scalar_t>& g, int64_t r0, int64_t c0, bool accumulate) {
  constexpr int kBytes = NR * static_cast<int>(sizeof(scalar_t)) >= 64 ? 64 : NR * static_cast<int>(sizeof(scalar_t));
  constexpr int kLanes = kBytes / static_cast<int>(sizeof(scalar_t)), kVectors = NR / kLanes;
  using V = typename HostVector<scalar_t, kBytes>::type;
  static_assert(kVectors * kLanes == NR, "gemm_block: NR must fill whole vectors");
  V acc[MR][kVectors];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < kVectors; ++v) {
      const int64_t j0 = c0 + v * kLanes;
      if (accumulate) {
        if constexpr (kContiguousC) {
          __builtin_memcpy(&acc[r][v], g.c_at(r0 + r, j0), kBytes);
        } else {
          scalar_t values[kLanes];
          for (int lane = 0; lane < kLanes; ++lane) values[lane] = *g.c_at(r0 + r, j0 + lane);
          __builtin_memcpy(&acc[r][v], values, kBytes);
        }
      } else if (g.bias != nullptr) {
        __builtin_memcpy(&acc[r][v], g.bias + j0, kBytes);
      } else {
        acc[r][v] = V{};
      }
    }
  }
  const scalar_t* a = g.a + r0 * g.a_row;
  const scalar_t* b = g.b + c0;
  for (int64_t p = 0; p < g.depth; ++p) {
    V b_row[kVectors];
    for (int v = 0; v < kVectors; ++v) __builtin_memcpy(&b_row[v], b + p * g.ldb + v * kLanes, kBytes);
    for (int r = 0; r < MR; ++r) {
      // Broadcast as a[..] - 0, which is a[..] exactly for every float (-0 included), so the compiler emits a plain
      // broadcast, folded into the multiply-add; 0 + a[..] is not exact for -0, and its extra scalar add on every
      // element of A cost ~10% of the kernel.
      const V a_rp = a[r * g.a_row + p * g.a_col] - V{};
      for (int v = 0; v < kVectors; ++v) acc[r][v] += a_rp * b_row[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < kVectors; ++v) {
      const int64_t j0 = c0 + v * kLanes;
      if constexpr (kContiguousC) {
        __builtin_memcpy(g.c_at(r0 + r, j0), &acc[r][v], kBytes);
      } else {
        scalar_t values[kLanes];
        __builtin_memcpy(values, &acc[r][v], kBytes);
        for (int lane = 0; lane < kLanes; ++lane) *g.c_at(r0 + r, j0 + lane) = values[lane];
      }
    }
  }
}
#else
template <int MR, int NR, typename scalar_t, bool kContiguousC = true>  // c_col is read at run time here
C10_HOST_DEVICE inline void gemm_block(const GemmOperands<scalar_t>& g, int64_t r0, int64_t c0, bool accumulate) {
  scalar_t acc[MR][NR];
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) acc[r][j] = g.initial(c0 + j, accumulate, r0 + r);
  }
  const scalar_t* a = g.a + r0 * g.a_row;
  const scalar_t* b = g.b + c0 * g.b_col;
  // Not unrolled on the GPU: unrolled at each of the kernels' many call sites, the loop used every register
  // there is and spilled.
#if defined(__CUDA_ARCH__)
#pragma unroll 1
#endif
  for (int64_t p = 0; p < g.depth; ++p) {
    for (int r = 0; r < MR; ++r) {
      const scalar_t a_rp = a[r * g.a_row + p * g.a_col];
      for (int j = 0; j < NR; ++j) acc[r][j] += a_rp * b[p * g.ldb + j * g.b_col];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) *g.c_at(r0 + r, c0 + j) = acc[r][j];
  }
}
#endif

// Rows [r0, r0 + MR), all N columns: blocks of 128 bytes of columns (two AVX-512 registers per row), then of 32
// bytes, then of 16, then a pair of floats, then single columns. Each block streams A's rows over the whole shared dimension once, so the
// 16-byte blocks matter: without them a width of 100 floats took 3 wide blocks and 4 single columns (7 passes over A
// instead of 4), and the per-task kernels ran 1.5-2x slower than at a width of 96.
template <int MR, typename scalar_t, bool kContiguousC = true>
C10_HOST_DEVICE inline void gemm_rows(const GemmOperands<scalar_t>& g, int64_t r0, bool accumulate) {
  constexpr int kWide = static_cast<int>(128 / sizeof(scalar_t)), kNarrow = static_cast<int>(32 / sizeof(scalar_t));
  constexpr int kSmall = static_cast<int>(16 / sizeof(scalar_t)), kPair = 2;
  int64_t c = 0;
  for (; c + kWide <= g.N; c += kWide) gemm_block<MR, kWide, scalar_t, kContiguousC>(g, r0, c, accumulate);
  for (; c + kNarrow <= g.N; c += kNarrow) gemm_block<MR, kNarrow, scalar_t, kContiguousC>(g, r0, c, accumulate);
  for (; c + kSmall <= g.N; c += kSmall) gemm_block<MR, kSmall, scalar_t, kContiguousC>(g, r0, c, accumulate);
  if constexpr (kSmall > kPair) {  // float: 2 columns in one 8-byte block (a policy's 2 actions)
    if (c + kPair <= g.N) {
      gemm_block<MR, kPair, scalar_t, kContiguousC>(g, r0, c, accumulate);
      c += kPair;
    }
  }
  for (; c < g.N; ++c) gemm_block<MR, 1, scalar_t, kContiguousC>(g, r0, c, accumulate);
}

// At most 6 rows per block: 12 accumulator registers for the widest blocks, so that the multiply-adds of a block
// are independent enough to fill the FMA units.
constexpr int kGemmMaxRows = 6;

template <typename scalar_t>
C10_HOST_DEVICE inline void gemm_rows_n(int64_t rows, const GemmOperands<scalar_t>& g, int64_t r0, bool accumulate) {
  switch (rows) {
    case 6: gemm_rows<6>(g, r0, accumulate); break;
    case 5: gemm_rows<5>(g, r0, accumulate); break;
    case 4: gemm_rows<4>(g, r0, accumulate); break;
    case 3: gemm_rows<3>(g, r0, accumulate); break;
    case 2: gemm_rows<2>(g, r0, accumulate); break;
    default: gemm_rows<1>(g, r0, accumulate); break;
  }
}

// Rows first, first + step, ... of a dot-form C (is_dot_form): one dot product per element. The team's path (a GPU
// block's members take rows in turn), and the host's where GCC's vector types are not available.
template <typename scalar_t>
C10_HOST_DEVICE inline void gemm_dot_rows(const GemmOperands<scalar_t>& g, bool accumulate, int64_t first,
                                          int64_t step) {
  for (int64_t r = first; r < g.M; r += step) {
    for (int64_t j = 0; j < g.N; ++j) {
      const scalar_t s = dot(SerialTeam(), g.depth, g.a + r * g.a_row, g.b + j * g.b_col);
      *g.c_at(r, j) = g.initial(j, accumulate, r) + s;
    }
  }
}

#if defined(__GNUC__) && !defined(__CUDACC__)
// The sum of a vector's lanes: halves added, then their halves, ...
template <typename scalar_t, int Bytes>
inline scalar_t lane_sum(const typename HostVector<scalar_t, Bytes>::type& v) {
  if constexpr (Bytes == 2 * static_cast<int>(sizeof(scalar_t))) {
    return v[0] + v[1];
  } else {
    using Half = typename HostVector<scalar_t, Bytes / 2>::type;
    Half low, high;
    __builtin_memcpy(&low, &v, Bytes / 2);
    __builtin_memcpy(&high, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
    return lane_sum<scalar_t, Bytes / 2>(low + high);
  }
}

// Rows [r0, r0 + R) of a dot-form C with N columns: per element a vector of partial sums over the shared dimension,
// a vector's lanes at a time, its lanes added up (lane_sum), then the last depth % lanes products one by one.
template <int R, int N, typename scalar_t>
inline void gemm_dot_block(const GemmOperands<scalar_t>& g, int64_t r0, bool accumulate) {
  constexpr int kBytes = 64, kLanes = kBytes / static_cast<int>(sizeof(scalar_t));
  using V = typename HostVector<scalar_t, kBytes>::type;
  V acc[R][N];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < N; ++j) acc[r][j] = V{};
  }
  const int64_t vector_end = g.depth - g.depth % kLanes;
  for (int64_t p = 0; p < vector_end; p += kLanes) {
    V b[N];
    for (int j = 0; j < N; ++j) __builtin_memcpy(&b[j], g.b + j * g.b_col + p, kBytes);
    for (int r = 0; r < R; ++r) {
      V a;
      __builtin_memcpy(&a, g.a + (r0 + r) * g.a_row + p, kBytes);
      for (int j = 0; j < N; ++j) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    const scalar_t* a = g.a + (r0 + r) * g.a_row;
    for (int j = 0; j < N; ++j) {
      scalar_t s = lane_sum<scalar_t, kBytes>(acc[r][j]);
      for (int64_t p = vector_end; p < g.depth; ++p) s += a[p] * g.b[j * g.b_col + p];
      *g.c_at(r0 + r, j) = g.initial(j, accumulate, r0 + r) + s;
    }
  }
}

// All rows of a dot-form C with N columns: blocks of R rows (R * N <= 8 accumulators), the last rows one by one.
template <int N, typename scalar_t>
inline void gemm_dot_columns(const GemmOperands<scalar_t>& g, bool accumulate) {
  constexpr int R = 8 / N;
  int64_t r = 0;
  for (; r + R <= g.M; r += R) gemm_dot_block<R, N>(g, r, accumulate);
  for (; r < g.M; ++r) gemm_dot_block<1, N>(g, r, accumulate);
}

template <typename scalar_t>
inline void gemm_dot(const GemmOperands<scalar_t>& g, bool accumulate) {
  static_assert(kGemmDotMaxColumns == 4, "gemm_dot: one case per column count");
  switch (g.N) {
    case 1: gemm_dot_columns<1>(g, accumulate); break;
    case 2: gemm_dot_columns<2>(g, accumulate); break;
    case 3: gemm_dot_columns<3>(g, accumulate); break;
    case 4: gemm_dot_columns<4>(g, accumulate); break;
    default: break;  // N == 0: nothing to write
  }
}
#else
template <typename scalar_t>
C10_HOST_DEVICE inline void gemm_dot(const GemmOperands<scalar_t>& g, bool accumulate) {
  gemm_dot_rows(g, accumulate, 0, 1);
}
#endif

// The shared dimension in chunks of at most this many: a product over a task's rows (a layer's parameter gradient,
// depth K) would stream all K rows of B from beyond L2 once per block of C's rows; a chunk's rows stay in L2 while
// all blocks read them. C carries the partial sums from chunk to chunk, so each element is summed in the same order.
// Measured on a 2-100-100-2 network, K = 2000 (one core): such a product 570 -> 465 us.
constexpr int64_t kGemmDepthChunk = 256;

// C = A B (accumulate: C += A B) over depth [0, g.depth), in blocks of rows of equal size (at most kGemmMaxRows; the
// last may be smaller): 10 rows are two blocks of 5 rather than 6 + 4. C written transposed goes a row at a time.
template <typename scalar_t>
C10_HOST_DEVICE inline void gemm_row_blocks(const GemmOperands<scalar_t>& g, bool accumulate) {
  if (g.c_col != 1) {  // C written transposed (few rows: linear_param_grad's narrow inputs): a row at a time
    for (int64_t r = 0; r < g.M; ++r) gemm_rows<1, scalar_t, false>(g, r, accumulate);
    return;
  }
  const int64_t blocks = (g.M + kGemmMaxRows - 1) / kGemmMaxRows;
  const int64_t rows = blocks == 0 ? 0 : (g.M + blocks - 1) / blocks;
  for (int64_t r = 0; r < g.M; r += rows) gemm_rows_n(g.M - r < rows ? g.M - r : rows, g, r, accumulate);
}

// The tiled products and the dot form, each compiled once per instruction set (MAMLEXT_GEMM_FUNCTION): in one
// function with gemm's chunk loop, the tiled blocks ran 5-25% slower.
template <typename scalar_t>
MAMLEXT_GEMM_FUNCTION void gemm_tiled(const GemmOperands<scalar_t>& g, bool accumulate) {
  gemm_row_blocks(g, accumulate);
}

template <typename scalar_t>
MAMLEXT_GEMM_FUNCTION void gemm_dot_form(const GemmOperands<scalar_t>& g, bool accumulate) {
  gemm_dot(g, accumulate);
}

// C = A B (accumulate: C += A B; without, C = bias + A B when g.bias is set): the dot form (is_dot_form) as dot
// products, any other (which must read B row-major, b_col == 1) by register-tiled blocks, the shared dimension in
// chunks (kGemmDepthChunk).
template <typename scalar_t>
C10_HOST_DEVICE inline void gemm(const GemmOperands<scalar_t>& g, bool accumulate) {
  if (is_dot_form(g)) {
    gemm_dot_form(g, accumulate);
    return;
  }
  if (g.depth <= kGemmDepthChunk) {
    gemm_tiled(g, accumulate);
    return;
  }
  for (int64_t p0 = 0; p0 < g.depth; p0 += kGemmDepthChunk) {
    const int64_t depth = g.depth - p0 < kGemmDepthChunk ? g.depth - p0 : kGemmDepthChunk;
    gemm_tiled(depth_slice(g, p0, depth), accumulate || p0 > 0);
  }
}

// Member `part` of `parts`'s share of C = A B (accumulate: C += A B; see gemm for bias) for a team of many threads (a
// GPU block): blocks of at most 2 x 2 elements of C, small enough that every thread of a block has some for the
// narrow layers, dealt out in turn; the dot form as dot products, by rows. Every element of C outside the dot form is
// summed in the same order as by gemm.
// A block of C written as g.c_col says (the portable block reads it at run time; the host's vector block takes it as
// a template argument).
template <int MR, int NR, typename scalar_t>
C10_HOST_DEVICE inline void gemm_block_any_c(const GemmOperands<scalar_t>& g, int64_t r0, int64_t c0,
                                             bool accumulate) {
#if defined(__GNUC__) && !defined(__CUDACC__)
  if (g.c_col != 1) {
    gemm_block<MR, NR, scalar_t, false>(g, r0, c0, accumulate);
    return;
  }
#endif
  gemm_block<MR, NR, scalar_t, true>(g, r0, c0, accumulate);
}

template <typename scalar_t>
C10_HOST_DEVICE inline void gemm_in_small_blocks(const GemmOperands<scalar_t>& g, bool accumulate, int part,
                                                 int parts) {
  if (is_dot_form(g)) {
    gemm_dot_rows(g, accumulate, part, parts);
    return;
  }
  const int64_t row_blocks = (g.M + 1) / 2, column_blocks = (g.N + 1) / 2;
  for (int64_t block = part; block < row_blocks * column_blocks; block += parts) {
    const int64_t r = block / column_blocks * 2, c = block % column_blocks * 2;
    const bool two_rows = r + 1 < g.M, two_columns = c + 1 < g.N;
    if (two_rows && two_columns) {
      gemm_block_any_c<2, 2>(g, r, c, accumulate);
    } else if (two_rows) {
      gemm_block_any_c<2, 1>(g, r, c, accumulate);
    } else if (two_columns) {
      gemm_block_any_c<1, 2>(g, r, c, accumulate);
    } else {
      gemm_block_any_c<1, 1>(g, r, c, accumulate);
    }
  }
}

// The team's share of C (+)= A B: one thread runs the register-tiled gemm, a team of several the small blocks.
template <typename scalar_t>
C10_HOST_DEVICE inline void team_gemm(const SerialTeam&, const GemmOperands<scalar_t>& g, bool accumulate) {
  gemm(g, accumulate);
}

template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void team_gemm(const Team& team, const GemmOperands<scalar_t>& g, bool accumulate) {
  gemm_in_small_blocks(g, accumulate, team.rank(), team.size());
}

}  // namespace mamlext
