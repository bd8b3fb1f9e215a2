// Host-side argument validation of the batch norm ops, shared by the CPU and CUDA entry points so
// that both reject the same inputs with the same words (each message names the op and the
// argument). See NOTE [Task-batched batch norm] in mamlpp/batch_norm.h for the semantics.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace mamlpp {

// How a (N, T*C, *spatial) input splits into groups: element (n, g, k) of the contiguous input
// is at (n * groups + g) * inner + k.
struct BnGeometry {
  int64_t batch = 0;     // N
  int64_t tasks = 0;     // T
  int64_t channels = 0;  // C
  int64_t groups = 0;    // G = T * C
  int64_t inner = 1;     // prod(spatial); 1 for a 2-D input
  int64_t count() const { return batch * inner; }  // M: elements per group
};

// input: 2-D (N, T*C) or 4-D (N, T*C, H, W), floating point; tasks >= 1 divides T*C.
BnGeometry check_bn_input(const char* op, const at::Tensor& input, int64_t tasks);

// weight and bias: both None, or both of shape (C,) (shared by the tasks) or (T, C) (per
// task), with the dtype and device of input.
void check_bn_affine(const char* op, const BnGeometry& geo, const at::Tensor& input,
                     const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias);

// `t` has the shape, dtype and device of input.
void check_bn_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input);

// Running statistics table: 2-D (S, C), floating point of input's dtype or float32, on input's
// device, 0 <= step < S.
void check_bn_running_stats(const char* op, const char* name, const at::Tensor& t,
                            const BnGeometry& geo, const at::Tensor& input, int64_t step);

// Batch statistics of a training forward: 1-D (T*C,), of the opmath dtype of input (float32,
// float64 for float64 input), on input's device.
void check_bn_batch_stats(const char* op, const char* name, const at::Tensor& t,
                          const BnGeometry& geo, const at::Tensor& input);

// The statistics argument pair of the backward ops: batch statistics when training, running
// statistics (with step) otherwise.
void check_bn_stats(const char* op, bool training, const at::Tensor& mean, const at::Tensor& var,
                    const BnGeometry& geo, const at::Tensor& input, int64_t step);

// Negative slope of the fused activation: finite and >= 0 (the backward ops read the slope from
// the sign of the saved output, which is only right for a >= 0). nullopt (no activation) passes.
void check_bn_negative_slope(const char* op, const std::optional<double>& negative_slope);

// Shape of the affine gradients: weight's shape, or (C,) without affine.
std::vector<int64_t> bn_affine_shape(const BnGeometry& geo,
                                     const std::optional<at::Tensor>& weight);

// Statistics as the kernels read them: a contiguous tensor of the opmath dtype of input,
// element [row * K + g % K] (K = its last size) for group g.
at::Tensor bn_stats_operand(const at::Tensor& stats, const at::Tensor& input);

// Arguments of batch_norm_update_stats_.
void check_bn_update_stats(const char* op, const at::Tensor& running_mean,
                           const at::Tensor& running_var, const at::Tensor& mean,
                           const at::Tensor& var, int64_t tasks, int64_t step, int64_t count);

}  // namespace mamlpp

namespace mamlpp {

// Training mode needs more than one element per (task, channel) group (or none at all): the
// unbiased variance of the running statistics is undefined for one value (ATen's rule).
void check_bn_training_count(const char* op, const BnGeometry& geo, const at::Tensor& input);

}  // namespace mamlpp
