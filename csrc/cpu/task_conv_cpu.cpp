// CPU registration of the task-batched convolution ops (task_conv, _task_conv_backward). The
// implementation is device-agnostic (csrc/task_conv.cpp: one grouped ATen convolution call per op,
// NOTE [Task-batched convolution] in mamlpp/task_conv.h). On the CPU, ATen runs float32 (and the
// half types on CPUs with oneDNN support for them) as one oneDNN grouped convolution; its native
// kernel, which float64 uses (and float16/bfloat16 on CPUs without that support, such as the
// 2-core development machine), loops over the T*groups groups inside the one call (im2col + GEMM
// per group). Either way one call per op reaches ATen, and the count does not grow with T.
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
