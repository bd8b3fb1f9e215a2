// Arithmetic of the per-step, task-batched batch norm ops (batch_norm, batch_norm_eval,
// _batch_norm_backward, _batch_norm_double_backward), shared by the CPU and CUDA kernels.
// Everything here is scalars in, scalars out; how the elements are loaded, reduced and stored
// is each device's business.
//
// NOTE [Task-batched batch norm]
// Input x has shape (N, T*C, *spatial): channel g = t*C + c is channel c of task t. Each of the
// G = T*C "groups" is normalised with its own statistics over its M = N*prod(spatial) elements:
//   x^ = (x - mean_g) * invstd_g,  invstd_g = 1 / sqrt(var_g + eps)   (var biased)
//   z  = gamma_g * x^ + beta_g,    y = z, or, with the activation fused, y = LeakyReLU_a(z) =
//   (z > 0 ? z : a * z) for a negative slope a >= 0 (a = 0 is ReLU).
// gamma_g is weight[c] for a shared (C,) affine and weight[t, c] for a per-task (T, C) one; in
// both cases it is element g % A of the flattened weight, A = weight.numel().
// Training mode takes (mean_g, var_g) from the batch; evaluation mode from row `step` of the
// (S, C) running statistics (element [step, g % C]), which are then constants.
//
// With u = dy * s, where s = 1 (no activation) or s = (y > 0 ? 1 : a) (the activation's slope,
// read from the sign of the saved output: y > 0 <=> z > 0 for every a >= 0, which is why a < 0
// is rejected; s is piecewise constant, so it contributes nothing to higher derivatives), and
// the per-group sums
//   S1 = sum(u),  Sud = sum(u * (x - mean)),  S2 = invstd * Sud = sum(u * x^),
// the backward is (ATen's closed form, saved statistics treated as constants):
//   training:   dx = gamma * invstd * (u - S1/M - x^ * S2/M)
//   evaluation: dx = gamma * invstd * u
//   dgamma_g = S2, dbeta_g = S1 (summed over tasks for a shared affine).
// The double backward receives upstream gradients Gx (of dx), Ggamma, Gbeta and needs also
//   SG = sum(Gx), SGd = sum(Gx * (x - mean)), A = sum(Gx * u);  gbar = SG/M, c = invstd*SGd/M,
//   P = A - S1*gbar - S2*c. In training mode (mean and invstd functions of x):
//   grad_dy = s * (gamma*invstd*(Gx - gbar - x^ c) + Ggamma x^ + Gbeta)
//   grad_x  = e*(u - S1/M - x^ S2/M) - f*(Gx - gbar - x^ c) - gamma*invstd^2*(P/M)*x^,
//             e = invstd*(Ggamma - gamma*invstd*c),  f = gamma*invstd^2*S2/M
//   grad_gamma_g = invstd * P
// and in evaluation mode grad_dy = s*(gamma*invstd*Gx + Ggamma x^ + Gbeta),
// grad_x = Ggamma*invstd*u, grad_gamma_g = invstd*A.
// Every elementwise result is an affine function of the element's (u, Gx, x) with per-group
// coefficients; the functions below form those coefficients once per group.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace mamlpp {

// What is guaranteed across devices: each device is deterministic (the same inputs give the same
// bits whatever the CPU thread count or the CUDA scheduling; on CUDA for one GPU model, as the
// reduction grid depends on the SM count), and CPU and CUDA agree within float rounding, not bit
// for bit: the CPU kernels add their per-span partial sums in float64 and form the per-group
// coefficients in float64, the CUDA kernels do both in opmath (float32 for float32, float16 and
// bfloat16 input), and the two devices add in different orders.
template <typename T>
C10_HOST_DEVICE inline T bn_invstd(T var, T eps) {
#ifdef __CUDA_ARCH__
  return T(1) / ::sqrt(var + eps);
#else
  return T(1) / std::sqrt(var + eps);
#endif
}

// The fused activation, LeakyReLU with negative slope a >= 0 (ReLU for a = 0), and its
// (piecewise constant) derivative, read from the sign of the output.
template <typename T>
C10_HOST_DEVICE inline T bn_leaky(T z, T slope) {
  return z > T(0) ? z : z * slope;
}
template <typename T>
C10_HOST_DEVICE inline T bn_leaky_slope(T out, T slope) {
  return out > T(0) ? T(1) : slope;
}

// Forward: z = x * scale + shift.
template <typename T>
struct BnForwardCoeffs {
  T scale;
  T shift;
};

template <typename T>
C10_HOST_DEVICE inline BnForwardCoeffs<T> bn_forward_coeffs(T mean, T invstd, T gamma, T beta) {
  const T scale = gamma * invstd;
  return {scale, beta - mean * scale};
}

// Backward: dx = ku * u + kx * x + k0.
template <typename T>
struct BnBackwardCoeffs {
  T ku;
  T kx;
  T k0;
};

template <typename T>
C10_HOST_DEVICE inline BnBackwardCoeffs<T> bn_backward_coeffs(T mean, T invstd, T gamma, T s1,
                                                              T sud, int64_t count,
                                                              bool training) {
  const T ku = gamma * invstd;
  if (!training || count == 0) {
    return {ku, T(0), T(0)};
  }
  const T inv_m = T(1) / static_cast<T>(count);
  const T s2 = invstd * sud;
  const T kx = -ku * invstd * s2 * inv_m;
  return {ku, kx, -ku * s1 * inv_m - kx * mean};
}

// Double backward: grad_dy = s * (p1 * Gx + p2 * x + p0),
//                  grad_x  = qu * u + qg * Gx + qx * x + q0,
//                  grad_gamma (this group's share) = dgamma.
template <typename T>
struct BnDoubleBackwardCoeffs {
  T p1, p2, p0;
  T qu, qg, qx, q0;
  T dgamma;
};

// Sums of one group needed by the double backward (see NOTE [Task-batched batch norm]).
template <typename T>
struct BnDoubleBackwardSums {
  T s1;   // sum(u)
  T sud;  // sum(u * (x - mean))
  T sg;   // sum(Gx)
  T sgd;  // sum(Gx * (x - mean))
  T a;    // sum(Gx * u)
};

template <typename T>
C10_HOST_DEVICE inline BnDoubleBackwardCoeffs<T> bn_double_backward_coeffs(
    T mean, T invstd, T gamma, T ggamma, T gbeta, const BnDoubleBackwardSums<T>& s, int64_t count,
    bool training) {
  BnDoubleBackwardCoeffs<T> k;
  const T gs = gamma * invstd;
  k.p1 = gs;
  if (!training || count == 0) {
    k.p2 = invstd * ggamma;
    k.p0 = gbeta - k.p2 * mean;
    k.qu = invstd * ggamma;
    k.qg = T(0);
    k.qx = T(0);
    k.q0 = T(0);
    k.dgamma = invstd * s.a;
    return k;
  }
  const T inv_m = T(1) / static_cast<T>(count);
  const T s2 = invstd * s.sud;
  const T gbar = s.sg * inv_m;
  const T c = invstd * s.sgd * inv_m;
  const T p = s.a - s.s1 * gbar - s2 * c;
  const T e = invstd * (ggamma - gs * c);
  const T f = gs * invstd * s2 * inv_m;
  k.p2 = e;
  k.p0 = -gs * gbar + gbeta - e * mean;
  k.qu = e;
  k.qg = -f;
  const T h = -e * s2 * inv_m + f * c - gs * invstd * p * inv_m;  // coefficient of x^
  k.qx = h * invstd;
  k.q0 = -e * s.s1 * inv_m + f * gbar - k.qx * mean;
  k.dgamma = invstd * p;
  return k;
}

// Running statistics: new = (1 - momentum) * old + momentum * batch, where the batch value of
// channel c is the mean over tasks of the per-task batch mean (or unbiased variance).
template <typename T>
C10_HOST_DEVICE inline T bn_running_update(T old, T batch, T momentum) {
  return (T(1) - momentum) * old + momentum * batch;
}

template <typename T>
C10_HOST_DEVICE inline T bn_unbiased_var(T biased_var, int64_t count) {
  return biased_var * static_cast<T>(count) / static_cast<T>(count - 1);
}

}  // namespace mamlpp
