// Host-side helpers shared by the CPU and CUDA entry points of the tensor-list ops: argument
// validation (one place, one wording) and the "operand" view of a list input.
//
// NOTE [Task-broadcast operands]
// At inner step 0 the fast weights are the meta-parameters expanded over tasks,
// theta0.expand(T, ...): stride 0 in the task dimension. Kernels read such an operand in place
// (element i of the (T, ...) view is element i % row of the row), instead of materialising T
// copies. Any other non-contiguous input is made contiguous first. Outputs are always dense.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

namespace mamlpp {

// A list input as the kernels see it: a dense tensor, or a task-broadcast one whose
// `row` = numel / size(0) elements repeat size(0) times.
struct ListOperand {
  at::Tensor tensor;   // contiguous, or stride 0 in dim 0 with a contiguous row
  bool broadcast;      // true: read element i as tensor.data[i % row]
};

// Elements per task row of a (T, ...) tensor (numel for 0-d tensors).
int64_t task_row_numel(const at::Tensor& t);

// Classifies `t` as dense or task-broadcast; anything else becomes a contiguous copy.
ListOperand as_list_operand(const at::Tensor& t);

// Checks shared by the ops (each names the op and the argument in its message).
// `lrs` must be a 2-D (K, S) floating tensor with K == num_tensors, 0 <= step < S (when
// step >= 0 is given), of dtype `dtype` or float32, on `device`.
void check_rates(const char* op, const char* name, const at::Tensor& lrs, int64_t num_tensors,
                 int64_t step);

// Every tensor of `list` is defined, floating point, of one dtype, on lrs' device; returns that
// dtype (or lrs' dtype for an empty list).
c10::ScalarType check_tensor_list(const char* op, const char* name, at::TensorList list,
                                  const at::Tensor& lrs);

// a[k] and b[k] have one shape and dtype; the lists have one length.
void check_pairwise(const char* op, const char* name_a, at::TensorList a, const char* name_b,
                    at::TensorList b);

// lrs' dtype must equal the list dtype or be float32 (rates kept in full precision).
void check_rate_dtype(const char* op, const char* name, const at::Tensor& lrs,
                      c10::ScalarType list_dtype);

// as_list_operand over a whole list.
std::vector<ListOperand> as_list_operands(at::TensorList list);

// The complete argument checks of each LSLR op (one place for the CPU and CUDA entry points);
// each returns the dtype of the tensor lists.
c10::ScalarType check_lslr_update_args(at::TensorList params, at::TensorList grads,
                                       const at::Tensor& lrs, int64_t step);
c10::ScalarType check_lslr_scale_args(at::TensorList xs, const at::Tensor& lrs, int64_t step);
c10::ScalarType check_lslr_dot_args(at::TensorList xs, at::TensorList ys, const at::Tensor& like,
                                    int64_t step);

}  // namespace mamlpp
