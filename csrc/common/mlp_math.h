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
// Inner loops run over contiguous memory (a row of W, h or dz) so that the compiler vectorizes them, and are
// axpys where rows are short: a dot product ends in a horizontal sum, which costs as much as a short row's
// multiply-adds. The forward products h W^T of layers with up to kMaxTransposedIn inputs therefore read the weights
// transposed (MlpForwardWeights: W^T [in, out], made once per parameter set by transpose_weights); wider layers
// take dot products of rows of W, whose horizontal sums are cheaper than the transposes. The backward products
// read W as it is.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "common/activations.h"
#include "common/losses.h"
#include "common/sgd_math.h"

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

// The weights of a parameter set as the forward passes read them, per layer: w[l] = W_l^T [in, out] when
// transposed[l], else W_l [out, in] (row-major). A layer with one input feature is its own transpose in memory
// (w[l] is then W_l itself); layers with more inputs, up to kMaxTransposedIn, and more than one output are copied
// into a buffer of mlp_transposed_numel elements; the others are read as W_l.
constexpr int64_t kMaxTransposedIn = 128;  // 1-256-256-1: dot products beat the transposes (measured)

template <typename scalar_t>
struct MlpForwardWeights {
  const scalar_t* w[kMlpMaxLayers] = {};
  bool transposed[kMlpMaxLayers] = {};
};

C10_HOST_DEVICE inline bool layer_copies_transpose(const MlpDims& d, int l) {
  return d.in(l) > 1 && d.in(l) <= kMaxTransposedIn && d.out(l) > 1;
}

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
    f.transposed[l] = copy || d.in(l) == 1;
    if (copy) buffer += d.in(l) * d.out(l);
  }
  return f;
}

// Writes p's transposed weights to buffer [mlp_transposed_numel(d)]; returns p's forward weights.
template <typename scalar_t>
C10_HOST_DEVICE inline MlpForwardWeights<scalar_t> transpose_weights(const MlpDims& d,
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
    for (int64_t o0 = 0; o0 < O; o0 += kTile) {
      for (int64_t i0 = 0; i0 < I; i0 += kTile) {
        const int64_t o_end = o0 + kTile < O ? o0 + kTile : O, i_end = i0 + kTile < I ? i0 + kTile : I;
        for (int64_t o = o0; o < o_end; ++o) {
          for (int64_t i = i0; i < i_end; ++i) WT[i * O + o] = W[o * I + i];
        }
      }
    }
  }
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

template <typename scalar_t>
C10_HOST_DEVICE inline MlpActivations<scalar_t> carve_activations(const MlpDims& d, int64_t rows, bool with_r,
                                                                  scalar_t* base) {
  MlpActivations<scalar_t> a;
  scalar_t** arrays[7] = {a.z, a.h, a.dz, a.dh, a.rz, a.rh, a.rdz};
  for (int j = 0; j < (with_r ? 7 : 4); ++j) {
    for (int l = 0; l < d.layers; ++l) {
      arrays[j][l] = base;
      base += rows * d.out(l);
    }
  }
  return a;
}

// ---------------------------------------------------------------------------------------------------------------
// Small dense helpers. Shapes: in [K, I], W [O, I], d/out [K, O].

// A loop whose partial sums may be reordered so that it vectorizes: `omp simd reduction` on the host (the build
// passes -fopenmp), nothing in device code.
#define MAMLEXT_PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define MAMLEXT_SIMD_SUM(...) MAMLEXT_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define MAMLEXT_SIMD_SUM(...)
#endif

template <typename scalar_t>
C10_HOST_DEVICE inline void fill(int64_t n, scalar_t value, scalar_t* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] = value;
}

// <a, b> over n elements.
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t dot(int64_t n, const scalar_t* __restrict__ a, const scalar_t* __restrict__ b) {
  scalar_t s = 0;
  MAMLEXT_SIMD_SUM(s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// out[j] += alpha * x[j].
template <typename scalar_t>
C10_HOST_DEVICE inline void axpy(int64_t n, scalar_t alpha, const scalar_t* __restrict__ x, scalar_t* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] += alpha * x[j];
}

// out[j] += a[0] x[0][j] + a[1] x[1][j] + a[2] x[2][j] + a[3] x[3][j]: four axpys in one pass over out.
template <typename scalar_t>
C10_HOST_DEVICE inline void axpy4(int64_t n, const scalar_t* a, const scalar_t* __restrict__ x0,
                                  const scalar_t* __restrict__ x1, const scalar_t* __restrict__ x2,
                                  const scalar_t* __restrict__ x3, scalar_t* __restrict__ out) {
  const scalar_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  for (int64_t j = 0; j < n; ++j) out[j] += a0 * x0[j] + a1 * x1[j] + a2 * x2[j] + a3 * x3[j];
}

// out[k, :] = bias + in[k, :] W^T; with bias null, out[k, :] += in[k, :] W^T, in the two forms of
// MlpForwardWeights.

// From WT = W^T [I, O]: each row of out is built by axpys of four rows of WT at a time.
template <typename scalar_t>
C10_HOST_DEVICE inline void linear_forward_transposed(int64_t K, int64_t I, int64_t O, const scalar_t* __restrict__ in,
                                                      const scalar_t* __restrict__ WT,
                                                      const scalar_t* __restrict__ bias, scalar_t* __restrict__ out) {
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* __restrict__ x = in + k * I;
    scalar_t* __restrict__ out_row = out + k * O;
    if (bias != nullptr) {
      for (int64_t o = 0; o < O; ++o) out_row[o] = bias[o];
    }
    int64_t i = 0;
    for (; i + 4 <= I; i += 4) axpy4(O, x + i, WT + i * O, WT + (i + 1) * O, WT + (i + 2) * O, WT + (i + 3) * O, out_row);
    for (; i < I; ++i) axpy(O, x[i], WT + i * O, out_row);
  }
}

// From W [O, I]: dot products of rows; four outputs at a time share each load of the input row, and blocks of four
// weight rows stay in L1 while every input row passes by.
template <typename scalar_t>
C10_HOST_DEVICE inline void linear_forward_rows(int64_t K, int64_t I, int64_t O, const scalar_t* __restrict__ in,
                                                const scalar_t* __restrict__ W, const scalar_t* __restrict__ bias,
                                                scalar_t* __restrict__ out) {
  int64_t o = 0;
  for (; o + 4 <= O; o += 4) {
    const scalar_t* __restrict__ w0 = W + o * I;
    const scalar_t* __restrict__ w1 = w0 + I;
    const scalar_t* __restrict__ w2 = w1 + I;
    const scalar_t* __restrict__ w3 = w2 + I;
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* __restrict__ x = in + k * I;
      scalar_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      MAMLEXT_SIMD_SUM(s0, s1, s2, s3)
      for (int64_t i = 0; i < I; ++i) {
        s0 += x[i] * w0[i];
        s1 += x[i] * w1[i];
        s2 += x[i] * w2[i];
        s3 += x[i] * w3[i];
      }
      const scalar_t sums[4] = {s0, s1, s2, s3};
      scalar_t* __restrict__ out_row = out + k * O + o;
      for (int j = 0; j < 4; ++j) out_row[j] = bias != nullptr ? bias[o + j] + sums[j] : out_row[j] + sums[j];
    }
  }
  for (; o < O; ++o) {
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t s = dot(I, in + k * I, W + o * I);
      out[k * O + o] = bias != nullptr ? bias[o] + s : out[k * O + o] + s;
    }
  }
}

// Layer l's product with the forward weights f.
template <typename scalar_t>
C10_HOST_DEVICE inline void linear_forward(const MlpDims& d, int l, const MlpForwardWeights<scalar_t>& f, int64_t K,
                                           const scalar_t* in, const scalar_t* bias, scalar_t* out) {
  if (f.transposed[l]) {
    linear_forward_transposed(K, d.in(l), d.out(l), in, f.w[l], bias, out);
  } else {
    linear_forward_rows(K, d.in(l), d.out(l), in, f.w[l], bias, out);
  }
}

// gW[o, i] += sum_k d[k, o] in[k, i] and, when gb is not null, gb[o] += sum_k d[k, o]: the gradient of the
// layer's parameters. Four rows k at a time per pass over a row of gW.
template <typename scalar_t>
C10_HOST_DEVICE inline void linear_param_grad_add(int64_t K, int64_t I, int64_t O, const scalar_t* __restrict__ d,
                                                  const scalar_t* __restrict__ in, scalar_t* __restrict__ gW,
                                                  scalar_t* __restrict__ gb) {
  if (I == 1) {  // W is one column: gW[o] += sum_k d[k, o] in[k], looping over the outputs
    for (int64_t k = 0; k < K; ++k) axpy(O, in[k], d + k * O, gW);
  } else {
    for (int64_t o = 0; o < O; ++o) {
      scalar_t* gW_row = gW + o * I;
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) {
        const scalar_t a[4] = {d[k * O + o], d[(k + 1) * O + o], d[(k + 2) * O + o], d[(k + 3) * O + o]};
        axpy4(I, a, in + k * I, in + (k + 1) * I, in + (k + 2) * I, in + (k + 3) * I, gW_row);
      }
      for (; k < K; ++k) axpy(I, d[k * O + o], in + k * I, gW_row);
    }
  }
  if (gb != nullptr) {
    for (int64_t k = 0; k < K; ++k) axpy(O, scalar_t(1), d + k * O, gb);
  }
}

// din[k, i] += sum_o d[k, o] W[o, i]: the gradient of the layer's input. Four outputs o at a time per pass over a
// row of din, each block of four weight rows kept in L1 for all rows k.
template <typename scalar_t>
C10_HOST_DEVICE inline void linear_input_grad_add(int64_t K, int64_t I, int64_t O, const scalar_t* __restrict__ d,
                                                  const scalar_t* __restrict__ W, scalar_t* __restrict__ din) {
  int64_t o = 0;
  for (; o + 4 <= O; o += 4) {
    for (int64_t k = 0; k < K; ++k) {
      axpy4(I, d + k * O + o, W + o * I, W + (o + 1) * I, W + (o + 2) * I, W + (o + 3) * I, din + k * I);
    }
  }
  for (; o < O; ++o) {
    for (int64_t k = 0; k < K; ++k) axpy(I, d[k * O + o], W + o * I, din + k * I);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The four passes over one task's K rows.

// Forward: fills a.z (and a.h below the last layer); the network's output is a.z[L - 1].
// pt: p's forward weights.
template <typename scalar_t>
C10_HOST_DEVICE inline void mlp_forward(const MlpConfig& c, int64_t K, const scalar_t* x,
                                        const MlpParams<const scalar_t*>& p, const MlpForwardWeights<scalar_t>& pt,
                                        MlpActivations<scalar_t>& a) {
  const MlpDims& d = c.dims;
  for (int l = 0; l < d.layers; ++l) {
    const scalar_t* in = l == 0 ? x : a.h[l - 1];
    linear_forward(d, l, pt, K, in, p.bias(l), a.z[l]);
    if (l + 1 < d.layers) {
      activation_forward(c.activation, static_cast<scalar_t>(c.act_param), K * d.out(l), a.z[l], a.h[l]);
    }
  }
}

// Backward, from a.dz[L - 1] = dL/dz_{L-1}: fills a.dz and a.dh of every layer and, when grads is not null, writes
// the gradient w.r.t. the parameters to *grads.
template <typename scalar_t>
C10_HOST_DEVICE inline void mlp_backward(const MlpConfig& c, int64_t K, const scalar_t* x,
                                         const MlpParams<const scalar_t*>& p, MlpActivations<scalar_t>& a,
                                         const MlpParams<scalar_t*>* grads) {
  const MlpDims& d = c.dims;
  for (int l = d.layers - 1; l >= 0; --l) {
    const int64_t I = d.in(l), O = d.out(l);
    const scalar_t* in = l == 0 ? x : a.h[l - 1];
    if (grads != nullptr) {
      fill(O * I, scalar_t(0), grads->weight(l));
      fill(O, scalar_t(0), grads->bias(l));
      linear_param_grad_add(K, I, O, a.dz[l], in, grads->weight(l), grads->bias(l));
    }
    if (l > 0) {
      fill(K * I, scalar_t(0), a.dh[l - 1]);
      linear_input_grad_add(K, I, O, a.dz[l], p.weight(l), a.dh[l - 1]);
      activation_backward(c.activation, static_cast<scalar_t>(c.act_param), K * I, a.z[l - 1], a.h[l - 1],
                          a.dh[l - 1], a.dz[l - 1]);
    }
  }
}

// R-forward along the direction v (shaped like the parameters), after mlp_forward: fills a.rz (and a.rh).
// pt, vt: the forward weights of p and v.
template <typename scalar_t>
C10_HOST_DEVICE inline void mlp_r_forward(const MlpConfig& c, int64_t K, const scalar_t* x,
                                          const MlpForwardWeights<scalar_t>& pt, const MlpParams<const scalar_t*>& v,
                                          const MlpForwardWeights<scalar_t>& vt, MlpActivations<scalar_t>& a) {
  const MlpDims& d = c.dims;
  for (int l = 0; l < d.layers; ++l) {
    const scalar_t* in = l == 0 ? x : a.h[l - 1];
    linear_forward(d, l, vt, K, in, v.bias(l), a.rz[l]);  // h VW^T + Vb
    if (l > 0) linear_forward(d, l, pt, K, a.rh[l - 1], static_cast<const scalar_t*>(nullptr), a.rz[l]);  // + Rh W^T
    if (l + 1 < d.layers) {
      activation_backward(c.activation, static_cast<scalar_t>(c.act_param), K * d.out(l), a.z[l], a.h[l], a.rz[l],
                          a.rh[l]);
    }
  }
}

// R-backward, from a.rdz[L - 1] = R{dL/dz_{L-1}}, after mlp_backward and mlp_r_forward: writes H v to hv.
template <typename scalar_t>
C10_HOST_DEVICE inline void mlp_r_backward(const MlpConfig& c, int64_t K, const scalar_t* x,
                                           const MlpParams<const scalar_t*>& p, const MlpParams<const scalar_t*>& v,
                                           MlpActivations<scalar_t>& a, const MlpParams<scalar_t*>& hv) {
  const MlpDims& d = c.dims;
  for (int l = d.layers - 1; l >= 0; --l) {
    const int64_t I = d.in(l), O = d.out(l);
    const scalar_t* in = l == 0 ? x : a.h[l - 1];
    fill(O * I, scalar_t(0), hv.weight(l));
    fill(O, scalar_t(0), hv.bias(l));
    linear_param_grad_add(K, I, O, a.rdz[l], in, hv.weight(l), hv.bias(l));  // Rdz^T h, sum_k Rdz
    if (l == 0) break;
    linear_param_grad_add(K, I, O, a.dz[l], a.rh[l - 1], hv.weight(l), static_cast<scalar_t*>(nullptr));  // + dz^T Rh
    scalar_t* rdh = a.rdz[l - 1];  // R{dL/dh_{l-1}}, turned into R{dL/dz_{l-1}} in place
    fill(K * I, scalar_t(0), rdh);
    linear_input_grad_add(K, I, O, a.rdz[l], p.weight(l), rdh);
    linear_input_grad_add(K, I, O, a.dz[l], v.weight(l), rdh);
    activation_r_backward(c.activation, static_cast<scalar_t>(c.act_param), K * I, a.z[l - 1], a.h[l - 1],
                          a.dh[l - 1], a.rz[l - 1], rdh);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-task drivers.

// One task's loss at p (forward weights pt) over its K rows (x, y); runs the forward and backward passes, leaving
// a ready for mlp_hessian_vector, and writes the gradient to *grads when grads is not null.
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t mlp_loss_and_grad(const MlpConfig& c, int64_t K, const scalar_t* x,
                                                  LossTarget<scalar_t> y, const MlpParams<const scalar_t*>& p,
                                                  const MlpForwardWeights<scalar_t>& pt, MlpActivations<scalar_t>& a,
                                                  const MlpParams<scalar_t*>* grads) {
  const int last = c.dims.layers - 1;
  mlp_forward(c, K, x, p, pt, a);
  const scalar_t loss = loss_forward_backward(c.loss, K, c.dims.output_width(), a.z[last], y, a.dz[last]);
  mlp_backward(c, K, x, p, a, grads);
  return loss;
}

// hv = H v, H the Hessian of the task's loss at p, after mlp_loss_and_grad at the same p, x, y filled a.
// pt, vt: the forward weights of p and v.
template <typename scalar_t>
C10_HOST_DEVICE inline void mlp_hessian_vector(const MlpConfig& c, int64_t K, const scalar_t* x,
                                               const MlpParams<const scalar_t*>& p, const MlpForwardWeights<scalar_t>& pt,
                                               const MlpParams<const scalar_t*>& v, const MlpForwardWeights<scalar_t>& vt,
                                               MlpActivations<scalar_t>& a, const MlpParams<scalar_t*>& hv) {
  const int last = c.dims.layers - 1;
  mlp_r_forward(c, K, x, pt, v, vt, a);
  loss_r_backward(c.loss, K, c.dims.output_width(), a.z[last], a.rz[last], a.rdz[last]);
  mlp_r_backward(c, K, x, p, v, a, hv);
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
  MlpActivations<scalar_t> support, query;
};

C10_HOST_DEVICE inline int64_t mlp_maml_scratch_numel(const MlpDims& d, int64_t steps, int64_t support_rows,
                                                      int64_t query_rows, bool first_order) {
  return (2 * steps + 3) * d.total_param_numel() + (steps + 2) * mlp_transposed_numel(d) +
         mlp_activations_numel(d, support_rows, !first_order) + mlp_activations_numel(d, query_rows, false);
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
  scalar_t* activations = s.transposed + (steps + 2) * mlp_transposed_numel(d);
  s.support = carve_activations(d, support_rows, !first_order, activations);
  s.query = carve_activations(d, query_rows, false, activations + mlp_activations_numel(d, support_rows, !first_order));
  return s;
}

// Writes theta_0's forward weights into s, once for all the tasks that use s.
template <typename scalar_t>
C10_HOST_DEVICE inline void prepare_maml_scratch(const MlpDims& d, const MlpParams<const scalar_t*>& theta0,
                                                 MamlScratch<scalar_t>& s) {
  transpose_weights(d, theta0, s.transposed);
}

// One task of mlp_maml; returns its weighted query loss sum_k w_k L_query(theta_k).
//   Inner loop: theta_{k+1} = theta_k - alpha_k * g_k, g_k = grad L_support(theta_k), k = 0 .. N-1.
//   Reverse:    v_N = w_N grad L_query(theta_N); for k = N-1 .. 0:
//                 lr_grad_k = -v_{k+1} * g_k (summed over the tensor for a per-tensor rate),
//                 v_k = v_{k+1} - H_support(theta_k) (alpha_k * v_{k+1}) (first order: v_k = v_{k+1}),
//                 v_k += w_k grad L_query(theta_k) for k >= 1;
//               meta_grad = v_0.
// Query passes of steps with weight exactly 0 are skipped. meta_grad (the running v) and lr_grad ([N] or
// [N, numel_p] per parameter) are this task's outputs.
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t mlp_maml_task(const MlpConfig& c, int64_t steps, const scalar_t* step_weights,
                                              bool first_order, int64_t support_rows, const scalar_t* xs,
                                              LossTarget<scalar_t> ys, int64_t query_rows, const scalar_t* xq,
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
  auto theta_t = [&](int64_t k) { return forward_weights(d, theta(k), static_cast<const scalar_t*>(s.transposed + k * Pt)); };
  auto grad = [&](int64_t k) { return carve_params(d, s.grads + k * P); };
  const MlpParams<scalar_t*> direction = carve_params(d, s.direction);
  const MlpParams<scalar_t*> hv = carve_params(d, s.hv);
  const MlpParams<scalar_t*> query_grad = carve_params(d, s.query_grad);
  const MlpParams<scalar_t*>& v = meta_grad;

  // Inner loop. The support activations of the last step (theta_{N-1}) stay in s.support for the first HVP.
  for (int64_t k = 0; k < steps; ++k) {
    const MlpParams<const scalar_t*> theta_k = theta(k);
    const MlpParams<scalar_t*> g = grad(k);
    mlp_loss_and_grad(c, support_rows, xs, ys, theta_k, theta_t(k), s.support, &g);
    const MlpParams<scalar_t*> next = carve_params(d, s.thetas + k * P);
    for (int i = 0; i < num_params; ++i) {
      const int64_t n = d.param_numel(i);
      if (lrs.per_element[i]) {
        const scalar_t* lr = lrs.lr[i] + k * n;
        for (int64_t e = 0; e < n; ++e) next.ptr[i][e] = sgd_update<scalar_t>(theta_k.ptr[i][e], g.ptr[i][e], lr[e]);
      } else {
        const scalar_t lr = lrs.lr[i][k];
        for (int64_t e = 0; e < n; ++e) next.ptr[i][e] = sgd_update<scalar_t>(theta_k.ptr[i][e], g.ptr[i][e], lr);
      }
    }
    transpose_weights(d, as_const(next), s.transposed + (k + 1) * Pt);
  }

  // v += w grad L_query(theta_k); returns w L_query(theta_k).
  auto add_query_term = [&](int64_t k, scalar_t w) {
    const scalar_t loss = mlp_loss_and_grad(c, query_rows, xq, yq, theta(k), theta_t(k), s.query, &query_grad);
    for (int i = 0; i < num_params; ++i) axpy(d.param_numel(i), w, query_grad.ptr[i], v.ptr[i]);
    return w * loss;
  };

  for (int i = 0; i < num_params; ++i) fill(d.param_numel(i), scalar_t(0), v.ptr[i]);
  scalar_t query_loss = 0;
  if (step_weights[steps - 1] != scalar_t(0)) query_loss += add_query_term(steps, step_weights[steps - 1]);

  for (int64_t k = steps - 1; k >= 0; --k) {
    const MlpParams<scalar_t*> g = grad(k);
    for (int i = 0; i < num_params; ++i) {
      const int64_t n = d.param_numel(i);
      if (lrs.per_element[i]) {
        scalar_t* out = lr_grad.ptr[i] + k * n;
        for (int64_t e = 0; e < n; ++e) out[e] = -(v.ptr[i][e] * g.ptr[i][e]);
      } else {
        lr_grad.ptr[i][k] = -dot(n, v.ptr[i], g.ptr[i]);
      }
    }
    if (!first_order) {
      const MlpParams<const scalar_t*> theta_k = theta(k);
      if (k != steps - 1) {
        mlp_loss_and_grad(c, support_rows, xs, ys, theta_k, theta_t(k), s.support,
                          static_cast<const MlpParams<scalar_t*>*>(nullptr));
      }
      for (int i = 0; i < num_params; ++i) {
        const int64_t n = d.param_numel(i);
        if (lrs.per_element[i]) {
          const scalar_t* lr = lrs.lr[i] + k * n;
          for (int64_t e = 0; e < n; ++e) direction.ptr[i][e] = lr[e] * v.ptr[i][e];
        } else {
          const scalar_t lr = lrs.lr[i][k];
          for (int64_t e = 0; e < n; ++e) direction.ptr[i][e] = lr * v.ptr[i][e];
        }
      }
      const MlpForwardWeights<scalar_t> direction_t =
          transpose_weights(d, as_const(direction), s.transposed + (steps + 1) * Pt);
      mlp_hessian_vector(c, support_rows, xs, theta_k, theta_t(k), as_const(direction), direction_t, s.support, hv);
      for (int i = 0; i < num_params; ++i) axpy(d.param_numel(i), scalar_t(-1), hv.ptr[i], v.ptr[i]);
    }
    if (k >= 1 && step_weights[k - 1] != scalar_t(0)) query_loss += add_query_term(k, step_weights[k - 1]);
  }
  return query_loss;
}

}  // namespace mamlext
