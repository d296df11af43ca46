// One task's MLP passes for the fused ops mlp_loss_grad, mlp_hvp and mlp_maml and the layer ops mlp_forward,
// mlp_backward and mlp_backward_backward, on raw pointers, shared by the CPU and CUDA kernels so that both run the
// same arithmetic.
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
// Every matrix product is one gemm (common/small_gemm.h). The forward products h W^T therefore read the weights
// transposed (MlpForwardWeights: W^T [in, out], made once per parameter set by transpose_weights), but for a layer of
// at most kGemmDotMaxColumns outputs (a policy's actions), whose products are dot products with W's rows; the
// backward products read W as it is.
//
// Every pass takes a team (common/team.h), the threads that run the task together: one on the CPU (SerialTeam),
// a thread block on the GPU (cuda/mlp_block.cu). They split each loop and product and sync between passes: the layer
// helpers, the passes and the drivers below return synced, so that what they wrote may be read by any member.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "common/activations.h"
#include "common/losses.h"
#include "common/small_gemm.h"

namespace mamlext {

constexpr int kMlpMaxLayers = 16;
// The parameter tensors: each layer's weight and bias, and the loss's own (gaussian's log_std) after them.
constexpr int kMlpMaxParams = 2 * kMlpMaxLayers + 1;

// The layer widths, and where each layer's values are in the buffers that hold them all (set_offsets computes
// these tables from the widths, once per call, so that the per-task passes look them up).
struct MlpDims {
  int layers = 0;
  int64_t width[kMlpMaxLayers + 1] = {};
  int64_t loss_param_numel = 0;  // the loss's own parameter's elements (gaussian: log_std [out]); 0: none
  int64_t param_offsets[kMlpMaxParams + 1] = {};
  int64_t output_offsets[kMlpMaxLayers + 1] = {};
  int64_t transposed_offsets[kMlpMaxLayers + 1] = {};

  C10_HOST_DEVICE bool has_loss_param() const { return loss_param_numel > 0; }
  C10_HOST_DEVICE int num_params() const { return 2 * layers + (has_loss_param() ? 1 : 0); }
  C10_HOST_DEVICE int64_t in(int l) const { return width[l]; }
  C10_HOST_DEVICE int64_t out(int l) const { return width[l + 1]; }
  C10_HOST_DEVICE int64_t output_width() const { return width[layers]; }
  // Elements of params[p]: p = 2l is layer l's weight [out, in], p = 2l + 1 its bias [out], p = 2L the loss's.
  C10_HOST_DEVICE int64_t param_numel(int p) const {
    if (p == 2 * layers) return loss_param_numel;
    return p % 2 == 0 ? width[p / 2 + 1] * width[p / 2] : width[p / 2 + 1];
  }
  // After the widths are set.
  C10_HOST_DEVICE void set_offsets() {
    for (int p = 0; p < num_params(); ++p) param_offsets[p + 1] = param_offsets[p] + param_numel(p);
    for (int l = 0; l < layers; ++l) {
      output_offsets[l + 1] = output_offsets[l] + out(l);
      transposed_offsets[l + 1] = transposed_offsets[l] + in(l) * out(l);
    }
  }
  // Where params[p] starts in a buffer holding every parameter in params order.
  C10_HOST_DEVICE int64_t param_offset(int p) const { return param_offsets[p]; }
  C10_HOST_DEVICE int64_t total_param_numel() const { return param_offsets[num_params()]; }
  // Where layer l's outputs start in one row of the per-layer activation arrays.
  C10_HOST_DEVICE int64_t output_offset(int l) const { return output_offsets[l]; }
  // Sum of the layers' output widths: the size of one per-layer activation array for one row.
  C10_HOST_DEVICE int64_t layer_outputs_width() const { return output_offsets[layers]; }
  // Where layer l's transposed weight starts in a buffer of every layer's (MlpForwardWeights).
  C10_HOST_DEVICE int64_t transposed_offset(int l) const { return transposed_offsets[l]; }
  C10_HOST_DEVICE int64_t transposed_numel() const { return transposed_offsets[layers]; }
};

struct MlpConfig {
  MlpDims dims;
  Activation activation = Activation::kRelu;
  double act_param = 0.0;  // negative_slope of leaky_relu, alpha of elu
  Loss loss = Loss::kMse;
};

// The views below (MlpParams, MlpForwardWeights, MlpActivations) are a few pointers and sizes that compute where a
// layer's array is on each access, never tables of pointers: in a device function a table indexed at run time (by
// the layer) lives in the thread's local-memory stack frame, which the driver reserves for every resident thread of
// the GPU, and every access to it is a memory load. The tables they read (MlpDims, TaskBatched) are the op's
// arguments, which the GPU's block kernel copies into shared memory (cuda/mlp_block.cu arguments_in_shared).

// One task's parameter tensors (or tensors shaped like them: gradients, directions), in params order
// [W_0, b_0, W_1, b_1, ...]; ptr_t is `const scalar_t*` or `scalar_t*`. Tensor p is at table[p] + task * stride[p]
// (the op's tensors: common/mlp_tasks.h TaskBatched) or, without a table, at flat + dims->param_offset(p) (a buffer
// holding them all: carve_params).
template <typename ptr_t>
struct MlpParams {
  const ptr_t* table = nullptr;
  const int64_t* stride = nullptr;
  int64_t task = 0;
  ptr_t flat = nullptr;
  const MlpDims* dims = nullptr;

  MlpParams() = default;
  C10_HOST_DEVICE MlpParams(const ptr_t* table_in, const int64_t* stride_in, int64_t task_in)
      : table(table_in), stride(stride_in), task(task_in) {}
  C10_HOST_DEVICE MlpParams(const MlpDims* dims_in, ptr_t flat_in) : flat(flat_in), dims(dims_in) {}
  // The same tensors read-only.
  template <typename other_t>
  C10_HOST_DEVICE MlpParams(const MlpParams<other_t>& p)
      : table(p.table), stride(p.stride), task(p.task), flat(p.flat), dims(p.dims) {}

  C10_HOST_DEVICE ptr_t ptr(int p) const {
    return table != nullptr ? table[p] + task * stride[p] : flat + dims->param_offset(p);
  }
  C10_HOST_DEVICE ptr_t weight(int l) const { return ptr(2 * l); }
  C10_HOST_DEVICE ptr_t bias(int l) const { return ptr(2 * l + 1); }
  // The loss's own parameter (gaussian's log_std) of a network of d's layers; null for a loss without one.
  C10_HOST_DEVICE ptr_t loss_param(const MlpDims& d) const {
    return d.has_loss_param() ? ptr(2 * d.layers) : nullptr;
  }
};

// Views the flat buffer base [d.total_param_numel()] as parameter tensors; d must outlive the view.
template <typename scalar_t>
C10_HOST_DEVICE inline MlpParams<scalar_t*> carve_params(const MlpDims& d, scalar_t* base) {
  return MlpParams<scalar_t*>(&d, base);
}

// The same tensors read-only (a template argument is not deduced through the converting constructor).
template <typename scalar_t>
C10_HOST_DEVICE inline MlpParams<const scalar_t*> as_const(const MlpParams<scalar_t*>& p) {
  return MlpParams<const scalar_t*>(p);
}

// The weights of a parameter set as the forward passes read them: w(l) = W_l^T [in, out] row-major, or for a layer
// with few outputs (is_dot_layer) W_l [out, in] itself, every layer's in one buffer of mlp_transposed_numel elements
// (written by transpose_weights). A copy of a layer that is its own transpose costs little and keeps this view two
// pointers.
C10_HOST_DEVICE inline int64_t mlp_transposed_numel(const MlpDims& d) { return d.transposed_numel(); }

// Whether a layer of `outputs` outputs runs its forward products as dot products with W's rows (common/small_gemm.h
// is_dot_form): transpose_weights then keeps W as it is, and linear_forward reads it so.
C10_HOST_DEVICE inline bool is_dot_layer(int64_t outputs) { return outputs <= kGemmDotMaxColumns; }

template <typename scalar_t>
struct MlpForwardWeights {
  const MlpDims* dims = nullptr;
  const scalar_t* buffer = nullptr;

  C10_HOST_DEVICE const scalar_t* w(int l) const { return buffer + dims->transposed_offset(l); }
};

// The forward weights whose copies transpose_weights wrote to buffer [mlp_transposed_numel(d)].
template <typename scalar_t>
C10_HOST_DEVICE inline MlpForwardWeights<scalar_t> forward_weights(const MlpDims& d, const scalar_t* buffer) {
  MlpForwardWeights<scalar_t> f;
  f.dims = &d;
  f.buffer = buffer;
  return f;
}

// Writes p's transposed weights to buffer [mlp_transposed_numel(d)], the team's members taking turns by tiles;
// returns p's forward weights, synced.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline MlpForwardWeights<scalar_t> transpose_weights(const Team& team, const MlpDims& d,
                                                                      const MlpParams<const scalar_t*>& p,
                                                                      scalar_t* buffer) {
  const MlpForwardWeights<scalar_t> f = forward_weights(d, static_cast<const scalar_t*>(buffer));
  for (int l = 0; l < d.layers; ++l) {
    const int64_t I = d.in(l), O = d.out(l);
    const scalar_t* __restrict__ W = p.weight(l);
    scalar_t* __restrict__ WT = buffer + d.transposed_offset(l);
    if (is_dot_layer(O)) {
      for (int64_t j = team.rank(); j < I * O; j += team.size()) WT[j] = W[j];
      continue;
    }
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

// The R-passes of mlp_hessian_vector run over a task's rows in tiles of at most this many rows, each tile through
// all layers, so that a tile's R arrays and the kept arrays it reads stay in L2 from one layer's product to the
// next, and its R arrays need a tile's rows only (MAML-TRPO's Fisher-vector product, 2,000 rows per task: 90.4 ->
// 88.2 ms). Each product's sums over the rows (the parameters' parts of H v) carry on from tile to tile in row order.
constexpr int64_t kMlpRowTile = 256;

// The rows of the R arrays that a pass over `rows` rows uses: a tile's.
C10_HOST_DEVICE inline int64_t mlp_r_rows(int64_t rows) { return rows < kMlpRowTile ? rows : kMlpRowTile; }

// Per-layer values of one forward/backward (and R-) pass over K = rows rows, each layer's array [K, width[l + 1]]:
// z, h = f(z), dz = dL/dz, dh = dL/dh (h, dh unused for the last layer), and with R: Rz, Rh, Rdz. Each kind's
// layers follow one another from its base (layer l at base + rows * dims->output_offset(l)); z_last and rz_last,
// when not null, hold the last layer's z and Rz instead (the network's output where the caller wants it).
// A view of rows [row0, row0 + tile) reads z, h, dz, dh from row row0 on, and its R arrays (laid out for r_rows
// rows; 0: rows) from their first row: they hold the tile's R-passes only (mlp_hessian_vector's tiles).
template <typename scalar_t>
struct MlpActivations {
  const MlpDims* dims = nullptr;
  int64_t rows = 0;
  int64_t row0 = 0;
  int64_t r_rows = 0;
  scalar_t* z_base = nullptr;
  scalar_t* h_base = nullptr;
  scalar_t* dz_base = nullptr;
  scalar_t* dh_base = nullptr;
  scalar_t* rz_base = nullptr;
  scalar_t* rh_base = nullptr;
  scalar_t* rdz_base = nullptr;
  scalar_t* z_last = nullptr;
  scalar_t* rz_last = nullptr;
  // dz and dh read as Rdz and Rh: the Gauss-Newton product's backward pass of R{dL/dz} (mlp_hessian_vector).
  bool backward_of_r = false;

  C10_HOST_DEVICE scalar_t* layer(scalar_t* base, int l) const {
    return base + rows * dims->output_offset(l) + row0 * dims->out(l);
  }
  C10_HOST_DEVICE scalar_t* r_layer(scalar_t* base, int l) const {
    return base + (r_rows > 0 ? r_rows : rows) * dims->output_offset(l);
  }
  C10_HOST_DEVICE bool last(int l) const { return l == dims->layers - 1; }
  C10_HOST_DEVICE scalar_t* z(int l) const {
    return z_last != nullptr && last(l) ? z_last + row0 * dims->out(l) : layer(z_base, l);
  }
  C10_HOST_DEVICE scalar_t* h(int l) const { return layer(h_base, l); }
  C10_HOST_DEVICE scalar_t* dz(int l) const { return backward_of_r ? rdz(l) : layer(dz_base, l); }
  C10_HOST_DEVICE scalar_t* dh(int l) const { return backward_of_r ? rh(l) : layer(dh_base, l); }
  C10_HOST_DEVICE scalar_t* rz(int l) const { return rz_last != nullptr && last(l) ? rz_last : r_layer(rz_base, l); }
  C10_HOST_DEVICE scalar_t* rh(int l) const { return r_layer(rh_base, l); }
  C10_HOST_DEVICE scalar_t* rdz(int l) const { return r_layer(rdz_base, l); }
};

C10_HOST_DEVICE inline int64_t mlp_activations_numel(const MlpDims& d, int64_t rows, bool with_r) {
  return (4 * rows + (with_r ? 3 * mlp_r_rows(rows) : 0)) * d.layer_outputs_width();
}

// The arrays z, h, dz, dh from base and, when r_base is not null, rz, rh, rdz (of mlp_r_rows(rows) rows) from
// r_base; d must outlive them.
template <typename scalar_t>
C10_HOST_DEVICE inline MlpActivations<scalar_t> carve_activations_at(const MlpDims& d, int64_t rows, scalar_t* base,
                                                                     scalar_t* r_base) {
  const int64_t n = rows * d.layer_outputs_width(), r_n = mlp_r_rows(rows) * d.layer_outputs_width();
  MlpActivations<scalar_t> a;
  a.dims = &d;
  a.rows = rows;
  a.r_rows = mlp_r_rows(rows);
  a.z_base = base;
  a.h_base = base + n;
  a.dz_base = base + 2 * n;
  a.dh_base = base + 3 * n;
  if (r_base != nullptr) {
    a.rz_base = r_base;
    a.rh_base = r_base + r_n;
    a.rdz_base = r_base + 2 * r_n;
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
// One layer's products. Shapes: in [K, I], W [O, I] (WT = W^T [I, O], or W for a dot layer), d/out [K, O].

// out = bias + in W^T (each row), or with bias null out += in W^T.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void linear_forward(const Team& team, int64_t K, int64_t I, int64_t O, const scalar_t* in,
                                           const scalar_t* WT, const scalar_t* bias, scalar_t* out) {
  GemmOperands<scalar_t> g = gemm_operands(K, O, I, in, I, 1, WT, O, out, O);
  if (is_dot_layer(O)) {  // WT is W: B[i, o] = W[o, i]
    g.ldb = 1;
    g.b_col = I;
  }
  g.bias = bias;
  team_gemm(team, g, bias == nullptr);
  team.sync();
}

// gW (+)= d^T in and, when gb is not null, gb (+)= sum_k d[k, :]: the gradient of the layer's parameters.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void linear_param_grad(const Team& team, int64_t K, int64_t I, int64_t O, const scalar_t* d,
                                              const scalar_t* in, scalar_t* gW, scalar_t* gb, bool accumulate) {
  if (I < O && I <= kGemmDotMaxColumns) {
    // gW^T = in^T d written transposed: its O columns fill the vector lanes, which gW's few would not.
    GemmOperands<scalar_t> g = gemm_operands(I, O, K, in, 1, I, d, O, gW, 1);
    g.c_col = I;
    team_gemm(team, g, accumulate);
  } else {
    team_gemm(team, gemm_operands(O, I, K, d, 1, O, in, I, gW, I), accumulate);
  }
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

// Forward: fills a.z (and a.h below the last layer); the network's output is a.z(L - 1).
// pt: p's forward weights.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void mlp_forward(const Team& team, const MlpConfig& c, int64_t K, const scalar_t* x,
                                        const MlpParams<const scalar_t*>& p, const MlpForwardWeights<scalar_t>& pt,
                                        const MlpActivations<scalar_t>& a) {
  const MlpDims& d = c.dims;
  for (int l = 0; l < d.layers; ++l) {
    const scalar_t* in = l == 0 ? x : a.h(l - 1);
    linear_forward(team, K, d.in(l), d.out(l), in, pt.w(l), p.bias(l), a.z(l));
    if (l + 1 < d.layers) {
      activation_forward(team, c.activation, static_cast<scalar_t>(c.act_param), K * d.out(l), a.z(l), a.h(l));
      team.sync();
    }
  }
}

// Backward, from a.dz(L - 1) = dL/dz_{L-1}: fills a.dz and a.dh of every layer and, when grads is not null, writes
// (accumulate: adds) the gradient w.r.t. the parameters to *grads; when dx is not null, the gradient w.r.t. the input
// x [K, in] to dx.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void mlp_backward(const Team& team, const MlpConfig& c, int64_t K, const scalar_t* x,
                                         const MlpParams<const scalar_t*>& p, const MlpActivations<scalar_t>& a,
                                         const MlpParams<scalar_t*>* grads, scalar_t* dx = nullptr,
                                         bool accumulate = false) {
  const MlpDims& d = c.dims;
  for (int l = d.layers - 1; l >= 0; --l) {
    const int64_t I = d.in(l), O = d.out(l);
    const scalar_t* in = l == 0 ? x : a.h(l - 1);
    if (grads != nullptr) {
      linear_param_grad(team, K, I, O, a.dz(l), in, grads->weight(l), grads->bias(l), accumulate);
    }
    if (l > 0) {
      linear_input_grad(team, K, I, O, a.dz(l), p.weight(l), a.dh(l - 1), false);
      activation_backward(team, c.activation, static_cast<scalar_t>(c.act_param), K * I, a.z(l - 1), a.h(l - 1),
                          a.dh(l - 1), a.dz(l - 1));
      team.sync();
    } else if (dx != nullptr) {
      linear_input_grad(team, K, I, O, a.dz(0), p.weight(0), dx, false);
    }
  }
}

// R-forward along the direction v (shaped like the parameters) and, when rx is not null, rx (shaped like the input
// x: R{x}), after mlp_forward: fills a.rz (and a.rh). pt, vt: the forward weights of p and v.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void mlp_r_forward(const Team& team, const MlpConfig& c, int64_t K, const scalar_t* x,
                                          const MlpForwardWeights<scalar_t>& pt, const MlpParams<const scalar_t*>& v,
                                          const MlpForwardWeights<scalar_t>& vt, const MlpActivations<scalar_t>& a,
                                          const scalar_t* rx = nullptr) {
  const MlpDims& d = c.dims;
  for (int l = 0; l < d.layers; ++l) {
    const scalar_t* in = l == 0 ? x : a.h(l - 1);
    const scalar_t* r_in = l == 0 ? rx : a.rh(l - 1);
    linear_forward(team, K, d.in(l), d.out(l), in, vt.w(l), v.bias(l), a.rz(l));  // h VW^T + Vb
    if (r_in != nullptr) {
      linear_forward(team, K, d.in(l), d.out(l), r_in, pt.w(l), static_cast<const scalar_t*>(nullptr),
                     a.rz(l));  // + Rh W^T
    }
    if (l + 1 < d.layers) {
      activation_backward(team, c.activation, static_cast<scalar_t>(c.act_param), K * d.out(l), a.z(l), a.h(l),
                          a.rz(l), a.rh(l));
      team.sync();
    }
  }
}

// R-backward, from a.rdz(L - 1) = R{dL/dz_{L-1}}, after mlp_backward and mlp_r_forward (with the same rx): writes
// (accumulate: adds) H v to hv and, when rdx is not null, R{dL/dx} to rdx [K, in].
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void mlp_r_backward(const Team& team, const MlpConfig& c, int64_t K, const scalar_t* x,
                                           const MlpParams<const scalar_t*>& p, const MlpParams<const scalar_t*>& v,
                                           const MlpActivations<scalar_t>& a, const MlpParams<scalar_t*>& hv,
                                           const scalar_t* rx = nullptr, scalar_t* rdx = nullptr,
                                           bool accumulate = false) {
  const MlpDims& d = c.dims;
  for (int l = d.layers - 1; l >= 0; --l) {
    const int64_t I = d.in(l), O = d.out(l);
    const scalar_t* in = l == 0 ? x : a.h(l - 1);
    const scalar_t* r_in = l == 0 ? rx : a.rh(l - 1);
    linear_param_grad(team, K, I, O, a.rdz(l), in, hv.weight(l), hv.bias(l), accumulate);  // Rdz^T h, sum_k Rdz
    if (r_in != nullptr) {
      linear_param_grad(team, K, I, O, a.dz(l), r_in, hv.weight(l), static_cast<scalar_t*>(nullptr),
                        true);  // + dz^T Rh
    }
    if (l == 0) {
      if (rdx != nullptr) {
        linear_input_grad(team, K, I, O, a.rdz(0), p.weight(0), rdx, false);
        linear_input_grad(team, K, I, O, a.dz(0), v.weight(0), rdx, true);
      }
      break;
    }
    scalar_t* rdh = a.rdz(l - 1);  // R{dL/dh_{l-1}}, turned into R{dL/dz_{l-1}} in place
    linear_input_grad(team, K, I, O, a.rdz(l), p.weight(l), rdh, false);
    linear_input_grad(team, K, I, O, a.dz(l), v.weight(l), rdh, true);
    activation_r_backward(team, c.activation, static_cast<scalar_t>(c.act_param), K * I, a.z(l - 1), a.h(l - 1),
                          a.dh(l - 1), a.rz(l - 1), rdh);
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
                                                  const MlpForwardWeights<scalar_t>& pt, const MlpActivations<scalar_t>& a,
                                                  const MlpParams<scalar_t*>* grads) {
  const int last = c.dims.layers - 1;
  mlp_forward(team, c, K, x, p, pt, a);
  LossParam<scalar_t> param;
  param.value = p.loss_param(c.dims);
  if (grads != nullptr) param.out = grads->loss_param(c.dims);
  const scalar_t loss =
      loss_forward_backward(team, c.loss, K, c.dims.output_width(), a.z(last), y, a.dz(last), param);
  team.sync();
  mlp_backward(team, c, K, x, p, a, grads);
  return loss;
}

// hv = H v, H the Hessian of the task's loss at p, after mlp_loss_and_grad at the same p, x, y filled a; with
// gauss_newton, the Gauss-Newton product J^T H_loss J v instead (J the output's Jacobian: H without the terms of the
// network's own curvature; for gaussian H_loss is the Fisher's, common/losses.h): the R-forward pass, then the
// loss's Hessian, then a plain backward pass of R{dL/dz}. pt, vt: the forward weights of p and v. The passes run
// over the rows in tiles of a's R arrays' rows (kMlpRowTile), each tile adding its part to hv.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void mlp_hessian_vector(const Team& team, const MlpConfig& c, int64_t K, const scalar_t* x,
                                               LossTarget<scalar_t> y, const MlpParams<const scalar_t*>& p,
                                               const MlpForwardWeights<scalar_t>& pt,
                                               const MlpParams<const scalar_t*>& v, const MlpForwardWeights<scalar_t>& vt,
                                               const MlpActivations<scalar_t>& a, const MlpParams<scalar_t*>& hv,
                                               bool gauss_newton = false) {
  const int last = c.dims.layers - 1;
  const int64_t in = c.dims.width[0], O = c.dims.output_width();
  const int64_t tile = a.r_rows > 0 ? a.r_rows : K > 0 ? K : 1;  // K == 0: one empty tile
  LossParam<scalar_t> param;
  param.value = p.loss_param(c.dims);
  param.direction = v.loss_param(c.dims);
  param.out = hv.loss_param(c.dims);
  // With gauss_newton, the backward pass of R{dL/dz}: its dz arrays are Rdz, its dh arrays Rh's (the R-forward's,
  // read no more); neither the R-forward nor the loss reads dz or dh.
  MlpActivations<scalar_t> t = a;
  t.backward_of_r = gauss_newton;
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += tile) {  // once for K == 0: hv = 0
    const int64_t rows = K - k0 < tile ? K - k0 : tile;
    const bool accumulate = k0 > 0;
    const scalar_t* x_tile = x + k0 * in;
    t.row0 = a.row0 + k0;
    mlp_r_forward(team, c, rows, x_tile, pt, v, vt, t);
    loss_r_backward(team, c.loss, rows, O, t.z(last), y.rows_from(k0, O), t.rz(last), t.rdz(last), param,
                    gauss_newton, K, accumulate);
    team.sync();
    if (gauss_newton) {
      mlp_backward(team, c, rows, x_tile, p, t, &hv, static_cast<scalar_t*>(nullptr), accumulate);
    } else {
      mlp_r_backward(team, c, rows, x_tile, p, v, t, hv, static_cast<const scalar_t*>(nullptr),
                     static_cast<scalar_t*>(nullptr), accumulate);
    }
  }
}

}  // namespace mamlext
