// CPU registration of the task-batched convolution ops (task_conv, _task_conv_backward). The
// implementation is device-agnostic (csrc/task_conv.cpp: one grouped ATen convolution call per op,
// NOTE [Task-batched convolution] in mamlpp/task_conv.h); on the CPU, ATen runs it with oneDNN
// where it applies (float32, bfloat16, float16) and with its native kernels otherwise (float64).
#include <torch/library.h>

#include "mamlpp/task_conv.h"

namespace mamlpp {
namespace cpu {

at::Tensor task_conv_cpu(const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                         c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  return task_conv_forward(input, weight, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> task_conv_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  return task_conv_backward(grad_out, input, weight, stride, padding, dilation, groups,
                            output_mask);
}

}  // namespace cpu
}  // namespace mamlpp

TORCH_LIBRARY_IMPL(mamlpp_ext, CPU, m) {
  m.impl("task_conv", &mamlpp::cpu::task_conv_cpu);
  m.impl("_task_conv_backward", &mamlpp::cpu::task_conv_backward_cpu);
}
