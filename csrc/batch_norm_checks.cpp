// Argument checks and operands of the batch norm ops, one function per op, called by both the
// CPU and the CUDA entry points (mamlpp/batch_norm_checks.h).
#include "mamlpp/batch_norm_checks.h"

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace mamlpp {
namespace {

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  if (given(t)) return t->contiguous();
  return std::nullopt;
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name,
              " to be on the device of input (", input.device(), "), but it is on ", t.device());
}

// input: 2-D (N, T*C) or 4-D (N, T*C, H, W), floating point; tasks >= 1 divides T*C.
BnGeometry check_input(const char* op, const at::Tensor& input, int64_t tasks) {
  TORCH_CHECK(input.defined(), op, ": expected input to be a tensor, but got None");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": expected input to be a floating-point tensor (float32, float64, float16 or "
              "bfloat16), but got dtype ",
              input.scalar_type());
  TORCH_CHECK(input.dim() == 2 || input.dim() == 4, op,
              ": expected input to be 2-D (N, T*C) or 4-D (N, T*C, H, W), but got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
  TORCH_CHECK(tasks >= 1, op, ": expected tasks >= 1, but got tasks=", tasks);
  BnGeometry geo;
  geo.batch = input.size(0);
  geo.groups = input.size(1);
  geo.tasks = tasks;
  TORCH_CHECK(geo.groups % tasks == 0, op, ": expected the channel count of input (",
              geo.groups, ", dim 1 of shape ", input.sizes(),
              ") to be a multiple of tasks=", tasks,
              " (task-major layout: channel t*C + c is channel c of task t)");
  geo.channels = geo.groups / tasks;
  geo.inner = input.dim() == 4 ? input.size(2) * input.size(3) : 1;
  return geo;
}

// weight and bias: both None, or both of shape (C,) (shared by the tasks) or (T, C) (per task),
// with the dtype and device of input. The backward ops pass weight for both.
void check_affine(const char* op, const BnGeometry& geo, const at::Tensor& input,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  const bool has_w = given(weight);
  const bool has_b = given(bias);
  TORCH_CHECK(has_w == has_b, op,
              ": expected weight and bias to be both given or both None, but got ",
              has_w ? "a weight" : "no weight", " and ", has_b ? "a bias" : "no bias");
  const std::pair<const char*, const std::optional<at::Tensor>*> args[] = {{"weight", &weight},
                                                                           {"bias", &bias}};
  for (const auto& [name, t] : args) {
    if (!given(*t)) continue;
    const at::Tensor& a = **t;
    const bool shared = a.dim() == 1 && a.size(0) == geo.channels;
    const bool per_task = a.dim() == 2 && a.size(0) == geo.tasks && a.size(1) == geo.channels;
    TORCH_CHECK(shared || per_task, op, ": expected ", name, " to have shape (", geo.channels,
                ",) (shared by the tasks) or (", geo.tasks, ", ", geo.channels,
                ") (per task), but got shape ", a.sizes());
    TORCH_CHECK(a.scalar_type() == input.scalar_type(), op, ": expected ", name,
                " to have the dtype of input (", input.scalar_type(), "), but got ",
                a.scalar_type());
    check_device(op, name, a, input);
  }
  if (has_w) {
    TORCH_CHECK(weight->sizes() == bias->sizes(), op,
                ": expected weight and bias to have one shape, but got ", weight->sizes(), " and ",
                bias->sizes());
  }
}

// `t` has the shape, dtype and device of input.
void check_like_input(const char* op, const char* name, const at::Tensor& t,
                      const at::Tensor& input) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, but got None");
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": expected ", name,
              " to have the shape of input ", input.sizes(), ", but got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name,
              " to have the dtype of input (", input.scalar_type(), "), but got ",
              t.scalar_type());
  check_device(op, name, t, input);
}

// Running statistics table: 2-D (S, C), floating point of input's dtype or float32, on input's
// device, 0 <= step < S.
void check_running_stats(const char* op, const char* name, const at::Tensor& t,
                         const BnGeometry& geo, const at::Tensor& input, int64_t step) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be an (S, C) tensor, but got None");
  TORCH_CHECK(t.dim() == 2 && t.size(1) == geo.channels, op, ": expected ", name,
              " to be a 2-D (S, C=", geo.channels,
              ") tensor (one row of statistics per inner step), but got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type() || t.scalar_type() == at::kFloat, op,
              ": expected ", name, " to have the dtype of input (", input.scalar_type(),
              ") or float32, but got ", t.scalar_type());
  check_device(op, name, t, input);
  TORCH_CHECK(step >= 0 && step < t.size(0), op, ": expected step in [0, ", t.size(0),
              ") (the number of rows of ", name, "), but got step=", step);
}

// Batch statistics of a training forward: 1-D (T*C,), of the opmath dtype of input (float32,
// float64 for float64 input), on input's device.
void check_batch_stats(const char* op, const char* name, const at::Tensor& t,
                       const BnGeometry& geo, const at::Tensor& input) {
  const auto opmath = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a (T*C,) tensor, but got None");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == geo.groups, op, ": expected ", name,
              " to be a 1-D (T*C=", geo.groups,
              ",) tensor of per-(task, channel) batch statistics, but got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == opmath, op, ": expected ", name, " to have dtype ", opmath,
              " (the statistics dtype of ", input.scalar_type(), " input), but got ",
              t.scalar_type());
  check_device(op, name, t, input);
}

// Negative slope of the fused activation: finite and >= 0 (the backward ops read the slope from
// the sign of the saved output, which is only right for a >= 0).
void check_negative_slope(const char* op, double a) {
  TORCH_CHECK(std::isfinite(a) && a >= 0.0, op,
              ": expected negative_slope to be None (no activation) or a finite float >= 0 "
              "(the LeakyReLU slope; 0 is ReLU), but got negative_slope=",
              a);
}

// Training mode needs more than one element per (task, channel) group (or none at all): the
// unbiased variance of the running statistics is undefined for one value (ATen's rule).
void check_training_count(const char* op, const BnGeometry& geo, const at::Tensor& input) {
  TORCH_CHECK(geo.count() != 1, op,
              ": expected more than one value per (task, channel) in training mode, but input "
              "of shape ",
              input.sizes(), " has N*H*W = 1");
}

// Statistics as the kernels read them: opmath dtype, contiguous, with the per-group indexing.
void set_stats(BnArgs* a, const at::Tensor& mean, const at::Tensor& var) {
  const auto opmath = at::toOpMathType(a->input.scalar_type());
  a->mean = (mean.scalar_type() == opmath ? mean : mean.to(opmath)).contiguous();
  a->var = (var.scalar_type() == opmath ? var : var.to(opmath)).contiguous();
  if (a->training) {
    a->stats_offset = 0;
    a->stats_period = std::max<int64_t>(a->geo.groups, 1);
  } else {
    a->stats_offset = a->step * a->geo.channels;
    a->stats_period = std::max<int64_t>(a->geo.channels, 1);
  }
}

// The checks and operands common to the forwards.
BnArgs forward_args(const char* op, const at::Tensor& input,
                    const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, int64_t tasks, double eps,
                    const std::optional<double>& negative_slope) {
  BnArgs a;
  a.geo = check_input(op, input, tasks);
  check_affine(op, a.geo, input, weight, bias);
  if (negative_slope.has_value()) check_negative_slope(op, *negative_slope);
  a.input = input.contiguous();
  a.weight = contiguous_or_none(weight);
  a.bias = contiguous_or_none(bias);
  a.eps = eps;
  a.activation = negative_slope.has_value();
  a.negative_slope = negative_slope.value_or(0.0);
  return a;
}

// The checks and operands common to the backward ops (weight stands for bias too).
BnArgs backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& input,
                     const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& out, const at::Tensor& mean,
                     const at::Tensor& var, int64_t tasks, int64_t step, bool training,
                     double eps, double negative_slope) {
  BnArgs a;
  a.geo = check_input(op, input, tasks);
  check_affine(op, a.geo, input, weight, weight);
  check_like_input(op, "grad_out", grad_out, input);
  a.activation = given(out);
  if (a.activation) {
    check_like_input(op, "out", *out, input);
    check_negative_slope(op, negative_slope);
  }
  if (training) {
    check_batch_stats(op, "mean", mean, a.geo, input);
    check_batch_stats(op, "var", var, a.geo, input);
  } else {
    check_running_stats(op, "mean", mean, a.geo, input, step);
    check_running_stats(op, "var", var, a.geo, input, step);
  }
  a.input = input.contiguous();
  a.weight = contiguous_or_none(weight);
  a.affine_shape = a.weight ? a.weight->sizes().vec() : std::vector<int64_t>{a.geo.channels};
  a.training = training;
  a.step = step;
  a.eps = eps;
  a.negative_slope = a.activation ? negative_slope : 0.0;
  set_stats(&a, mean, var);
  a.grad_out = grad_out.contiguous();
  if (a.activation) a.out = out->contiguous();
  return a;
}

}  // namespace

BnArgs batch_norm_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, int64_t tasks, double eps,
                       const std::optional<double>& negative_slope) {
  constexpr const char* op = "mamlpp_ext.batch_norm";
  BnArgs a = forward_args(op, input, weight, bias, tasks, eps, negative_slope);
  check_training_count(op, a.geo, input);
  a.training = true;
  return a;
}

BnArgs batch_norm_eval_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                            const at::Tensor& running_var, int64_t tasks, int64_t step, double eps,
                            const std::optional<double>& negative_slope) {
  constexpr const char* op = "mamlpp_ext.batch_norm_eval";
  BnArgs a = forward_args(op, input, weight, bias, tasks, eps, negative_slope);
  check_running_stats(op, "running_mean", running_mean, a.geo, input, step);
  check_running_stats(op, "running_var", running_var, a.geo, input, step);
  a.training = false;
  a.step = step;
  set_stats(&a, running_mean, running_var);
  return a;
}

BnArgs batch_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& out, const at::Tensor& mean,
                                const at::Tensor& var, int64_t tasks, int64_t step, bool training,
                                double eps, double negative_slope) {
  return backward_args("mamlpp_ext._batch_norm_backward", grad_out, input, weight, out, mean, var,
                       tasks, step, training, eps, negative_slope);
}

BnArgs batch_norm_double_backward_args(const std::optional<at::Tensor>& grad_grad_input,
                                       const std::optional<at::Tensor>& grad_grad_weight,
                                       const std::optional<at::Tensor>& grad_grad_bias,
                                       const at::Tensor& grad_out, const at::Tensor& input,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& out,
                                       const at::Tensor& mean, const at::Tensor& var,
                                       int64_t tasks, int64_t step, bool training, double eps,
                                       double negative_slope) {
  constexpr const char* op = "mamlpp_ext._batch_norm_double_backward";
  BnArgs a = backward_args(op, grad_out, input, weight, out, mean, var, tasks, step, training,
                           eps, negative_slope);
  if (given(grad_grad_input)) {
    check_like_input(op, "grad_grad_input", *grad_grad_input, input);
    a.grad_grad_input = grad_grad_input->contiguous();
  }
  const std::pair<const char*, const std::optional<at::Tensor>*> upstream[] = {
      {"grad_grad_weight", &grad_grad_weight}, {"grad_grad_bias", &grad_grad_bias}};
  for (const auto& [name, t] : upstream) {
    if (!given(*t)) continue;
    TORCH_CHECK((*t)->sizes() == at::IntArrayRef(a.affine_shape), op, ": expected ", name,
                " to have shape ", at::IntArrayRef(a.affine_shape), ", but got ", (*t)->sizes());
    TORCH_CHECK((*t)->scalar_type() == input.scalar_type(), op, ": expected ", name,
                " to have the dtype of input (", input.scalar_type(), "), but got ",
                (*t)->scalar_type());
    check_device(op, name, **t, input);
  }
  a.grad_grad_weight = contiguous_or_none(grad_grad_weight);
  a.grad_grad_bias = contiguous_or_none(grad_grad_bias);
  return a;
}

int64_t check_batch_norm_update_stats_args(const at::Tensor& running_mean,
                                           const at::Tensor& running_var, const at::Tensor& mean,
                                           const at::Tensor& var, int64_t tasks, int64_t step,
                                           int64_t count) {
  constexpr const char* op = "mamlpp_ext.batch_norm_update_stats_";
  TORCH_CHECK(tasks >= 1, op, ": expected tasks >= 1, but got tasks=", tasks);
  TORCH_CHECK(count != 1, op,
              ": expected count (elements per task and channel) != 1: the unbiased variance of "
              "one value is undefined");
  TORCH_CHECK(count >= 0, op, ": expected count >= 0, but got count=", count);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean},
                                {"var", &var}}) {
    TORCH_CHECK(t->defined() && t->dim() == 1, op, ": expected ", name,
                " to be a 1-D (T*C,) tensor of batch statistics, but got ",
                t->defined() ? "shape " : "None", t->defined() ? t->sizes() : at::IntArrayRef{});
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op,
                ": expected ", name, " to be float32 or float64 (batch statistics), but got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == running_mean.device(), op, ": expected ", name,
                " to be on the device of running_mean (", running_mean.device(),
                "), but it is on ", t->device());
  }
  TORCH_CHECK(mean.sizes() == var.sizes() && mean.scalar_type() == var.scalar_type(), op,
              ": expected mean and var to have one shape and dtype, but got ", mean.sizes(), " ",
              mean.scalar_type(), " and ", var.sizes(), " ", var.scalar_type());
  const int64_t groups = mean.size(0);
  TORCH_CHECK(groups % tasks == 0, op, ": expected the length of mean (", groups,
              ") to be a multiple of tasks=", tasks);
  const int64_t channels = groups / tasks;
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"running_mean", &running_mean},
        {"running_var", &running_var}}) {
    TORCH_CHECK(t->defined() && t->dim() == 2 && t->size(1) == channels, op, ": expected ",
                name, " to be a 2-D (S, C=", channels, ") tensor, but got ",
                t->defined() ? "shape " : "None", t->defined() ? t->sizes() : at::IntArrayRef{});
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": expected ", name,
                " to be a floating-point tensor, but got dtype ", t->scalar_type());
    TORCH_CHECK(t->device() == running_mean.device(), op, ": expected ", name,
                " to be on the device of running_mean (", running_mean.device(),
                "), but it is on ", t->device());
    TORCH_CHECK(step >= 0 && step < t->size(0), op, ": expected step in [0, ", t->size(0),
                ") (the number of rows of ", name, "), but got step=", step);
  }
  TORCH_CHECK(running_mean.sizes() == running_var.sizes() &&
                  running_mean.scalar_type() == running_var.scalar_type(),
              op, ": expected running_mean and running_var to have one shape and dtype, but got ",
              running_mean.sizes(), " ", running_mean.scalar_type(), " and ",
              running_var.sizes(), " ", running_var.scalar_type());
  return channels;
}

}  // namespace mamlpp
