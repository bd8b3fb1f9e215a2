// Autograd kernels of the batch norm ops (batch_norm, batch_norm_eval, _batch_norm_backward,
// batch_norm_update_stats_), registered for the Autograd dispatch key in C++.
//
// NOTE [Batch norm autograd in C++]
// These ops run ~40 times per MAML++ meta-step, each with a backward and, in second-order MAML, a
// double backward. Registered from Python (torch.library.register_autograd), every call and every
// backward went through Python (argument defaults, the Python autograd.Function, redispatch):
// tens of microseconds of host time each. Here the same formulas are torch::autograd::Function
// subclasses:
//   batch_norm, batch_norm_eval  --backward-->  _batch_norm_backward
//   _batch_norm_backward         --backward-->  _batch_norm_double_backward
// Each backward calls the next op through the dispatcher, so with create_graph it records that
// op's own autograd node and is differentiable again. _batch_norm_double_backward keeps its
// Python autograd (mamlpp_ext/ops/batch_norm.py: third order differentiates the pure-PyTorch twin);
// it is called through its autograd kernel only when a graph is to be recorded (grad mode on and
// a differentiable input requires grad), and below autograd otherwise, so second-order MAML runs
// no Python per call. Saved statistics are constants whose dependence on input is inside the
// closed-form derivatives (NOTE [Task-batched batch norm] in mamlpp/batch_norm.h): passing
// statistics that require grad while a graph is recorded is an error, never a silently dropped
// gradient. The output `out` only carries the sign of the activation slope (piecewise constant):
// its gradient is zero. batch_norm_update_stats_ updates state, not a differentiable value: its
// kernel runs below autograd (as under torch.no_grad) and bumps the version counters of the
// running statistics, as an in-place ATen op does. Fake kernels stay in Python.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace mamlpp {
namespace autograd {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- typed dispatcher handles (found once; the signatures of the device kernels) ------------

using BatchNormSig = Tensor3(const Tensor&, const OptTensor&, const OptTensor&, int64_t, double,
                             std::optional<double>);
using BatchNormEvalSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                const Tensor&, int64_t, int64_t, double, std::optional<double>);
using UpdateStatsSig = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                            int64_t, int64_t, double);
using BackwardSig = Tensor3(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                            const Tensor&, const Tensor&, int64_t, int64_t, bool, double, double);
using DoubleBackwardSig = Tensor3(const OptTensor&, const OptTensor&, const OptTensor&,
                                  const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                  const Tensor&, const Tensor&, int64_t, int64_t, bool, double,
                                  double);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const c10::TypedOperatorHandle<BatchNormSig>& batch_norm_op() {
  static const auto op = find_op<BatchNormSig>("mamlpp_ext::batch_norm");
  return op;
}
const c10::TypedOperatorHandle<BatchNormEvalSig>& batch_norm_eval_op() {
  static const auto op = find_op<BatchNormEvalSig>("mamlpp_ext::batch_norm_eval");
  return op;
}
const c10::TypedOperatorHandle<UpdateStatsSig>& update_stats_op() {
  static const auto op = find_op<UpdateStatsSig>("mamlpp_ext::batch_norm_update_stats_");
  return op;
}
const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = find_op<BackwardSig>("mamlpp_ext::_batch_norm_backward");
  return op;
}
const c10::TypedOperatorHandle<DoubleBackwardSig>& double_backward_op() {
  static const auto op = find_op<DoubleBackwardSig>("mamlpp_ext::_batch_norm_double_backward");
  return op;
}

// ---- helpers --------------------------------------------------------------------------------

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
Tensor or_undefined(const OptTensor& t) { return t ? *t : Tensor(); }

bool needs_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
bool needs_grad(const OptTensor& t) { return t && needs_grad(*t); }

// Whether a call with these differentiable inputs records an autograd node.
template <typename... Ts>
bool records_graph(const Ts&... ts) {
  return c10::GradMode::is_enabled() && (needs_grad(ts) || ...);
}

void check_constant_stats(const char* op, const Tensor& mean, const Tensor& var) {
  TORCH_CHECK(!c10::GradMode::is_enabled() || !(mean.requires_grad() || var.requires_grad()), op,
              ": mean and var are treated as constants (their dependence on input is in the "
              "closed-form derivative); they must not require grad");
}

// The backward ops' float slope argument (read only when out is given).
double slope_or_zero(const std::optional<double>& negative_slope) {
  return negative_slope.value_or(0.0);
}

// _batch_norm_double_backward: through its (Python) autograd kernel when a graph is recorded,
// below autograd otherwise (see NOTE [Batch norm autograd in C++]).
Tensor3 call_double_backward(const OptTensor& ggx, const OptTensor& ggw, const OptTensor& ggb,
                             const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
                             const OptTensor& out, const Tensor& mean, const Tensor& var,
                             int64_t tasks, int64_t step, bool training, double eps,
                             double negative_slope) {
  if (records_graph(ggx, ggw, ggb, grad_out, input, weight)) {
    return double_backward_op().call(ggx, ggw, ggb, grad_out, input, weight, out, mean, var,
                                     tasks, step, training, eps, negative_slope);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return double_backward_op().call(ggx, ggw, ggb, grad_out, input, weight, out, mean, var, tasks,
                                   step, training, eps, negative_slope);
}

// ---- batch_norm -----------------------------------------------------------------------------

// forward(input, weight, bias, tasks, eps, negative_slope) -> (out, mean, var); mean and var are
// not differentiable.
struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, int64_t tasks, double eps,
                               std::optional<double> negative_slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, var] = batch_norm_op().call(input, weight, bias, tasks, eps, negative_slope);
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    ctx->saved_data["tasks"] = tasks;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["slope"] = slope_or_zero(negative_slope);
    ctx->save_for_backward(
        {input, or_undefined(weight), negative_slope ? out : Tensor(), mean, var});
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(6);  // input, weight, bias, tasks, eps, negative_slope
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;  // only mean / var were used: no gradient
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& weight = saved[1];
    auto [dx, dw, db] = backward_op().call(
        grad_out, saved[0], opt(weight), opt(saved[2]), saved[3], saved[4],
        ctx->saved_data["tasks"].toInt(), /*step=*/0, /*training=*/true,
        ctx->saved_data["eps"].toDouble(), ctx->saved_data["slope"].toDouble());
    result[0] = std::move(dx);
    if (weight.defined()) {
      result[1] = std::move(dw);
      result[2] = std::move(db);
    }
    return result;
  }
};

Tensor3 batch_norm_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                            int64_t tasks, double eps, std::optional<double> negative_slope) {
  if (!records_graph(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_op().call(input, weight, bias, tasks, eps, negative_slope);
  }
  const variable_list r =
      BatchNormFunction::apply(input, weight, bias, tasks, eps, negative_slope);
  return {r[0], r[1], r[2]};
}

// ---- batch_norm_eval ------------------------------------------------------------------------

struct BatchNormEvalFunction : public torch::autograd::Function<BatchNormEvalFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                        const OptTensor& bias, const Tensor& running_mean,
                        const Tensor& running_var, int64_t tasks, int64_t step, double eps,
                        std::optional<double> negative_slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = batch_norm_eval_op().call(input, weight, bias, running_mean, running_var, tasks,
                                           step, eps, negative_slope);
    ctx->set_materialize_grads(false);
    ctx->saved_data["tasks"] = tasks;
    ctx->saved_data["step"] = step;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["slope"] = slope_or_zero(negative_slope);
    ctx->save_for_backward({input, or_undefined(weight), negative_slope ? out : Tensor(),
                            running_mean, running_var});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // input, weight, bias, running_mean, running_var, tasks, step, eps, negative_slope
    variable_list result(9);
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& weight = saved[1];
    auto [dx, dw, db] = backward_op().call(
        grad_out, saved[0], opt(weight), opt(saved[2]), saved[3], saved[4],
        ctx->saved_data["tasks"].toInt(), ctx->saved_data["step"].toInt(), /*training=*/false,
        ctx->saved_data["eps"].toDouble(), ctx->saved_data["slope"].toDouble());
    result[0] = std::move(dx);
    if (weight.defined()) {
      result[1] = std::move(dw);
      result[2] = std::move(db);
    }
    return result;
  }
};

Tensor batch_norm_eval_autograd(const Tensor& input, const OptTensor& weight,
                                const OptTensor& bias, const Tensor& running_mean,
                                const Tensor& running_var, int64_t tasks, int64_t step, double eps,
                                std::optional<double> negative_slope) {
  TORCH_CHECK(!c10::GradMode::is_enabled() ||
                  !(running_mean.requires_grad() || running_var.requires_grad()),
              "mamlpp_ext.batch_norm_eval: running statistics are constants; gradients w.r.t. "
              "running_mean/running_var are not supported");
  if (!records_graph(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_eval_op().call(input, weight, bias, running_mean, running_var, tasks, step,
                                     eps, negative_slope);
  }
  return BatchNormEvalFunction::apply(input, weight, bias, running_mean, running_var, tasks, step,
                                      eps, negative_slope);
}

// ---- _batch_norm_backward -------------------------------------------------------------------

// forward(grad_out, input, weight, out, mean, var, ...) -> (grad_input, grad_weight, grad_bias);
// its backward is _batch_norm_double_backward. Without weight, grad_weight and grad_bias are the
// sums for a unit affine, still functions of grad_out and input: their upstream gradients are
// passed on too (the double backward op takes them with shape (C,)).
struct BatchNormBackwardFunction : public torch::autograd::Function<BatchNormBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& input,
                               const OptTensor& weight, const OptTensor& out, const Tensor& mean,
                               const Tensor& var, int64_t tasks, int64_t step, bool training,
                               double eps, double negative_slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dx, dw, db] = backward_op().call(grad_out, input, weight, out, mean, var, tasks, step,
                                           training, eps, negative_slope);
    ctx->set_materialize_grads(false);
    ctx->saved_data["tasks"] = tasks;
    ctx->saved_data["step"] = step;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["slope"] = negative_slope;
    ctx->save_for_backward(
        {grad_out, input, or_undefined(weight), or_undefined(out), mean, var});
    return {dx, dw, db};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // grad_out, input, weight, out, mean, var, tasks, step, training, eps, negative_slope
    variable_list result(11);
    const OptTensor ggx = opt(grads[0]), ggw = opt(grads[1]), ggb = opt(grads[2]);
    if (!ggx && !ggw && !ggb) return result;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& weight = saved[2];
    auto [ggo, gx, gw] = call_double_backward(
        ggx, ggw, ggb, saved[0], saved[1], opt(weight), opt(saved[3]), saved[4], saved[5],
        ctx->saved_data["tasks"].toInt(), ctx->saved_data["step"].toInt(),
        ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
        ctx->saved_data["slope"].toDouble());
    result[0] = std::move(ggo);
    result[1] = std::move(gx);
    if (weight.defined()) result[2] = std::move(gw);
    return result;  // out: zero derivative (the slope is piecewise constant); mean, var: constants
  }
};

Tensor3 batch_norm_backward_autograd(const Tensor& grad_out, const Tensor& input,
                                     const OptTensor& weight, const OptTensor& out,
                                     const Tensor& mean, const Tensor& var, int64_t tasks,
                                     int64_t step, bool training, double eps,
                                     double negative_slope) {
  check_constant_stats("mamlpp_ext._batch_norm_backward", mean, var);
  if (!records_graph(grad_out, input, weight)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return backward_op().call(grad_out, input, weight, out, mean, var, tasks, step, training, eps,
                              negative_slope);
  }
  const variable_list r = BatchNormBackwardFunction::apply(
      grad_out, input, weight, out, mean, var, tasks, step, training, eps, negative_slope);
  return {r[0], r[1], r[2]};
}

// ---- batch_norm_update_stats_ ----------------------------------------------------------------

void batch_norm_update_stats_autograd(const Tensor& running_mean, const Tensor& running_var,
                                      const Tensor& mean, const Tensor& var, int64_t tasks,
                                      int64_t step, int64_t count, double momentum) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    update_stats_op().call(running_mean, running_var, mean, var, tasks, step, count, momentum);
  }
  torch::autograd::impl::bump_version(running_mean);
  torch::autograd::impl::bump_version(running_var);
}

}  // namespace
}  // namespace autograd
}  // namespace mamlpp

TORCH_LIBRARY_IMPL(mamlpp_ext, Autograd, m) {
  m.impl("batch_norm", &mamlpp::autograd::batch_norm_autograd);
  m.impl("batch_norm_eval", &mamlpp::autograd::batch_norm_eval_autograd);
  m.impl("_batch_norm_backward", &mamlpp::autograd::batch_norm_backward_autograd);
  m.impl("batch_norm_update_stats_", &mamlpp::autograd::batch_norm_update_stats_autograd);
}
