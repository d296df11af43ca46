// One task's MLP math for the fused ops mlp_loss_grad, mlp_hvp and mlp_maml, on raw pointers, shared by the CPU and
// CUDA kernels so that both run the same arithmetic.
//
// The network has L Linear layers with activation f between them and none after the last. Layer l (0-based) maps
// width[l] features to width[l + 1]: z_l = h_{l-1} W_l^T + b_l (h_{-1} = x), h_l = f(z_l) for l < L - 1, and the
// output is z_{L-1}. A task's rows are K samples; every matrix is row-major and contiguous: x [K, width[0]],
// W_l [width[l+1], width[l]], z_l/h_l [K, width[l+1]].
//
// Backward pass (dL/d·): dz_{L-1} from the loss; gW_l = dz_l^T h_{l-1}, gb_l = sum_k dz_l;
//   dh_{l-1} = dz_l W_l, dz_{l-1} = f'(z_{l-1}) * dh_{l-1}.
// Hessian-vector product by Pearlmutter's R-operator, R{·} the directional derivative along v = (VW_l, Vb_l):
//   R-forward:  Rz_l = Rh_{l-1} W_l^T + h_{l-1} VW_l^T + Vb_l (Rh_{-1} = 0), Rh_l = f'(z_l) * Rz_l;
//   R-backward: Rdz_{L-1} = H_loss Rz_{L-1}; (Hv)_W_l = Rdz_l^T h_{l-1} + dz_l^T Rh_{l-1}, (Hv)_b_l = sum_k Rdz_l;
//               Rdh_{l-1} = Rdz_l W_l + dz_l VW_l, Rdz_{l-1} = f'(z_{l-1}) * Rdh_{l-1} + f''(z_{l-1}) * dh_{l-1} * Rz_{l-1}.
//
// Every matrix product is one register-tiled kernel, gemm (C (+)= A B, B row-major): blocks of C stay in registers
// while the shared dimension streams by, and each element of C is summed over that dimension in order, whatever the
// tiling (but for single-column products: dot products, vectorized). The forward products h W^T therefore read the
// weights transposed (MlpForwardWeights: W^T [in, out], made once per parameter set by transpose_weights); the
// backward products read W as it is.
//
// Every pass takes a team (common/team.h), the threads that run the task together: one on the CPU (SerialTeam),
// a thread block on the GPU (cuda/mlp_block.cu). They split each loop and product (a team of several threads deals
// out small blocks of C, gemm_in_small_blocks, each summed in the same order) and sync between passes.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "common/activations.h"
#include "common/losses.h"
#include "common/sgd_math.h"
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

constexpr int kMlpMaxLayers = 16;

// The layer widths: layer l maps width[l] features to width[l + 1].
struct MlpDims {
  int layers = 0;
  int64_t width[kMlpMaxLayers + 1] = {};

  C10_HOST_DEVICE int num_params() const { return 2 * layers; }
  C10_HOST_DEVICE int64_t in(int l) const { return width[l]; }
  C10_HOST_DEVICE int64_t out(int l) const { return width[l + 1]; }
  C10_HOST_DEVICE int64_t output_width() const { return width[layers]; }
  // Elements of params[p]: p = 2l is layer l's weight [out, in], p = 2l + 1 its bias [out].
  C10_HOST_DEVICE int64_t param_numel(int p) const {
    return p % 2 == 0 ? width[p / 2 + 1] * width[p / 2] : width[p / 2 + 1];
  }
  C10_HOST_DEVICE int64_t total_param_numel() const {
    int64_t n = 0;
    for (int p = 0; p < num_params(); ++p) n += param_numel(p);
    return n;
  }
  // Sum of the layers' output widths: the size of one per-layer activation array for one row.
  C10_HOST_DEVICE int64_t layer_outputs_width() const {
    int64_t n = 0;
    for (int l = 0; l < layers; ++l) n += out(l);
    return n;
  }
};

struct MlpConfig {
  MlpDims dims;
  Activation activation = Activation::kRelu;
  double act_param = 0.0;  // negative_slope of leaky_relu, alpha of elu
  Loss loss = Loss::kMse;
};

// One task's parameter tensors (or tensors shaped like them: gradients, directions), in params order
// [W_0, b_0, W_1, b_1, ...]; ptr_t is `const scalar_t*` or `scalar_t*`.
template <typename ptr_t>
struct MlpParams {
  ptr_t ptr[2 * kMlpMaxLayers] = {};

  C10_HOST_DEVICE ptr_t weight(int l) const { return ptr[2 * l]; }
  C10_HOST_DEVICE ptr_t bias(int l) const { return ptr[2 * l + 1]; }
};

// Views the flat buffer base [dims.total_param_numel()] as parameter tensors.
template <typename scalar_t>
C10_HOST_DEVICE inline MlpParams<scalar_t*> carve_params(const MlpDims& d, scalar_t* base) {
  MlpParams<scalar_t*> p;
  for (int i = 0; i < d.num_params(); ++i) {
    p.ptr[i] = base;
    base += d.param_numel(i);
  }
  return p;
}

template <typename scalar_t>
C10_HOST_DEVICE inline MlpParams<const scalar_t*> as_const(const MlpParams<scalar_t*>& p) {
  MlpParams<const scalar_t*> c;
  for (int i = 0; i < 2 * kMlpMaxLayers; ++i) c.ptr[i] = p.ptr[i];
  return c;
}

// The weights of a parameter set as the forward passes read them: w[l] = W_l^T [in, out], row-major. A layer with
// one input or one output feature is its own transpose in memory (w[l] is then W_l itself); the others are copied
// into a buffer of mlp_transposed_numel elements.
template <typename scalar_t>
struct MlpForwardWeights {
  const scalar_t* w[kMlpMaxLayers] = {};
};

C10_HOST_DEVICE inline bool layer_copies_transpose(const MlpDims& d, int l) { return d.in(l) > 1 && d.out(l) > 1; }

C10_HOST_DEVICE inline int64_t mlp_transposed_numel(const MlpDims& d) {
  int64_t n = 0;
  for (int l = 0; l < d.layers; ++l) n += layer_copies_transpose(d, l) ? d.in(l) * d.out(l) : 0;
  return n;
}

// Where p's forward weights are, the copies in buffer [mlp_transposed_numel(d)] (written by transpose_weights).
template <typename scalar_t>
C10_HOST_DEVICE inline MlpForwardWeights<scalar_t> forward_weights(const MlpDims& d,
                                                                    const MlpParams<const scalar_t*>& p,
                                                                    const scalar_t* buffer) {
  MlpForwardWeights<scalar_t> f;
  for (int l = 0; l < d.layers; ++l) {
    const bool copy = layer_copies_transpose(d, l);
    f.w[l] = copy ? buffer : p.weight(l);
    if (copy) buffer += d.in(l) * d.out(l);
  }
  return f;
}

// Writes p's transposed weights to buffer [mlp_transposed_numel(d)], the team's members taking turns by tiles;
// returns p's forward weights, synced.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline MlpForwardWeights<scalar_t> transpose_weights(const Team& team, const MlpDims& d,
                                                                      const MlpParams<const scalar_t*>& p,
                                                                      scalar_t* buffer) {
  const MlpForwardWeights<scalar_t> f = forward_weights(d, p, static_cast<const scalar_t*>(buffer));
  for (int l = 0; l < d.layers; ++l) {
    if (!layer_copies_transpose(d, l)) continue;
    const int64_t I = d.in(l), O = d.out(l);
    const scalar_t* __restrict__ W = p.weight(l);
    scalar_t* __restrict__ WT = const_cast<scalar_t*>(f.w[l]);
    // In tiles, so that the rows a tile writes stay in L1 (column by column, a wide W misses on every element).
    constexpr int64_t kTile = 16;
    int64_t tile = 0;
    for (int64_t o0 = 0; o0 < O; o0 += kTile) {
      for (int64_t i0 = 0; i0 < I; i0 += kTile) {
        if (tile++ % team.size() != team.rank()) continue;
        const int64_t o_end = o0 + kTile < O ? o0 + kTile : O, i_end = i0 + kTile < I ? i0 + kTile : I;
        for (int64_t o = o0; o < o_end; ++o) {
          for (int64_t i = i0; i < i_end; ++i) WT[i * O + o] = W[o * I + i];
        }
      }
    }
  }
  team.sync();
  return f;
}

// Per-layer values of one forward/backward (and R-) pass over K rows, each array [K, width[l + 1]] for layer l:
// z, h = f(z), dz = dL/dz, dh = dL/dh (h, dh unused for the last layer), and with R: Rz, Rh, Rdz.
template <typename scalar_t>
struct MlpActivations {
  scalar_t* z[kMlpMaxLayers] = {};
  scalar_t* h[kMlpMaxLayers] = {};
  scalar_t* dz[kMlpMaxLayers] = {};
  scalar_t* dh[kMlpMaxLayers] = {};
  scalar_t* rz[kMlpMaxLayers] = {};
  scalar_t* rh[kMlpMaxLayers] = {};
  scalar_t* rdz[kMlpMaxLayers] = {};
};

C10_HOST_DEVICE inline int64_t mlp_activations_numel(const MlpDims& d, int64_t rows, bool with_r) {
  return (with_r ? 7 : 4) * rows * d.layer_outputs_width();
}

// The arrays z, h, dz, dh from base and, when r_base is not null, rz, rh, rdz from r_base.
template <typename scalar_t>
C10_HOST_DEVICE inline MlpActivations<scalar_t> carve_activations_at(const MlpDims& d, int64_t rows, scalar_t* base,
                                                                     scalar_t* r_base) {
  MlpActivations<scalar_t> a;
  scalar_t** arrays[7] = {a.z, a.h, a.dz, a.dh, a.rz, a.rh, a.rdz};
  for (int j = 0; j < (r_base != nullptr ? 7 : 4); ++j) {
    if (j == 4) base = r_base;
    for (int l = 0; l < d.layers; ++l) {
      arrays[j][l] = base;
      base += rows * d.out(l);
    }
  }
  return a;
}

// All arrays from one buffer of mlp_activations_numel(d, rows, with_r) elements.
template <typename scalar_t>
C10_HOST_DEVICE inline MlpActivations<scalar_t> carve_activations(const MlpDims& d, int64_t rows, bool with_r,
                                                                  scalar_t* base) {
  return carve_activations_at(d, rows, base, with_r ? base + mlp_activations_numel(d, rows, false) : nullptr);
}

// ---------------------------------------------------------------------------------------------------------------
// Small dense helpers. Shapes: in [K, I], W [O, I], d/out [K, O].
//
// Teams (common/team.h): the element-wise helpers (fill, axpy) and the products (team_gemm) give each member its
// share and return unsynced; the layer helpers, the passes and the drivers below return synced, so that what they
// wrote may be read by any member.

// A loop whose partial sums may be reordered so that it vectorizes: `omp simd reduction` on the host (the build
// passes -fopenmp), nothing in device code.
#define MAMLEXT_PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define MAMLEXT_SIMD_SUM(...) MAMLEXT_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define MAMLEXT_SIMD_SUM(...)
#endif

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

// C (+)= A B for C [M, N] (row stride ldc), A [M, depth] read as A[r, p] = a[r * a_row + p * a_col] (a matrix,
// its transpose, or with zero strides a constant), B [depth, N] row-major (row stride ldb).
template <typename scalar_t>
struct GemmOperands {
  int64_t M = 0, N = 0, depth = 0;
  const scalar_t* a = nullptr;
  int64_t a_row = 0, a_col = 0;
  const scalar_t* b = nullptr;
  int64_t ldb = 0;
  scalar_t* c = nullptr;
  int64_t ldc = 0;
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

// Rows [r0, r0 + MR) x columns [c0, c0 + NR) of C, held in registers over the whole shared dimension.
#if defined(__GNUC__) && !defined(__CUDACC__)
// Host: with GCC's vector types, spelled out so that the compiler keeps the accumulators in registers (from plain
// arrays it kept them on the stack outside the inner loop). NR * sizeof(scalar_t) is 128 or 32 bytes (two 64-byte or
// one 32-byte vector per row), or NR is 1. The arithmetic is the same as the portable version below.
template <typename scalar_t, int Bytes>
struct HostVector {
  typedef scalar_t type __attribute__((vector_size(Bytes)));
};

template <int MR, int NR, typename scalar_t>
inline void gemm_block(const GemmOperands<scalar_t>& g, int64_t r0, int64_t c0, bool accumulate) {
  constexpr int kBytes = NR * static_cast<int>(sizeof(scalar_t)) >= 64 ? 64 : NR * static_cast<int>(sizeof(scalar_t));
  constexpr int kLanes = kBytes / static_cast<int>(sizeof(scalar_t)), kVectors = NR / kLanes;
  using V = typename HostVector<scalar_t, kBytes>::type;
  static_assert(kVectors * kLanes == NR, "gemm_block: NR must fill whole vectors");
  V acc[MR][kVectors];
  scalar_t* c = g.c + r0 * g.ldc + c0;
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < kVectors; ++v) {
      if (accumulate) {
        __builtin_memcpy(&acc[r][v], c + r * g.ldc + v * kLanes, kBytes);
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
      const V a_rp = V{} + a[r * g.a_row + p * g.a_col];
      for (int v = 0; v < kVectors; ++v) acc[r][v] += a_rp * b_row[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < kVectors; ++v) __builtin_memcpy(c + r * g.ldc + v * kLanes, &acc[r][v], kBytes);
  }
}
#else
template <int MR, int NR, typename scalar_t>
C10_HOST_DEVICE inline void gemm_block(const GemmOperands<scalar_t>& g, int64_t r0, int64_t c0, bool accumulate) {
  scalar_t acc[MR][NR];
  scalar_t* c = g.c + r0 * g.ldc + c0;
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) acc[r][j] = accumulate ? c[r * g.ldc + j] : scalar_t(0);
  }
  const scalar_t* a = g.a + r0 * g.a_row;
  const scalar_t* b = g.b + c0;
  for (int64_t p = 0; p < g.depth; ++p) {
    for (int r = 0; r < MR; ++r) {
      const scalar_t a_rp = a[r * g.a_row + p * g.a_col];
      for (int j = 0; j < NR; ++j) acc[r][j] += a_rp * b[p * g.ldb + j];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) c[r * g.ldc + j] = acc[r][j];
  }
}
#endif

// Rows [r0, r0 + MR), all N columns: blocks of 128 bytes of columns (two AVX-512 registers per row), then of 32
// bytes, then single columns.
template <int MR, typename scalar_t>
C10_HOST_DEVICE inline void gemm_rows(const GemmOperands<scalar_t>& g, int64_t r0, bool accumulate) {
  constexpr int kWide = static_cast<int>(128 / sizeof(scalar_t)), kNarrow = static_cast<int>(32 / sizeof(scalar_t));
  int64_t c = 0;
  for (; c + kWide <= g.N; c += kWide) gemm_block<MR, kWide>(g, r0, c, accumulate);
  for (; c + kNarrow <= g.N; c += kNarrow) gemm_block<MR, kNarrow>(g, r0, c, accumulate);
  for (; c < g.N; ++c) gemm_block<MR, 1>(g, r0, c, accumulate);
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

// A single column of C with contiguous rows of A: a dot product per row.
template <typename scalar_t>
C10_HOST_DEVICE inline bool is_dot_per_row(const GemmOperands<scalar_t>& g) {
  return g.N == 1 && g.a_col == 1 && g.ldb == 1;
}

// Rows first, first + step, ... of such a C.
template <typename scalar_t>
C10_HOST_DEVICE inline void gemm_dot_rows(const GemmOperands<scalar_t>& g, bool accumulate, int64_t first,
                                          int64_t step) {
  for (int64_t r = first; r < g.M; r += step) {
    const scalar_t s = dot(SerialTeam(), g.depth, g.a + r * g.a_row, g.b);
    g.c[r * g.ldc] = accumulate ? g.c[r * g.ldc] + s : s;
  }
}

// C = A B (accumulate: C += A B). The rows go in blocks of equal size (at most kGemmMaxRows; the last may be
// smaller): 10 rows are two blocks of 5 rather than 6 + 4. A single column with contiguous rows of A is a dot
// product per row instead.
template <typename scalar_t>
MAMLEXT_GEMM_FUNCTION void gemm(const GemmOperands<scalar_t>& g, bool accumulate) {
  if (is_dot_per_row(g)) {
    gemm_dot_rows(g, accumulate, 0, 1);
    return;
  }
  const int64_t blocks = (g.M + kGemmMaxRows - 1) / kGemmMaxRows;
  const int64_t rows = blocks == 0 ? 0 : (g.M + blocks - 1) / blocks;
  for (int64_t r = 0; r < g.M; r += rows) gemm_rows_n(g.M - r < rows ? g.M - r : rows, g, r, accumulate);
}

// Member `part` of `parts`'s share of C = A B (accumulate: C += A B) for a team of many threads (a GPU block): blocks
// of at most 2 x 2 elements of C, small enough that every thread of a block has some for the narrow layers, dealt
// out in turn; single columns with contiguous rows of A as dot products, by rows. Every element of C is summed in
// the same order as by gemm.
template <typename scalar_t>
C10_HOST_DEVICE inline void gemm_in_small_blocks(const GemmOperands<scalar_t>& g, bool accumulate, int part,
                                                 int parts) {
  if (is_dot_per_row(g)) {
    gemm_dot_rows(g, accumulate, part, parts);
    return;
  }
  const int64_t row_blocks = (g.M + 1) / 2, column_blocks = (g.N + 1) / 2;
  for (int64_t block = part; block < row_blocks * column_blocks; block += parts) {
    const int64_t r = block / column_blocks * 2, c = block % column_blocks * 2;
    const bool two_rows = r + 1 < g.M, two_columns = c + 1 < g.N;
    if (two_rows && two_columns) {
      gemm_block<2, 2>(g, r, c, accumulate);
    } else if (two_rows) {
      gemm_block<2, 1>(g, r, c, accumulate);
    } else if (two_columns) {
      gemm_block<1, 2>(g, r, c, accumulate);
    } else {
      gemm_block<1, 1>(g, r, c, accumulate);
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

// Shapes of the layer products: in [K, I], W [O, I] (WT = W^T [I, O]), d/out [K, O].

// out = bias + in W^T (each row), or with bias null out += in W^T.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void linear_forward(const Team& team, int64_t K, int64_t I, int64_t O, const scalar_t* in,
                                           const scalar_t* WT, const scalar_t* bias, scalar_t* out) {
  if (bias != nullptr) {
    for (int64_t k = team.rank(); k < K; k += team.size()) {
      for (int64_t o = 0; o < O; ++o) out[k * O + o] = bias[o];
    }
    team.sync();  // the product's blocks are dealt out otherwise
  }
  team_gemm(team, gemm_operands(K, O, I, in, I, 1, WT, O, out, O), true);
  team.sync();
}

// gW (+)= d^T in and, when gb is not null, gb (+)= sum_k d[k, :]: the gradient of the layer's parameters.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void linear_param_grad(const Team& team, int64_t K, int64_t I, int64_t O, const scalar_t* d,
                                              const scalar_t* in, scalar_t* gW, scalar_t* gb, bool accumulate) {
  team_gemm(team, gemm_operands(O, I, K, d, 1, O, in, I, gW, I), accumulate);
  if (gb != nullptr) {
    const scalar_t one = 1;  // gb (+)= ones [1, K] d
    team_gemm(team, gemm_operands(1, O, K, &one, 0, 0, d, O, gb, O), accumulate);
  }
  team.sync();
}

// din (+)= d W: the gradient of the layer's input.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void linear_input_grad(const Team& team, int64_t K, int64_t I, int64_t O, const scalar_t* d,
                                              const scalar_t* W, scalar_t* din, bool accumulate) {
  team_gemm(team, gemm_operands(K, I, O, d, O, 1, W, I, din, I), accumulate);
  team.sync();
}

// ---------------------------------------------------------------------------------------------------------------
// The four passes over one task's K rows.

// Forward: fills a.z (and a.h below the last layer); the network's output is a.z[L - 1].
// pt: p's forward weights.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void mlp_forward(const Team& team, const MlpConfig& c, int64_t K, const scalar_t* x,
                                        const MlpParams<const scalar_t*>& p, const MlpForwardWeights<scalar_t>& pt,
                                        MlpActivations<scalar_t>& a) {
  const MlpDims& d = c.dims;
  for (int l = 0; l < d.layers; ++l) {
    const scalar_t* in = l == 0 ? x : a.h[l - 1];
    linear_forward(team, K, d.in(l), d.out(l), in, pt.w[l], p.bias(l), a.z[l]);
    if (l + 1 < d.layers) {
      activation_forward(team, c.activation, static_cast<scalar_t>(c.act_param), K * d.out(l), a.z[l], a.h[l]);
      team.sync();
    }
  }
}

// Backward, from a.dz[L - 1] = dL/dz_{L-1}: fills a.dz and a.dh of every layer and, when grads is not null, writes
// the gradient w.r.t. the parameters to *grads; when dx is not null, the gradient w.r.t. the input x [K, in] to dx.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void mlp_backward(const Team& team, const MlpConfig& c, int64_t K, const scalar_t* x,
                                         const MlpParams<const scalar_t*>& p, MlpActivations<scalar_t>& a,
                                         const MlpParams<scalar_t*>* grads, scalar_t* dx = nullptr) {
  const MlpDims& d = c.dims;
  for (int l = d.layers - 1; l >= 0; --l) {
    const int64_t I = d.in(l), O = d.out(l);
    const scalar_t* in = l == 0 ? x : a.h[l - 1];
    if (grads != nullptr) linear_param_grad(team, K, I, O, a.dz[l], in, grads->weight(l), grads->bias(l), false);
    if (l > 0) {
      linear_input_grad(team, K, I, O, a.dz[l], p.weight(l), a.dh[l - 1], false);
      activation_backward(team, c.activation, static_cast<scalar_t>(c.act_param), K * I, a.z[l - 1], a.h[l - 1],
                          a.dh[l - 1], a.dz[l - 1]);
      team.sync();
    } else if (dx != nullptr) {
      linear_input_grad(team, K, I, O, a.dz[0], p.weight(0), dx, false);
    }
  }
}

// R-forward along the direction v (shaped like the parameters) and, when rx is not null, rx (shaped like the input
// x: R{x}), after mlp_forward: fills a.rz (and a.rh). pt, vt: the forward weights of p and v.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void mlp_r_forward(const Team& team, const MlpConfig& c, int64_t K, const scalar_t* x,
                                          const MlpForwardWeights<scalar_t>& pt, const MlpParams<const scalar_t*>& v,
                                          const MlpForwardWeights<scalar_t>& vt, MlpActivations<scalar_t>& a,
                                          const scalar_t* rx = nullptr) {
  const MlpDims& d = c.dims;
  for (int l = 0; l < d.layers; ++l) {
    const scalar_t* in = l == 0 ? x : a.h[l - 1];
    const scalar_t* r_in = l == 0 ? rx : a.rh[l - 1];
    linear_forward(team, K, d.in(l), d.out(l), in, vt.w[l], v.bias(l), a.rz[l]);  // h VW^T + Vb
    if (r_in != nullptr) {
      linear_forward(team, K, d.in(l), d.out(l), r_in, pt.w[l], static_cast<const scalar_t*>(nullptr),
                     a.rz[l]);  // + Rh W^T
    }
    if (l + 1 < d.layers) {
      activation_backward(team, c.activation, static_cast<scalar_t>(c.act_param), K * d.out(l), a.z[l], a.h[l],
                          a.rz[l], a.rh[l]);
      team.sync();
    }
  }
}

// R-backward, from a.rdz[L - 1] = R{dL/dz_{L-1}}, after mlp_backward and mlp_r_forward (with the same rx): writes
// H v to hv and, when rdx is not null, R{dL/dx} to rdx [K, in].
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void mlp_r_backward(const Team& team, const MlpConfig& c, int64_t K, const scalar_t* x,
                                           const MlpParams<const scalar_t*>& p, const MlpParams<const scalar_t*>& v,
                                           MlpActivations<scalar_t>& a, const MlpParams<scalar_t*>& hv,
                                           const scalar_t* rx = nullptr, scalar_t* rdx = nullptr) {
  const MlpDims& d = c.dims;
  for (int l = d.layers - 1; l >= 0; --l) {
    const int64_t I = d.in(l), O = d.out(l);
    const scalar_t* in = l == 0 ? x : a.h[l - 1];
    const scalar_t* r_in = l == 0 ? rx : a.rh[l - 1];
    linear_param_grad(team, K, I, O, a.rdz[l], in, hv.weight(l), hv.bias(l), false);  // Rdz^T h, sum_k Rdz
    if (r_in != nullptr) {
      linear_param_grad(team, K, I, O, a.dz[l], r_in, hv.weight(l), static_cast<scalar_t*>(nullptr),
                        true);  // + dz^T Rh
    }
    if (l == 0) {
      if (rdx != nullptr) {
        linear_input_grad(team, K, I, O, a.rdz[0], p.weight(0), rdx, false);
        linear_input_grad(team, K, I, O, a.dz[0], v.weight(0), rdx, true);
      }
      break;
    }
    scalar_t* rdh = a.rdz[l - 1];  // R{dL/dh_{l-1}}, turned into R{dL/dz_{l-1}} in place
    linear_input_grad(team, K, I, O, a.rdz[l], p.weight(l), rdh, false);
    linear_input_grad(team, K, I, O, a.dz[l], v.weight(l), rdh, true);
    activation_r_backward(team, c.activation, static_cast<scalar_t>(c.act_param), K * I, a.z[l - 1], a.h[l - 1],
                          a.dh[l - 1], a.rz[l - 1], rdh);
    team.sync();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-task drivers.

// One task's loss at p (forward weights pt) over its K rows (x, y); runs the forward and backward passes, leaving
// a ready for mlp_hessian_vector, and writes the gradient to *grads when grads is not null.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline scalar_t mlp_loss_and_grad(const Team& team, const MlpConfig& c, int64_t K, const scalar_t* x,
                                                  LossTarget<scalar_t> y, const MlpParams<const scalar_t*>& p,
                                                  const MlpForwardWeights<scalar_t>& pt, MlpActivations<scalar_t>& a,
                                                  const MlpParams<scalar_t*>* grads) {
  const int last = c.dims.layers - 1;
  mlp_forward(team, c, K, x, p, pt, a);
  const scalar_t loss = loss_forward_backward(team, c.loss, K, c.dims.output_width(), a.z[last], y, a.dz[last]);
  team.sync();
  mlp_backward(team, c, K, x, p, a, grads);
  return loss;
}

// hv = H v, H the Hessian of the task's loss at p, after mlp_loss_and_grad at the same p, x, y filled a.
// pt, vt: the forward weights of p and v.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void mlp_hessian_vector(const Team& team, const MlpConfig& c, int64_t K, const scalar_t* x,
                                               const MlpParams<const scalar_t*>& p, const MlpForwardWeights<scalar_t>& pt,
                                               const MlpParams<const scalar_t*>& v, const MlpForwardWeights<scalar_t>& vt,
                                               MlpActivations<scalar_t>& a, const MlpParams<scalar_t*>& hv) {
  const int last = c.dims.layers - 1;
  mlp_r_forward(team, c, K, x, pt, v, vt, a);
  loss_r_backward(team, c.loss, K, c.dims.output_width(), a.z[last], a.rz[last], a.rdz[last]);
  team.sync();
  mlp_r_backward(team, c, K, x, p, v, a, hv);
}

// The inner-loop learning rates of mlp_maml, per parameter: lr[p] is [N] (one rate per step) or [N, numel_p].
template <typename scalar_t>
struct MamlLrs {
  const scalar_t* lr[2 * kMlpMaxLayers] = {};
  bool per_element[2 * kMlpMaxLayers] = {};
};

// One task's MAML workspace, carved from one buffer of mlp_maml_scratch_numel elements.
template <typename scalar_t>
struct MamlScratch {
  scalar_t* thetas = nullptr;  // [N, P]: theta_1 .. theta_N (theta_0 is the shared meta-parameters)
  scalar_t* grads = nullptr;   // [N, P]: g_0 .. g_{N-1}, the support gradients
  scalar_t* direction = nullptr;  // [P]: alpha_k * v_{k+1}
  scalar_t* hv = nullptr;         // [P]: H_support(theta_k) direction
  scalar_t* query_grad = nullptr;  // [P]
  // [N + 2, Pt] (Pt = mlp_transposed_numel): the transposed weights of theta_0 .. theta_N and of direction.
  // theta_0's are written once per scratch by prepare_maml_scratch, for every task that uses it.
  scalar_t* transposed = nullptr;
  // The support passes' z, h, dz, dh: second order, [N] sets, one per inner step, that the reverse recursion's HVP
  // at theta_k reads instead of recomputing them; first order, one set. support_r: the R-passes' arrays.
  scalar_t* support_steps = nullptr;
  scalar_t* support_r = nullptr;
  int64_t support_rows = 0;
  MlpActivations<scalar_t> query;
};

C10_HOST_DEVICE inline int64_t mlp_maml_scratch_numel(const MlpDims& d, int64_t steps, int64_t support_rows,
                                                      int64_t query_rows, bool first_order) {
  const int64_t support = first_order ? mlp_activations_numel(d, support_rows, false)
                                      : steps * mlp_activations_numel(d, support_rows, false) +
                                            mlp_activations_numel(d, support_rows, true) -
                                            mlp_activations_numel(d, support_rows, false);
  return (2 * steps + 3) * d.total_param_numel() + (steps + 2) * mlp_transposed_numel(d) + support +
         mlp_activations_numel(d, query_rows, false);
}

// The support activations of inner step k (of the only set, first order).
template <typename scalar_t>
C10_HOST_DEVICE inline MlpActivations<scalar_t> support_activations(const MlpDims& d, const MamlScratch<scalar_t>& s,
                                                                    int64_t k) {
  const int64_t step = s.support_r == nullptr ? 0 : k;
  return carve_activations_at(d, s.support_rows, s.support_steps + step * mlp_activations_numel(d, s.support_rows, false),
                              s.support_r);
}

template <typename scalar_t>
C10_HOST_DEVICE inline MamlScratch<scalar_t> carve_maml_scratch(const MlpDims& d, int64_t steps, int64_t support_rows,
                                                                int64_t query_rows, bool first_order, scalar_t* base) {
  const int64_t P = d.total_param_numel();
  MamlScratch<scalar_t> s;
  s.thetas = base;
  s.grads = s.thetas + steps * P;
  s.direction = s.grads + steps * P;
  s.hv = s.direction + P;
  s.query_grad = s.hv + P;
  s.transposed = s.query_grad + P;
  const int64_t step_numel = mlp_activations_numel(d, support_rows, false);
  s.support_rows = support_rows;
  s.support_steps = s.transposed + (steps + 2) * mlp_transposed_numel(d);
  scalar_t* after_steps = s.support_steps + (first_order ? 1 : steps) * step_numel;
  s.support_r = first_order ? nullptr : after_steps;
  scalar_t* query = first_order ? after_steps : after_steps + mlp_activations_numel(d, support_rows, true) - step_numel;
  s.query = carve_activations(d, query_rows, false, query);
  return s;
}

// Writes theta_0's forward weights into s, once for all the tasks that use s.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void prepare_maml_scratch(const Team& team, const MlpDims& d,
                                                 const MlpParams<const scalar_t*>& theta0, MamlScratch<scalar_t>& s) {
  transpose_weights(team, d, theta0, s.transposed);
}

// One task of mlp_maml; returns its weighted query loss sum_k w_k L_query(theta_k).
//   Inner loop: theta_{k+1} = theta_k - alpha_k * g_k, g_k = grad L_support(theta_k), k = 0 .. N-1.
//   Reverse:    v_N = w_N grad L_query(theta_N); for k = N-1 .. 0:
//                 lr_grad_k = -v_{k+1} * g_k (summed over the tensor for a per-tensor rate),
//                 v_k = v_{k+1} - H_support(theta_k) (alpha_k * v_{k+1}) (first order: v_k = v_{k+1}),
//                 v_k += w_k grad L_query(theta_k) for k >= 1;
//               meta_grad = v_0.
// Query passes of steps with weight exactly 0 are skipped. meta_grad (the running v) and lr_grad ([N] or
// [N, numel_p] per parameter) are this task's outputs. Every member of the team returns the query loss.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline scalar_t mlp_maml_task(const Team& team, const MlpConfig& c, int64_t steps,
                                              const scalar_t* step_weights, bool first_order, int64_t support_rows,
                                              const scalar_t* xs, LossTarget<scalar_t> ys, int64_t query_rows, const scalar_t* xq,
                                              LossTarget<scalar_t> yq, const MlpParams<const scalar_t*>& theta0,
                                              const MamlLrs<scalar_t>& lrs, MamlScratch<scalar_t>& s,
                                              const MlpParams<scalar_t*>& meta_grad,
                                              const MlpParams<scalar_t*>& lr_grad) {
  const MlpDims& d = c.dims;
  const int num_params = d.num_params();
  const int64_t P = d.total_param_numel(), Pt = mlp_transposed_numel(d);
  auto theta = [&](int64_t k) {
    return k == 0 ? theta0 : as_const(carve_params(d, s.thetas + (k - 1) * P));
  };
  // theta_k's forward weights; the transposed copies of theta_1 .. theta_N are written as the inner loop makes them.
  auto theta_t = [&](int64_t k) {
    return forward_weights(d, theta(k), static_cast<const scalar_t*>(s.transposed + k * Pt));
  };
  auto grad = [&](int64_t k) { return carve_params(d, s.grads + k * P); };
  const MlpParams<scalar_t*> direction = carve_params(d, s.direction);
  const MlpParams<scalar_t*> hv = carve_params(d, s.hv);
  const MlpParams<scalar_t*> query_grad = carve_params(d, s.query_grad);
  const MlpParams<scalar_t*>& v = meta_grad;

  // Inner loop. Second order keeps each step's support activations for the HVP at its theta_k.
  for (int64_t k = 0; k < steps; ++k) {
    const MlpParams<const scalar_t*> theta_k = theta(k);
    const MlpParams<scalar_t*> g = grad(k);
    MlpActivations<scalar_t> support = support_activations(d, s, k);
    mlp_loss_and_grad(team, c, support_rows, xs, ys, theta_k, theta_t(k), support, &g);
    const MlpParams<scalar_t*> next = carve_params(d, s.thetas + k * P);
    for (int i = 0; i < num_params; ++i) {
      const int64_t n = d.param_numel(i);
      if (lrs.per_element[i]) {
        const scalar_t* lr = lrs.lr[i] + k * n;
        for (int64_t e = team.rank(); e < n; e += team.size()) {
          next.ptr[i][e] = sgd_update<scalar_t>(theta_k.ptr[i][e], g.ptr[i][e], lr[e]);
        }
      } else {
        const scalar_t lr = lrs.lr[i][k];
        for (int64_t e = team.rank(); e < n; e += team.size()) {
          next.ptr[i][e] = sgd_update<scalar_t>(theta_k.ptr[i][e], g.ptr[i][e], lr);
        }
      }
    }
    team.sync();
    transpose_weights(team, d, as_const(next), s.transposed + (k + 1) * Pt);
  }

  // v += w grad L_query(theta_k); returns w L_query(theta_k).
  auto add_query_term = [&](int64_t k, scalar_t w) {
    const scalar_t loss =
        mlp_loss_and_grad(team, c, query_rows, xq, yq, theta(k), theta_t(k), s.query, &query_grad);
    for (int i = 0; i < num_params; ++i) axpy(team, d.param_numel(i), w, query_grad.ptr[i], v.ptr[i]);
    team.sync();
    return w * loss;
  };

  for (int i = 0; i < num_params; ++i) fill(team, d.param_numel(i), scalar_t(0), v.ptr[i]);
  team.sync();
  scalar_t query_loss = 0;
  if (step_weights[steps - 1] != scalar_t(0)) query_loss += add_query_term(steps, step_weights[steps - 1]);

  for (int64_t k = steps - 1; k >= 0; --k) {
    const MlpParams<scalar_t*> g = grad(k);
    for (int i = 0; i < num_params; ++i) {
      const int64_t n = d.param_numel(i);
      if (lrs.per_element[i]) {
        scalar_t* out = lr_grad.ptr[i] + k * n;
        for (int64_t e = team.rank(); e < n; e += team.size()) out[e] = -(v.ptr[i][e] * g.ptr[i][e]);
      } else {
        const scalar_t v_dot_g = dot(team, n, v.ptr[i], g.ptr[i]);
        if (team.rank() == 0) lr_grad.ptr[i][k] = -v_dot_g;
      }
    }
    if (!first_order) {
      const MlpParams<const scalar_t*> theta_k = theta(k);
      for (int i = 0; i < num_params; ++i) {
        const int64_t n = d.param_numel(i);
        if (lrs.per_element[i]) {
          const scalar_t* lr = lrs.lr[i] + k * n;
          for (int64_t e = team.rank(); e < n; e += team.size()) direction.ptr[i][e] = lr[e] * v.ptr[i][e];
        } else {
          const scalar_t lr = lrs.lr[i][k];
          for (int64_t e = team.rank(); e < n; e += team.size()) direction.ptr[i][e] = lr * v.ptr[i][e];
        }
      }
      team.sync();
      const MlpForwardWeights<scalar_t> direction_t =
          transpose_weights(team, d, as_const(direction), s.transposed + (steps + 1) * Pt);
      MlpActivations<scalar_t> support = support_activations(d, s, k);
      mlp_hessian_vector(team, c, support_rows, xs, theta_k, theta_t(k), as_const(direction), direction_t, support,
                         hv);
      for (int i = 0; i < num_params; ++i) axpy(team, d.param_numel(i), scalar_t(-1), hv.ptr[i], v.ptr[i]);
      team.sync();
    }
    if (k >= 1 && step_weights[k - 1] != scalar_t(0)) query_loss += add_query_term(k, step_weights[k - 1]);
  }
  team.sync();  // the last lr_grad reads the scratch that the team's next task writes
  return query_loss;
}

}  // namespace mamlext
