// Argument validation of the batch norm ops, shared by the CPU and CUDA entry points.
#include "mamlpp/batch_norm_checks.h"

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace mamlpp {

namespace {

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name,
              " to be on the device of input (", input.device(), "), but it is on ", t.device());
}

}  // namespace

BnGeometry check_bn_input(const char* op, const at::Tensor& input, int64_t tasks) {
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

void check_bn_affine(const char* op, const BnGeometry& geo, const at::Tensor& input,
                     const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias) {
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  TORCH_CHECK(has_w == has_b, op,
              ": expected weight and bias to be both given or both None, but got ",
              has_w ? "a weight" : "no weight", " and ", has_b ? "a bias" : "no bias");
  const std::pair<const char*, const std::optional<at::Tensor>*> args[] = {{"weight", &weight},
                                                                           {"bias", &bias}};
  for (const auto& [name, t] : args) {
    if (!(t->has_value() && (*t)->defined())) continue;
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

void check_bn_like(const char* op, const char* name, const at::Tensor& t,
                   const at::Tensor& input) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, but got None");
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": expected ", name,
              " to have the shape of input ", input.sizes(), ", but got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name,
              " to have the dtype of input (", input.scalar_type(), "), but got ",
              t.scalar_type());
  check_device(op, name, t, input);
}

void check_bn_running_stats(const char* op, const char* name, const at::Tensor& t,
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

void check_bn_batch_stats(const char* op, const char* name, const at::Tensor& t,
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

void check_bn_stats(const char* op, bool training, const at::Tensor& mean, const at::Tensor& var,
                    const BnGeometry& geo, const at::Tensor& input, int64_t step) {
  if (training) {
    check_bn_batch_stats(op, "mean", mean, geo, input);
    check_bn_batch_stats(op, "var", var, geo, input);
  } else {
    check_bn_running_stats(op, "mean", mean, geo, input, step);
    check_bn_running_stats(op, "var", var, geo, input, step);
  }
}

void check_bn_negative_slope(const char* op, const std::optional<double>& negative_slope) {
  if (!negative_slope.has_value()) return;
  const double a = *negative_slope;
  TORCH_CHECK(std::isfinite(a) && a >= 0.0, op,
              ": expected negative_slope to be None (no activation) or a finite float >= 0 "
              "(the LeakyReLU slope; 0 is ReLU), but got negative_slope=",
              a);
}

std::vector<int64_t> bn_affine_shape(const BnGeometry& geo,
                                     const std::optional<at::Tensor>& weight) {
  if (weight.has_value() && weight->defined()) {
    return weight->sizes().vec();
  }
  return {geo.channels};
}

at::Tensor bn_stats_operand(const at::Tensor& stats, const at::Tensor& input) {
  return stats.to(at::toOpMathType(input.scalar_type())).contiguous();
}

void check_bn_update_stats(const char* op, const at::Tensor& running_mean,
                           const at::Tensor& running_var, const at::Tensor& mean,
                           const at::Tensor& var, int64_t tasks, int64_t step, int64_t count) {
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
}

}  // namespace mamlpp

namespace mamlpp {

void check_bn_training_count(const char* op, const BnGeometry& geo, const at::Tensor& input) {
  TORCH_CHECK(geo.count() != 1, op,
              ": expected more than one value per (task, channel) in training mode, but input "
              "of shape ",
              input.sizes(), " has N*H*W = 1");
}

}  // namespace mamlpp
