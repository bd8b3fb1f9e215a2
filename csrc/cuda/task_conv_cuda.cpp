// CUDA registration of the task-batched convolution ops (task_conv, _task_conv_backward). The
// implementation is device-agnostic (csrc/task_conv.cpp: one grouped ATen convolution call per op,
// NOTE [Task-batched convolution] in mamlpp/task_conv.h); on CUDA, ATen runs it with cuDNN (which
// handles the T*groups groups in one call), on the current stream, with no host synchronisation,
// so it can be captured in a CUDA graph. Plain C++: no kernel of ours, so no nvcc.
#include <torch/library.h>

#include "mamlpp/task_conv.h"

namespace mamlpp {
namespace cuda {

at::Tensor task_conv_cuda(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  return task_conv_forward(input, weight, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> task_conv_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  return task_conv_backward(grad_out, input, weight, stride, padding, dilation, groups,
                            output_mask);
}

}  // namespace cuda
}  // namespace mamlpp

TORCH_LIBRARY_IMPL(mamlpp_ext, CUDA, m) {
  m.impl("task_conv", &mamlpp::cuda::task_conv_cuda);
  m.impl("_task_conv_backward", &mamlpp::cuda::task_conv_backward_cuda);
}
