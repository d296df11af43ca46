// Activations of the fused MLP ops: f, f' and f'' of each, shared by the CPU and CUDA kernels.
//
// The integer codes are the ops' `activation` argument (Python: mamlext/_mlp_codes.py ACTIVATIONS). Each derivative
// takes both the pre-activation z and the value h = f(z), and uses whichever is cheaper. At a kink (z == 0) the
// derivatives are torch's: relu' = 0, leaky_relu' = negative_slope, elu' = alpha. NaN propagates as in torch: every
// comparison with NaN is false, so relu tests z <= 0 (NaN keeps its value and passes the gradient through), where
// z > 0 ? z : 0 would turn a NaN into a healthy-looking 0.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "common/team.h"

namespace mamlext {

enum class Activation : int64_t {
  kRelu = 0,
  kLeakyRelu = 1,  // param: negative_slope
  kTanh = 2,
  kSigmoid = 3,
  kGelu = 4,  // exact: z * Phi(z), Phi the standard normal CDF
  kElu = 5,   // param: alpha
};
constexpr int64_t kNumActivations = 6;

template <Activation A>
struct ActivationTag {
  static constexpr Activation value = A;
};

// Calls fn(ActivationTag<act>{}), so that loops inside fn are compiled once per activation with no switch inside.
template <typename Fn>
C10_HOST_DEVICE inline void dispatch_activation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::kRelu: fn(ActivationTag<Activation::kRelu>{}); break;
    case Activation::kLeakyRelu: fn(ActivationTag<Activation::kLeakyRelu>{}); break;
    case Activation::kTanh: fn(ActivationTag<Activation::kTanh>{}); break;
    case Activation::kSigmoid: fn(ActivationTag<Activation::kSigmoid>{}); break;
    case Activation::kGelu: fn(ActivationTag<Activation::kGelu>{}); break;
    case Activation::kElu: fn(ActivationTag<Activation::kElu>{}); break;
  }
}

template <typename scalar_t>
struct GeluConstants {
  static constexpr scalar_t kInvSqrt2 = scalar_t(0.70710678118654752440084436210484903928483593768847);
  static constexpr scalar_t kInvSqrt2Pi = scalar_t(0.39894228040143267793994605993438186847585863116493);
};

// f(z).
template <Activation A, typename scalar_t>
C10_HOST_DEVICE inline scalar_t activation_value(scalar_t z, scalar_t param) {
  if constexpr (A == Activation::kRelu) {
    return z <= scalar_t(0) ? scalar_t(0) : z;
  } else if constexpr (A == Activation::kLeakyRelu) {
    return z > scalar_t(0) ? z : param * z;
  } else if constexpr (A == Activation::kTanh) {
    return std::tanh(z);
  } else if constexpr (A == Activation::kSigmoid) {
    return scalar_t(1) / (scalar_t(1) + std::exp(-z));
  } else if constexpr (A == Activation::kGelu) {
    return scalar_t(0.5) * z * (scalar_t(1) + std::erf(z * GeluConstants<scalar_t>::kInvSqrt2));
  } else {  // kElu
    return z > scalar_t(0) ? z : param * (std::exp(z) - scalar_t(1));
  }
}

// f'(z), given h = f(z).
template <Activation A, typename scalar_t>
C10_HOST_DEVICE inline scalar_t activation_derivative(scalar_t z, scalar_t h, scalar_t param) {
  if constexpr (A == Activation::kRelu) {
    // From h, which is 0 exactly where z <= 0 and NaN where z is: the same value, and a pass that reads h for its
    // products anyway need not stream z from memory too.
    return h <= scalar_t(0) ? scalar_t(0) : scalar_t(1);
  } else if constexpr (A == Activation::kLeakyRelu) {
    return z > scalar_t(0) ? scalar_t(1) : param;
  } else if constexpr (A == Activation::kTanh) {
    return scalar_t(1) - h * h;
  } else if constexpr (A == Activation::kSigmoid) {
    return h * (scalar_t(1) - h);
  } else if constexpr (A == Activation::kGelu) {
    const scalar_t cdf = scalar_t(0.5) * (scalar_t(1) + std::erf(z * GeluConstants<scalar_t>::kInvSqrt2));
    const scalar_t pdf = GeluConstants<scalar_t>::kInvSqrt2Pi * std::exp(scalar_t(-0.5) * z * z);
    return cdf + z * pdf;
  } else {  // kElu: alpha * exp(z) = h + alpha below zero
    return z > scalar_t(0) ? scalar_t(1) : param * std::exp(z);
  }
}

// f''(z), given h = f(z).
template <Activation A, typename scalar_t>
C10_HOST_DEVICE inline scalar_t activation_second_derivative(scalar_t z, scalar_t h, scalar_t param) {
  if constexpr (A == Activation::kRelu || A == Activation::kLeakyRelu) {
    return scalar_t(0);
  } else if constexpr (A == Activation::kTanh) {
    return scalar_t(-2) * h * (scalar_t(1) - h * h);
  } else if constexpr (A == Activation::kSigmoid) {
    return h * (scalar_t(1) - h) * (scalar_t(1) - scalar_t(2) * h);
  } else if constexpr (A == Activation::kGelu) {
    const scalar_t pdf = GeluConstants<scalar_t>::kInvSqrt2Pi * std::exp(scalar_t(-0.5) * z * z);
    return pdf * (scalar_t(2) - z * z);
  } else {  // kElu
    return z > scalar_t(0) ? scalar_t(0) : param * std::exp(z);
  }
}

// Elementwise passes over n values, one loop per activation, each member of the team taking its share (no sync:
// the caller separates passes).

// h = f(z).
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void activation_forward(const Team& team, Activation act, scalar_t param, int64_t n,
                                               const scalar_t* __restrict__ z, scalar_t* __restrict__ h) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    for (int64_t j = team.rank(); j < n; j += team.size()) h[j] = activation_value<A>(z[j], param);
  });
}

// out = f'(z) * in: the backward pass (in = dL/dh, out = dL/dz) and the R-forward pass (in = Rz, out = Rh).
// out may alias in.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void activation_backward(const Team& team, Activation act, scalar_t param, int64_t n,
                                                const scalar_t* z, const scalar_t* h, const scalar_t* in,
                                                scalar_t* out) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    for (int64_t j = team.rank(); j < n; j += team.size()) {
      out[j] = activation_derivative<A>(z[j], h[j], param) * in[j];
    }
  });
}

// The R-backward pass through the activation, in place: rdz = f'(z) * rdz + f''(z) * dh * rz, where on entry
// rdz holds R{dL/dh}, and dh = dL/dh, rz = R{z}.
template <typename Team, typename scalar_t>
C10_HOST_DEVICE inline void activation_r_backward(const Team& team, Activation act, scalar_t param, int64_t n,
                                                  const scalar_t* z, const scalar_t* h, const scalar_t* dh,
                                                  const scalar_t* rz, scalar_t* rdz) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    for (int64_t j = team.rank(); j < n; j += team.size()) {
      scalar_t r = activation_derivative<A>(z[j], h[j], param) * rdz[j];
      if constexpr (A != Activation::kRelu && A != Activation::kLeakyRelu) {
        r += activation_second_derivative<A>(z[j], h[j], param) * dh[j] * rz[j];
      }
      rdz[j] = r;
    }
  });
}

}  // namespace mamlext
