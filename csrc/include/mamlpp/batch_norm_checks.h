// Host side of the batch norm ops shared by the CPU and CUDA entry points, written once: the
// complete argument checks of each op (each message names the op and the argument, so both
// devices reject the same inputs with the same words), the operands as both devices' kernels
// read them, and the dispatch from the input dtype and the op's runtime flags to compile-time
// ones. See NOTE [Task-batched batch norm] in mamlpp/batch_norm.h for the semantics.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace mamlpp {

// How a (N, T*C, *spatial) input splits into groups: element (n, g, k) of the contiguous input
// is at (n * groups + g) * inner + k.
struct BnGeometry {
  int64_t batch = 0;     // N
  int64_t tasks = 0;     // T
  int64_t channels = 0;  // C
  int64_t groups = 0;    // G = T * C
  int64_t inner = 1;     // prod(spatial); 1 for a 2-D input
  int64_t count() const { return batch * inner; }  // M: elements per group
};

// The arguments of one call of a batch norm op, validated, in the form the kernels read them.
// Every tensor is contiguous; an absent optional tensor is nullopt (or undefined).
struct BnArgs {
  BnGeometry geo;
  at::Tensor input;
  std::optional<at::Tensor> weight;   // nullopt without affine
  std::optional<at::Tensor> bias;     // forwards only; nullopt without affine
  std::vector<int64_t> affine_shape;  // shape of the affine gradients: weight's, or (C,)
  bool training = true;
  int64_t step = 0;
  double eps = 0.0;
  bool activation = false;       // the LeakyReLU is fused (forwards: negative_slope given;
                                 // backward ops: out given)
  double negative_slope = 0.0;   // its slope a >= 0, when `activation`
  // batch_norm_eval and the backward ops: the statistics in the opmath dtype of input. Group g
  // uses element [stats_offset + g % stats_period] of mean and var: training, the (T*C,) batch
  // statistics (offset 0, period G); evaluation, row `step` of the (S, C) running statistics
  // (offset step * C, period C).
  at::Tensor mean;
  at::Tensor var;
  int64_t stats_offset = 0;
  int64_t stats_period = 1;
  // The backward ops.
  at::Tensor grad_out;
  at::Tensor out;  // the forward's output when `activation`, else undefined
  // _batch_norm_double_backward: the upstream gradients (absent: zero).
  at::Tensor grad_grad_input;                 // like input, or undefined
  std::optional<at::Tensor> grad_grad_weight;  // affine_shape, or nullopt
  std::optional<at::Tensor> grad_grad_bias;    // affine_shape, or nullopt
};

// The complete argument checks of each op, one function per op for both devices (schemas and
// semantics in csrc/ops.cpp).
BnArgs batch_norm_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, int64_t tasks, double eps,
                       const std::optional<double>& negative_slope);
BnArgs batch_norm_eval_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                            const at::Tensor& running_var, int64_t tasks, int64_t step, double eps,
                            const std::optional<double>& negative_slope);
BnArgs batch_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& out, const at::Tensor& mean,
                                const at::Tensor& var, int64_t tasks, int64_t step, bool training,
                                double eps, double negative_slope);
BnArgs batch_norm_double_backward_args(const std::optional<at::Tensor>& grad_grad_input,
                                       const std::optional<at::Tensor>& grad_grad_weight,
                                       const std::optional<at::Tensor>& grad_grad_bias,
                                       const at::Tensor& grad_out, const at::Tensor& input,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& out,
                                       const at::Tensor& mean, const at::Tensor& var,
                                       int64_t tasks, int64_t step, bool training, double eps,
                                       double negative_slope);
// batch_norm_update_stats_ (which writes in place: nothing to prepare). Returns C.
int64_t check_batch_norm_update_stats_args(const at::Tensor& running_mean,
                                           const at::Tensor& running_var, const at::Tensor& mean,
                                           const at::Tensor& var, int64_t tasks, int64_t step,
                                           int64_t count);

// ---- dispatch ---------------------------------------------------------------------------------
//
// bn_dispatch(dtype, flag..., fn) calls fn(BnType<scalar_t>{}, std::bool_constant<flag>{}...) for
// the input dtype (float32, float64, float16, bfloat16; validated before) and one or two runtime
// flags (the fused activation; the presence of an upstream gradient), so the kernels get them as
// template arguments. The one place where both devices turn runtime choices into instantiations.

template <typename T>
struct BnType {
  using type = T;
};

template <typename Fn>
void bn_dispatch(at::ScalarType dtype, bool flag, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mamlpp_ext batch norm", [&] {
    if (flag) {
      fn(BnType<scalar_t>{}, std::true_type{});
    } else {
      fn(BnType<scalar_t>{}, std::false_type{});
    }
  });
}

template <typename Fn>
void bn_dispatch(at::ScalarType dtype, bool flag1, bool flag2, const Fn& fn) {
  bn_dispatch(dtype, flag1, [&](auto type, auto first) {
    if (flag2) {
      fn(type, first, std::true_type{});
    } else {
      fn(type, first, std::false_type{});
    }
  });
}

}  // namespace mamlpp
