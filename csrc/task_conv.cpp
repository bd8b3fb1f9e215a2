// The task-batched convolution ops, written once for every device: argument checks, and the
// forward and backward as one grouped ATen convolution call each (NOTE [Task-batched
// convolution] in mamlpp/task_conv.h). csrc/cpu/task_conv_cpu.cpp and csrc/cuda/task_conv_cuda.cpp
// register these functions for their dispatch keys; ATen's convolution picks the algorithm of the
// device (oneDNN or native kernels on the CPU, cuDNN on CUDA).
#include "mamlpp/task_conv.h"

#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <c10/util/Exception.h>

#include <utility>

namespace mamlpp {
namespace {

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A (height, width) pair of ints, each at least `min`.
void check_pair(const char* op, const char* name, c10::IntArrayRef v, int64_t min) {
  TORCH_CHECK(v.size() == 2, op, ": expected ", name,
              " to have 2 values (height, width) or to be one int, but got ", v.size(),
              " values ", v);
  TORCH_CHECK(v[0] >= min && v[1] >= min, op, ": expected every value of ", name, " to be >= ",
              min, ", but got ", name, "=", v);
}

void check_like_input(const char* op, const char* name, const at::Tensor& t,
                      const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name,
              " to have the dtype of input (", input.scalar_type(), "), but got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name,
              " to be on the device of input (", input.device(), "), but it is on ", t.device());
}

// The (T*C_out, C_in/groups, kh, kw) weight of the grouped convolution: a view when weight's
// first two dims merge, else a contiguous copy (e.g. a task-broadcast weight.expand(T, ...)).
at::Tensor grouped_weight(const at::Tensor& weight) {
  return weight.reshape({weight.size(0) * weight.size(1), weight.size(2), weight.size(3),
                         weight.size(4)});
}

constexpr int64_t kNoOutputPadding[2] = {0, 0};

}  // namespace

TaskConvGeometry check_task_conv(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                 int64_t groups) {
  TORCH_CHECK(input.defined(), op, ": expected input to be a tensor, but got None");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": expected input to be a floating-point tensor (float32, float64, float16 or "
              "bfloat16), but got dtype ",
              input.scalar_type());
  TORCH_CHECK(input.dim() == 4, op,
              ": expected input to be 4-D (N, T*C_in, H, W), but got a ", input.dim(),
              "-D tensor of shape ", input.sizes());
  TORCH_CHECK(weight.defined(), op, ": expected weight to be a tensor, but got None");
  TORCH_CHECK(weight.dim() == 5, op,
              ": expected weight to be 5-D (T, C_out, C_in/groups, kh, kw), but got a ",
              weight.dim(), "-D tensor of shape ", weight.sizes());
  check_like_input(op, "weight", weight, input);
  TORCH_CHECK(groups >= 1, op, ": expected groups >= 1, but got groups=", groups);
  TaskConvGeometry geo;
  geo.batch = input.size(0);
  geo.tasks = weight.size(0);
  geo.out_channels = weight.size(1);
  geo.groups = groups;
  TORCH_CHECK(geo.tasks >= 1, op,
              ": expected weight to hold at least one task (dim 0), but got shape ",
              weight.sizes());
  TORCH_CHECK(geo.out_channels >= 1 && geo.out_channels % groups == 0, op,
              ": expected the output channels of weight (dim 1 of shape ", weight.sizes(),
              ") to be a positive multiple of groups=", groups);
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1 && weight.size(4) >= 1, op,
              ": expected weight to have at least one input channel and a non-empty kernel, but "
              "got shape ",
              weight.sizes());
  geo.in_channels = groups * weight.size(2);
  TORCH_CHECK(input.size(1) == geo.tasks * geo.in_channels, op, ": expected input to have T*C_in = ",
              geo.tasks * geo.in_channels, " channels (T=", geo.tasks,
              " tasks from dim 0 of weight, C_in = groups*weight.size(2) = ", groups, "*",
              weight.size(2),
              "; task-major layout: channel t*C_in + c is channel c of task t), but got input of "
              "shape ",
              input.sizes());
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  const char* dims[2] = {"height", "width"};
  for (int d = 0; d < 2; ++d) {
    const int64_t padded = input.size(2 + d) + 2 * padding[d];
    const int64_t span = dilation[d] * (weight.size(3 + d) - 1) + 1;
    TORCH_CHECK(padded >= span, op, ": expected the padded input ", dims[d], " (",
                input.size(2 + d), " + 2*padding ", padding[d], " = ", padded,
                ") to be at least the dilated kernel ", dims[d], " (", span,
                "), but it is smaller: input shape ", input.sizes(), ", weight shape ",
                weight.sizes());
    geo.out_size[d] = (padded - span) / stride[d] + 1;
  }
  if (given(bias)) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == geo.tasks &&
                    bias->size(1) == geo.out_channels,
                op, ": expected bias to have shape (T, C_out) = (", geo.tasks, ", ",
                geo.out_channels, ") or be None, but got shape ", bias->sizes());
    check_like_input(op, "bias", *bias, input);
  }
  return geo;
}

at::Tensor task_conv_forward(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  const TaskConvGeometry geo = check_task_conv("mamlpp_ext.task_conv", input, weight, bias, stride,
                                               padding, dilation, groups);
  std::optional<at::Tensor> b;
  if (given(bias)) b = bias->reshape({geo.tasks * geo.out_channels});
  const at::Tensor out = at::convolution(input, grouped_weight(weight), b, stride, padding,
                                         dilation, /*transposed=*/false, kNoOutputPadding,
                                         geo.total_groups());
  return out.contiguous(input.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> task_conv_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const char* op = "mamlpp_ext._task_conv_backward";
  const TaskConvGeometry geo =
      check_task_conv(op, input, weight, std::nullopt, stride, padding, dilation, groups);
  TORCH_CHECK(grad_out.defined(), op, ": expected grad_out to be a tensor, but got None");
  const int64_t out_channels = geo.tasks * geo.out_channels;
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == geo.batch &&
                  grad_out.size(1) == out_channels && grad_out.size(2) == geo.out_size[0] &&
                  grad_out.size(3) == geo.out_size[1],
              op, ": expected grad_out to have the shape of task_conv's output (", geo.batch, ", ",
              out_channels, ", ", geo.out_size[0], ", ", geo.out_size[1], "), but got shape ",
              grad_out.sizes());
  check_like_input(op, "grad_out", grad_out, input);
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {};
  const int64_t bias_sizes[1] = {out_channels};
  auto [grad_input, grad_weight, grad_bias] = at::convolution_backward(
      grad_out, input, grouped_weight(weight), c10::IntArrayRef(bias_sizes), stride, padding,
      dilation, /*transposed=*/false, kNoOutputPadding, geo.total_groups(), output_mask);
  // ATen may return outputs that were not asked for (the CPU's oneDNN path computes the weight
  // gradient with the bias gradient): the mask decides what is returned.
  grad_input = output_mask[0] ? grad_input.contiguous(input.suggest_memory_format()) : at::Tensor();
  // Splitting dim 0 is always a view; contiguous() then copies a channels_last result.
  grad_weight = output_mask[1] ? grad_weight.view(weight.sizes()).contiguous() : at::Tensor();
  grad_bias = output_mask[2] ? grad_bias.view({geo.tasks, geo.out_channels}) : at::Tensor();
  return {std::move(grad_input), std::move(grad_weight), std::move(grad_bias)};
}

}  // namespace mamlpp
