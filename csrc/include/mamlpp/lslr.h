// Arithmetic of the LSLR (learned per-layer, per-step learning rate) ops, shared by the CPU
// and CUDA kernels. Everything here is scalars in, scalars out, in `opmath` precision (float
// for half/bfloat16 inputs); how the scalars are loaded and stored is each device's business.
//
// NOTE [LSLR op family]
// The inner-loop update of MAML++ and all of its derivatives close over three ops:
//   lslr_update(p, g, lrs, s)_k = p_k - lrs[k, s] * g_k
//   _lslr_scale(x, lrs, s, a)_k  = a * lrs[k, s] * x_k
//   _lslr_dot(x, y, like, s, a)  = (K, S) zeros except [k, s] = a * sum(x_k * y_k)
// d update / d grads is a scale, d update / d lrs is a dot; d scale is a scale and a dot; d dot
// is two scales. So every order of derivative runs on these fused kernels (their autograd:
// csrc/autograd/lslr_autograd.cpp).
#pragma once

#include <c10/macros/Macros.h>

namespace mamlpp {

// One element of lslr_update: the SGD step of one fast weight.
template <typename opmath_t>
C10_HOST_DEVICE inline opmath_t lslr_update_op(opmath_t param, opmath_t grad, opmath_t lr) {
  return param - lr * grad;
}

// One element of _lslr_scale; `coeff` is alpha * lrs[k, s], formed once per tensor.
template <typename opmath_t>
C10_HOST_DEVICE inline opmath_t lslr_scale_op(opmath_t x, opmath_t coeff) {
  return coeff * x;
}

// One accumulation step of _lslr_dot.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t lslr_dot_op(acc_t acc, acc_t x, acc_t y) {
  return acc + x * y;
}

}  // namespace mamlpp
