// The task-batched convolution ops (task_conv, _task_conv_backward): argument checks and the
// device-agnostic implementation shared by the CPU and CUDA entry points (csrc/task_conv.cpp).
//
// NOTE [Task-batched convolution]
// T tasks' convolutions run as one grouped convolution over the task-major layout:
//   input   (N, T*C_in, H, W)               channel t*C_in + c is channel c of task t
//   weight  (T, C_out, C_in/groups, kh, kw)  task t's weight
//   bias    (T, C_out) or None
//   output  (N, T*C_out, H', W')             channel t*C_out + o is output channel o of task t
// with the layer's own stride, padding, dilation and groups; the grouped convolution has
// T*groups groups (task t's group g is group t*groups + g: the task's channels are consecutive,
// and within them the layer's groups are too, as in F.conv2d). H' = (H + 2*padding - dilation*
// (kh-1) - 1) / stride + 1 (floor), likewise W'.
//
// Every derivative is again one grouped convolution call, whatever T and groups:
//   task_conv            --backward-->  _task_conv_backward  (at::convolution_backward)
//   _task_conv_backward  --backward-->  task_conv and _task_conv_backward (below)
// For the vector-Jacobian product of _task_conv_backward = (gI, gW, gb)(gO, I, W) with upstream
// (ggI, ggW, ggb): gI is linear in (gO, W), gW in (gO, I), gb = sum of gO, so
//   grad gO = task_conv(ggI, W, ggb) + task_conv(I, ggW)          (the forward applied to them)
//   grad I  = _task_conv_backward(gO, I, ggW, mask {1,0,0}).gI    (the input term of conv(I, ggW))
//   grad W  = _task_conv_backward(gO, ggI, W, mask {0,1,0}).gW    (the weight term of conv(ggI, W))
// Both are calls of our own ops through the dispatcher, so with create_graph they record their
// own nodes and the next order is the same formulas again: no order falls back to ATen's
// _convolution_double_backward, which computes the weight term group by group (one convolution
// per task and group, plus slicing and concatenation). Autograd: csrc/autograd/task_conv_autograd.cpp.
//
// Layout: the output (and grad_input) takes the input's suggested memory format (contiguous or
// channels_last); weights and their gradients are contiguous. The arithmetic, the algorithms and
// their determinism are ATen's convolution's on each device (oneDNN / native kernels on the CPU,
// cuDNN on CUDA); these ops add reshapes only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace mamlpp {

// The shape of one task-batched convolution, from validated arguments.
struct TaskConvGeometry {
  int64_t batch = 0;         // N
  int64_t tasks = 0;         // T
  int64_t in_channels = 0;   // C_in (per task)
  int64_t out_channels = 0;  // C_out (per task)
  int64_t groups = 1;        // the layer's own groups
  std::array<int64_t, 2> out_size{};  // H', W'
  int64_t total_groups() const { return tasks * groups; }
};

// Checks the arguments of task_conv (bias may be nullopt) and returns the geometry; every message
// names `op` and the argument.
TaskConvGeometry check_task_conv(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                 int64_t groups);

// task_conv: see NOTE [Task-batched convolution].
at::Tensor task_conv_forward(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups);

// _task_conv_backward: (grad_input, grad_weight, grad_bias) of task_conv for the upstream
// gradient grad_out; output i is computed when output_mask[i], else undefined. grad_input reads
// input's shape only, grad_weight weight's shape only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> task_conv_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask);

}  // namespace mamlpp
