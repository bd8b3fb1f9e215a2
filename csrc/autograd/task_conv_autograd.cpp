// Autograd kernels of the task-batched convolution ops (task_conv, _task_conv_backward),
// registered for the Autograd dispatch key in C++.
//
// NOTE [Task conv autograd]
//   task_conv            --backward-->  _task_conv_backward
//   _task_conv_backward  --backward-->  task_conv + _task_conv_backward (formulas in NOTE
//                                       [Task-batched convolution], mamlpp/task_conv.h)
// Each backward calls the ops through the dispatcher, so with create_graph those calls reach
// these kernels again and record their own nodes: every order of derivative is grouped
// convolutions of ours (one ATen call each), never ATen's per-group double backward, and no
// Python runs. Grad mode off, or no differentiable input requiring grad: the device kernel is
// called directly, no node is built.
//
// Undefined gradients are not materialised (set_materialize_grads(false)): a backward computes
// only the terms whose upstream gradient is defined and whose input needs a gradient; an output
// of _task_conv_backward that its output_mask leaves out is an undefined tensor (None in Python),
// as in ATen's convolution_backward, and no output of its autograd node (which holds the
// computed outputs only, in order). Saved: input and weight (task_conv; each is read for its
// shape by the other's gradient), grad_out, input and weight (_task_conv_backward).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace mamlpp {
namespace autograd {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Mask = std::array<bool, 3>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- typed dispatcher handles -----------------------------------------------------------------

using TaskConvSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::IntArrayRef,
                           c10::IntArrayRef, c10::IntArrayRef, int64_t);
using BackwardSig = Tensor3(const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef,
                            c10::IntArrayRef, c10::IntArrayRef, int64_t, Mask);

const c10::TypedOperatorHandle<TaskConvSig>& task_conv_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mamlpp_ext::task_conv", "")
                             .typed<TaskConvSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mamlpp_ext::_task_conv_backward", "")
                             .typed<BackwardSig>();
  return op;
}

// ---- helpers ----------------------------------------------------------------------------------

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

bool needs_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
bool needs_grad(const OptTensor& t) { return t && needs_grad(*t); }

template <typename... Ts>
bool records_graph(const Ts&... ts) {
  return c10::GradMode::is_enabled() && (needs_grad(ts) || ...);
}

// The convolution's hyper-parameters, kept in a node's saved_data.
void save_params(AutogradContext* ctx, c10::IntArrayRef stride, c10::IntArrayRef padding,
                 c10::IntArrayRef dilation, int64_t groups) {
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["groups"] = groups;
}

struct Params {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  explicit Params(AutogradContext* ctx)
      : stride(ctx->saved_data["stride"].toIntVector()),
        padding(ctx->saved_data["padding"].toIntVector()),
        dilation(ctx->saved_data["dilation"].toIntVector()),
        groups(ctx->saved_data["groups"].toInt()) {}
};

// The three outputs of _task_conv_backward from the list of those `mask` selects (in order),
// undefined where mask is false.
template <typename MaskT>
variable_list unpack(const MaskT& mask, variable_list packed) {
  variable_list out(3);
  size_t k = 0;
  for (size_t i = 0; i < 3; ++i) {
    if (mask[i]) out[i] = std::move(packed[k++]);
  }
  return out;
}

// ---- task_conv --------------------------------------------------------------------------------

// forward(input, weight, bias, stride, padding, dilation, groups) -> out.
struct TaskConvFunction : public torch::autograd::Function<TaskConvFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const OptTensor& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
                        c10::IntArrayRef dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = task_conv_op().call(input, weight, bias, stride, padding, dilation, groups);
    ctx->set_materialize_grads(false);
    save_params(ctx, stride, padding, dilation, groups);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->save_for_backward({input, weight});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(7);  // input, weight, bias, stride, padding, dilation, groups
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;
    // Edges: input (0), weight (1), bias (2, only when given).
    const Mask mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                    ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    if (!mask[0] && !mask[1] && !mask[2]) return result;
    const variable_list saved = ctx->get_saved_variables();
    const Params p(ctx);
    auto [gi, gw, gb] = backward_op().call(grad_out, saved[0], saved[1], p.stride, p.padding,
                                           p.dilation, p.groups, mask);
    result[0] = std::move(gi);
    result[1] = std::move(gw);
    result[2] = std::move(gb);
    return result;
  }
};

Tensor task_conv_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                          c10::IntArrayRef stride, c10::IntArrayRef padding,
                          c10::IntArrayRef dilation, int64_t groups) {
  if (!records_graph(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return task_conv_op().call(input, weight, bias, stride, padding, dilation, groups);
  }
  return TaskConvFunction::apply(input, weight, bias, stride, padding, dilation, groups);
}

// ---- _task_conv_backward ----------------------------------------------------------------------

// forward(grad_out, input, weight, stride, padding, dilation, groups, output_mask)
//   -> (grad_input, grad_weight, grad_bias), undefined where output_mask is false.
struct TaskConvBackwardFunction : public torch::autograd::Function<TaskConvBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& input,
                               const Tensor& weight, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation,
                               int64_t groups, Mask output_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gi, gw, gb] = backward_op().call(grad_out, input, weight, stride, padding, dilation,
                                           groups, output_mask);
    ctx->set_materialize_grads(false);
    save_params(ctx, stride, padding, dilation, groups);
    ctx->saved_data["mask"] = std::vector<bool>(output_mask.begin(), output_mask.end());
    ctx->save_for_backward({grad_out, input, weight});
    // Only the computed outputs are outputs of the node (an undefined one cannot be).
    variable_list outs;
    if (output_mask[0]) outs.push_back(std::move(gi));
    if (output_mask[1]) outs.push_back(std::move(gw));
    if (output_mask[2]) outs.push_back(std::move(gb));
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // grad_out, input, weight, stride, padding, dilation, groups, output_mask
    variable_list result(8);
    const variable_list gg = unpack(ctx->saved_data["mask"].toBoolList().vec(), std::move(grads));
    const Tensor& ggi = gg[0];
    const Tensor& ggw = gg[1];
    const Tensor& ggb = gg[2];
    if (!ggi.defined() && !ggw.defined() && !ggb.defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& grad_out = saved[0];
    const Tensor& input = saved[1];
    const Tensor& weight = saved[2];
    const Params p(ctx);
    // grad_out: task_conv(ggi, W, ggb) + task_conv(I, ggw); the bias term rides on the first
    // convolution that runs, or is broadcast alone.
    if (ctx->needs_input_grad(0)) {
      Tensor g;
      if (ggi.defined()) {
        g = task_conv_op().call(ggi, weight, opt(ggb), p.stride, p.padding, p.dilation,
                                p.groups);
      }
      if (ggw.defined()) {
        Tensor t = task_conv_op().call(input, ggw, ggi.defined() ? std::nullopt : opt(ggb),
                                       p.stride, p.padding, p.dilation, p.groups);
        g = g.defined() ? at::add(g, t) : std::move(t);
      }
      if (!g.defined()) {
        g = ggb.reshape({1, -1, 1, 1}).expand_symint(grad_out.sym_sizes());
      }
      result[0] = std::move(g);
    }
    // input: only grad_weight reads input's values; weight: only grad_input reads weight's.
    if (ctx->needs_input_grad(1) && ggw.defined()) {
      result[1] = std::get<0>(backward_op().call(grad_out, input, ggw, p.stride, p.padding,
                                                 p.dilation, p.groups, Mask{true, false, false}));
    }
    if (ctx->needs_input_grad(2) && ggi.defined()) {
      result[2] = std::get<1>(backward_op().call(grad_out, ggi, weight, p.stride, p.padding,
                                                 p.dilation, p.groups, Mask{false, true, false}));
    }
    return result;
  }
};

Tensor3 task_conv_backward_autograd(const Tensor& grad_out, const Tensor& input,
                                    const Tensor& weight, c10::IntArrayRef stride,
                                    c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                    int64_t groups, Mask output_mask) {
  if (!records_graph(grad_out, input, weight)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return backward_op().call(grad_out, input, weight, stride, padding, dilation, groups,
                              output_mask);
  }
  variable_list r = unpack(output_mask, TaskConvBackwardFunction::apply(
                                            grad_out, input, weight, stride, padding, dilation,
                                            groups, output_mask));
  return {std::move(r[0]), std::move(r[1]), std::move(r[2])};
}

}  // namespace
}  // namespace autograd
}  // namespace mamlpp

TORCH_LIBRARY_IMPL(mamlpp_ext, Autograd, m) {
  m.impl("task_conv", &mamlpp::autograd::task_conv_autograd);
  m.impl("_task_conv_backward", &mamlpp::autograd::task_conv_backward_autograd);
}
