// Every operator schema of mamlpp_ext, in one TORCH_LIBRARY block, with its semantics.
// Kernels live per device (csrc/cpu, csrc/cuda; device-agnostic ones in csrc/*.cpp, registered from
// the device folders) and register in TORCH_LIBRARY_IMPL blocks there;
// fake kernels are registered from Python (mamlpp_ext/ops/); autograd kernels in C++ at the
// Autograd key (csrc/autograd/; the LSLR family's in lslr_autograd.cpp) or from Python
// (mamlpp_ext/ops/); the pure-PyTorch twin of each op is in mamlpp_ext/ops/reference.py.
#include <Python.h>
#include <torch/library.h>

#include <cstdint>

#ifdef MAMLPP_WITH_CUDA
namespace mamlpp {
int64_t cuda_runtime_version();  // csrc/cuda/build_info.cu
}
#endif

namespace mamlpp {
namespace {

// CUDA runtime version the kernels were compiled against (e.g. 13000), or -1 without CUDA.
int64_t cuda_version() {
#ifdef MAMLPP_WITH_CUDA
  return cuda_runtime_version();
#else
  return -1;
#endif
}

}  // namespace
}  // namespace mamlpp

TORCH_LIBRARY(mamlpp_ext, m) {
  // lslr_update: the MAML++ inner-loop step with learned per-layer, per-step rates (LSLR).
  //   params[k], grads[k]: (T, *shape_k), one dtype (float32/64, float16, bfloat16), one device;
  //     params[k] may be task-broadcast (theta0[k].expand(T, ...), stride 0 in dim 0).
  //   lrs: (K, S) rates, dtype of params or float32; 0 <= step < S.
  //   returns K new dense tensors: params[k] - lrs[k, step] * grads[k] (arithmetic in opmath).
  //   Differentiable w.r.t. params, grads and lrs to any order (see NOTE [LSLR op family]);
  //   autograd of the family: csrc/autograd/lslr_autograd.cpp.
  m.def("lslr_update(Tensor[] params, Tensor[] grads, Tensor lrs, int step) -> Tensor[]");
  // _lslr_scale: [alpha * lrs[k, step] * xs[k]]; the derivative of lslr_update w.r.t. grads.
  m.def("_lslr_scale(Tensor[] xs, Tensor lrs, int step, float alpha) -> Tensor[]");
  // _lslr_dot: a tensor shaped and typed like `like` (K, S), zero except column `step`, where
  //   row k is alpha * sum(xs[k] * ys[k]) (accumulated in float64 on both devices, in a
  //   fixed order: deterministic). Only like's shape, dtype and device are read. The derivative
  //   of lslr_update w.r.t. lrs.
  m.def("_lslr_dot(Tensor[] xs, Tensor[] ys, Tensor like, int step, float alpha) -> Tensor");
  // ---- Per-step batch norm of task-batched activations (NOTE [Task-batched batch norm] in
  // include/mamlpp/batch_norm.h). input: (N, T*C) or (N, T*C, H, W), channel t*C + c = channel c
  // of task t; any memory layout (channels_last and other strided inputs are read through a
  // contiguous copy); outputs are contiguous. weight/bias: both None, both (C,) (shared by the
  // tasks: the caller passes row `step` of the (S, C) BNWB tables) or both (T, C) (per task).
  // Statistics are float32 (float64 for float64 input); reductions are deterministic. Autograd of
  // the family: csrc/autograd/batch_norm_autograd.cpp (_batch_norm_double_backward's in Python,
  // mamlpp_ext/ops/batch_norm.py).
  //
  // negative_slope (forwards): None, no activation; a finite a >= 0, out is the fused
  //   LeakyReLU_a(bn(x)) = (z > 0 ? z : a * z) (a = 0: ReLU). a < 0 is rejected: the backward
  //   ops read the slope from the sign of the saved output, which is right only for a >= 0.
  //
  // batch_norm: training mode. Returns (out, mean, var): out like input; mean and var (T*C,) the
  //   per-(task, channel) batch mean and biased variance over (N, H, W). Differentiable w.r.t.
  //   input, weight, bias to any order (mean and var are not differentiable outputs). Needs more
  //   than one element per group unless N == 0.
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, int tasks, float eps, "
      "float? negative_slope) -> (Tensor, Tensor, Tensor)");
  // batch_norm_eval: evaluation mode; normalises every task with row `step` of the (S, C)
  //   running statistics (dtype of input or float32), which are read, never written.
  //   Differentiable w.r.t. input, weight, bias to any order.
  m.def(
      "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, int tasks, int step, float eps, float? negative_slope) -> Tensor");
  // batch_norm_update_stats_: in place, row `step` of the (S, C) running statistics becomes
  //   (1 - momentum) * old + momentum * (mean over tasks of the batch mean, resp. of the
  //   unbiased batch variance var * count / (count - 1)); mean, var: (T*C,) from batch_norm;
  //   count: elements per group (N*H*W). count == 0 leaves the statistics unchanged. Not
  //   differentiable.
  m.def(
      "batch_norm_update_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
      "Tensor var, int tasks, int step, int count, float momentum) -> ()");
  // _batch_norm_backward: (grad_input, grad_weight, grad_bias) of batch_norm (training=True;
  //   mean, var: its (T*C,) batch statistics; step unused) or batch_norm_eval (training=False;
  //   mean, var: the (S, C) running statistics, row `step`). out: the forward's output when the
  //   activation is fused (its sign selects the slope: 1 where out > 0, else negative_slope),
  //   else None; negative_slope is read only when out is given. grad_weight and grad_bias have
  //   weight's shape ((C,) when weight is None: then they are the sums for a unit affine).
  //   Differentiable w.r.t. grad_out, input and weight (to any order, see
  //   _batch_norm_double_backward); mean, var and out are treated as constants whose dependence
  //   on input is in the closed-form formulas (ATen's design).
  m.def(
      "_batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? out, "
      "Tensor mean, Tensor var, int tasks, int step, bool training, float eps, "
      "float negative_slope) -> (Tensor, Tensor, Tensor)");
  // _batch_norm_double_backward: the vector-Jacobian product of _batch_norm_backward with the
  //   upstream gradients of its outputs (grad_grad_input like input, grad_grad_weight and
  //   grad_grad_bias like weight or (C,); None means zero). Returns (grad_grad_out,
  //   grad_input, grad_weight): like input, like input, and weight's shape ((C,) without weight).
  //   Differentiable (third order) by differentiating its pure-PyTorch twin
  //   (mamlpp_ext/ops/reference.py), not fused.
  m.def(
      "_batch_norm_double_backward(Tensor? grad_grad_input, Tensor? grad_grad_weight, "
      "Tensor? grad_grad_bias, Tensor grad_out, Tensor input, Tensor? weight, Tensor? out, "
      "Tensor mean, Tensor var, int tasks, int step, bool training, float eps, "
      "float negative_slope) -> (Tensor, Tensor, Tensor)");
  // ---- Task-batched convolution (NOTE [Task-batched convolution] in include/mamlpp/task_conv.h):
  // T tasks' 2-D convolutions as one grouped convolution (T*groups groups) over the task-major
  // layout. Kernels: one device-agnostic implementation (csrc/task_conv.cpp) registered for CPU
  // and CUDA; autograd: csrc/autograd/task_conv_autograd.cpp; twin: reference.task_conv.
  //
  // task_conv: input (N, T*C_in, H, W), channel t*C_in + c = channel c of task t; weight
  //   (T, C_out, C_in/groups, kh, kw); bias (T, C_out) or None; one dtype (float32/64, float16,
  //   bfloat16) and one device. stride >= 1, padding >= 0, dilation >= 1 (one int or a
  //   (height, width) pair), groups >= 1 dividing C_out: the layer's own, as in F.conv2d.
  //   Returns (N, T*C_out, H', W') in input's suggested memory format: output channel
  //   t*C_out + o is F.conv2d(task t's channels, weight[t], bias[t], ...)'s channel o.
  //   Differentiable w.r.t. input, weight and bias to any order; every order is grouped
  //   convolution calls of these two ops (no loop over tasks or groups).
  m.def(
      "task_conv(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, "
      "int[2] padding=0, int[2] dilation=1, int groups=1) -> Tensor");
  // _task_conv_backward: (grad_input, grad_weight, grad_bias) of task_conv for grad_out (its
  //   output's shape), shaped like input, weight and (T, C_out); output i is computed when
  //   output_mask[i], else None. grad_input reads only input's shape (and grad_out, weight),
  //   grad_weight only weight's shape (and grad_out, input). Differentiable w.r.t. grad_out,
  //   input and weight to any order, by task_conv and _task_conv_backward again.
  m.def(
      "_task_conv_backward(Tensor grad_out, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) -> "
      "(Tensor, Tensor, Tensor)");
  // _cuda_version: CUDA runtime version of the compiled CUDA kernels, -1 when built without.
  m.def("_cuda_version() -> int", &mamlpp::cuda_version);
}

// A Python extension module with no Python-level functions: importing mamlpp_ext._C runs the
// static registrations above and in the kernel files.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mamlpp_ext operators (registered in torch.ops.mamlpp_ext)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
