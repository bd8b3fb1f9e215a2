// Argument validation and operand classification for the tensor-list ops, shared by the CPU and
// CUDA entry points so that both reject the same inputs with the same words.
#include "mamlpp/tensor_list.h"

#include <c10/util/Exception.h>

namespace mamlpp {

int64_t task_row_numel(const at::Tensor& t) {
  if (t.dim() == 0) {
    return 1;
  }
  const int64_t tasks = t.size(0);
  return tasks == 0 ? 0 : t.numel() / tasks;
}

ListOperand as_list_operand(const at::Tensor& t) {
  if (t.is_contiguous()) {
    return {t, false};
  }
  if (t.dim() >= 1 && t.size(0) > 1 && t.stride(0) == 0 && t.select(0, 0).is_contiguous()) {
    return {t, true};
  }
  return {t.contiguous(), false};
}

void check_rates(const char* op, const char* name, const at::Tensor& lrs, int64_t num_tensors,
                 int64_t step) {
  TORCH_CHECK(lrs.defined(), op, ": expected ", name, " to be a (K, S) tensor, but got None");
  TORCH_CHECK(at::isFloatingType(lrs.scalar_type()), op, ": expected ", name,
              " to be a floating-point tensor, but got dtype ", lrs.scalar_type());
  TORCH_CHECK(lrs.dim() == 2, op, ": expected ", name,
              " to be a 2-D (K, S) tensor (one rate per tensor and step), but got shape ",
              lrs.sizes());
  TORCH_CHECK(lrs.size(0) == num_tensors, op, ": expected ", name, ".size(0) == ", num_tensors,
              " (one row per tensor of the list), but got shape ", lrs.sizes());
  TORCH_CHECK(step >= 0 && step < lrs.size(1), op, ": expected step in [0, ", lrs.size(1),
              ") (the number of columns of ", name, "), but got step=", step);
}

c10::ScalarType check_tensor_list(const char* op, const char* name, at::TensorList list,
                                  const at::Tensor& lrs) {
  if (list.empty()) {
    return lrs.scalar_type();
  }
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  for (size_t k = 0; k < list.size(); ++k) {
    const at::Tensor& t = list[k];
    TORCH_CHECK(t.defined(), op, ": expected ", name, "[", k, "] to be a tensor, but got None");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name, "[", k,
                "] to be a floating-point tensor (float32, float64, float16 or bfloat16), but got "
                "dtype ",
                t.scalar_type());
    if (k == 0) {
      dtype = t.scalar_type();
    }
    TORCH_CHECK(t.scalar_type() == dtype, op, ": expected every tensor of ", name,
                " to have one dtype, but ", name, "[0] is ", dtype, " and ", name, "[", k, "] is ",
                t.scalar_type());
    TORCH_CHECK(t.device() == lrs.device(), op, ": expected ", name, "[", k,
                "] to be on the device of the rates (", lrs.device(), "), but it is on ",
                t.device());
  }
  return dtype;
}

void check_pairwise(const char* op, const char* name_a, at::TensorList a, const char* name_b,
                    at::TensorList b) {
  TORCH_CHECK(a.size() == b.size(), op, ": expected ", name_a, " and ", name_b,
              " to have the same length, but got ", a.size(), " and ", b.size());
  for (size_t k = 0; k < a.size(); ++k) {
    TORCH_CHECK(a[k].sizes() == b[k].sizes(), op, ": expected ", name_b, "[", k,
                "] to have the shape of ", name_a, "[", k, "] ", a[k].sizes(), ", but got ",
                b[k].sizes());
    TORCH_CHECK(a[k].scalar_type() == b[k].scalar_type(), op, ": expected ", name_b, "[", k,
                "] to have the dtype of ", name_a, "[", k, "] (", a[k].scalar_type(),
                "), but got ", b[k].scalar_type());
  }
}

void check_rate_dtype(const char* op, const char* name, const at::Tensor& lrs,
                      c10::ScalarType list_dtype) {
  TORCH_CHECK(lrs.scalar_type() == list_dtype || lrs.scalar_type() == at::kFloat, op,
              ": expected ", name, " to have the dtype of the tensors (", list_dtype,
              ") or float32, but got ", lrs.scalar_type());
}

std::vector<ListOperand> as_list_operands(at::TensorList list) {
  std::vector<ListOperand> ops;
  ops.reserve(list.size());
  for (const auto& t : list) ops.push_back(as_list_operand(t));
  return ops;
}

c10::ScalarType check_lslr_update_args(at::TensorList params, at::TensorList grads,
                                       const at::Tensor& lrs, int64_t step) {
  constexpr const char* op = "mamlpp_ext.lslr_update";
  check_pairwise(op, "params", params, "grads", grads);
  check_rates(op, "lrs", lrs, static_cast<int64_t>(params.size()), step);
  const auto dtype = check_tensor_list(op, "params", params, lrs);
  check_tensor_list(op, "grads", grads, lrs);
  check_rate_dtype(op, "lrs", lrs, dtype);
  return dtype;
}

c10::ScalarType check_lslr_scale_args(at::TensorList xs, const at::Tensor& lrs, int64_t step) {
  constexpr const char* op = "mamlpp_ext._lslr_scale";
  check_rates(op, "lrs", lrs, static_cast<int64_t>(xs.size()), step);
  const auto dtype = check_tensor_list(op, "xs", xs, lrs);
  check_rate_dtype(op, "lrs", lrs, dtype);
  return dtype;
}

c10::ScalarType check_lslr_dot_args(at::TensorList xs, at::TensorList ys, const at::Tensor& like,
                                    int64_t step) {
  constexpr const char* op = "mamlpp_ext._lslr_dot";
  check_pairwise(op, "xs", xs, "ys", ys);
  check_rates(op, "like", like, static_cast<int64_t>(xs.size()), step);
  const auto dtype = check_tensor_list(op, "xs", xs, like);
  check_tensor_list(op, "ys", ys, like);
  check_rate_dtype(op, "like", like, dtype);
  return dtype;
}

}  // namespace mamlpp
