// Every operator schema of mamlpp_ext, in one TORCH_LIBRARY block, with its semantics.
// Kernels live per device (csrc/cpu, csrc/cuda) and register in TORCH_LIBRARY_IMPL blocks there;
// fake kernels and autograd formulas are registered from Python (mamlpp_ext/ops.py); the
// pure-PyTorch twin of each op is in mamlpp_ext/reference.py.
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
  //   Differentiable w.r.t. params, grads and lrs to any order (see NOTE [LSLR op family]).
  m.def("lslr_update(Tensor[] params, Tensor[] grads, Tensor lrs, int step) -> Tensor[]");
  // _lslr_scale: [alpha * lrs[k, step] * xs[k]]; the derivative of lslr_update w.r.t. grads.
  m.def("_lslr_scale(Tensor[] xs, Tensor lrs, int step, float alpha) -> Tensor[]");
  // _lslr_dot: a tensor shaped and typed like `like` (K, S), zero except column `step`, where
  //   row k is alpha * sum(xs[k] * ys[k]) (accumulated in float64 on CPU, opmath on CUDA, in a
  //   fixed order: deterministic). Only like's shape, dtype and device are read. The derivative
  //   of lslr_update w.r.t. lrs.
  m.def("_lslr_dot(Tensor[] xs, Tensor[] ys, Tensor like, int step, float alpha) -> Tensor");
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
