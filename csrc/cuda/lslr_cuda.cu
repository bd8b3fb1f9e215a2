// CUDA kernels of the LSLR op family (lslr_update, _lslr_scale, _lslr_dot).
//
// lslr_update and _lslr_scale are one multi-tensor-apply launch each (multi_tensor_apply.cuh).
// _lslr_dot is two launches: per-(tensor, chunk) partial sums into a (K, max_chunks) workspace,
// then one block per tensor adds its row in a fixed order (deterministic, no float atomics).
// The rates lrs[k, step] are read inside the kernels: no host synchronisation anywhere.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "mamlpp/lslr.h"
#include "mamlpp/tensor_list.h"
#include "multi_tensor_apply.cuh"
#include "reduce.cuh"

namespace mamlpp {
namespace cuda {
namespace {

// Where a kernel finds lrs[k, step]: `base` is already offset by step * stride(1).
template <typename lr_t>
struct RateColumn {
  const lr_t* base;
  int64_t stride;
  template <typename opmath_t>
  __device__ __forceinline__ opmath_t load(int32_t k, double alpha) const {
    return static_cast<opmath_t>(alpha * static_cast<double>(base[k * stride]));
  }
};

template <typename lr_t>
RateColumn<lr_t> rate_column(const at::Tensor& lrs, int64_t step) {
  return {lrs.const_data_ptr<lr_t>() + step * lrs.stride(1), lrs.stride(0)};
}

__device__ __forceinline__ int64_t chunk_begin(int32_t chunk) {
  return static_cast<int64_t>(chunk) * kChunkSize;
}

// addresses[0]: out (dense), [1]: params, [2]: grads (each dense or task-broadcast).
// out = params - lrs[k, step] * grads.
template <typename scalar_t, typename lr_t>
struct LslrUpdateFunctor {
  __device__ __forceinline__ void operator()(const TensorListMetadata<3>& meta,
                                             RateColumn<lr_t> rates) const {
    using opmath_t = at::opmath_type<scalar_t>;
    const int t = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = chunk_begin(meta.block_to_chunk[blockIdx.x]);
    const int64_t end = ::min(meta.numel[t], begin + kChunkSize);
    auto* out = static_cast<scalar_t*>(meta.addresses[0][t]);
    const auto* p = static_cast<const scalar_t*>(meta.addresses[1][t]);
    const auto* g = static_cast<const scalar_t*>(meta.addresses[2][t]);
    const opmath_t lr = rates.template load<opmath_t>(meta.list_index[t], 1.0);
    const bool pb = meta.broadcast[1][t];
    const bool gb = meta.broadcast[2][t];
    if (!pb && !gb && is_aligned<kILP>(out) && is_aligned<kILP>(p) && is_aligned<kILP>(g)) {
      using Vec = AlignedVector<scalar_t, kILP>;
      for (int64_t i = begin + threadIdx.x * kILP; i < end; i += int64_t(blockDim.x) * kILP) {
        if (i + kILP <= end) {
          const Vec pv = *reinterpret_cast<const Vec*>(p + i);
          const Vec gv = *reinterpret_cast<const Vec*>(g + i);
          Vec ov;
#pragma unroll
          for (int j = 0; j < kILP; ++j) {
            ov.val[j] = static_cast<scalar_t>(lslr_update_op(
                static_cast<opmath_t>(pv.val[j]), static_cast<opmath_t>(gv.val[j]), lr));
          }
          *reinterpret_cast<Vec*>(out + i) = ov;
        } else {
          for (int64_t j = i; j < end; ++j) {
            out[j] = static_cast<scalar_t>(
                lslr_update_op(static_cast<opmath_t>(p[j]), static_cast<opmath_t>(g[j]), lr));
          }
        }
      }
    } else {
      const int64_t row = meta.row[t];
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const int64_t r = (pb || gb) ? i % row : i;
        out[i] = static_cast<scalar_t>(lslr_update_op(static_cast<opmath_t>(p[pb ? r : i]),
                                                      static_cast<opmath_t>(g[gb ? r : i]), lr));
      }
    }
  }
};

// addresses[0]: out (dense), [1]: xs (dense or task-broadcast). out = alpha * lrs[k, step] * xs.
template <typename scalar_t, typename lr_t>
struct LslrScaleFunctor {
  __device__ __forceinline__ void operator()(const TensorListMetadata<2>& meta,
                                             RateColumn<lr_t> rates, double alpha) const {
    using opmath_t = at::opmath_type<scalar_t>;
    const int t = meta.block_to_tensor[blockIdx.x];
    const int64_t begin = chunk_begin(meta.block_to_chunk[blockIdx.x]);
    const int64_t end = ::min(meta.numel[t], begin + kChunkSize);
    auto* out = static_cast<scalar_t*>(meta.addresses[0][t]);
    const auto* x = static_cast<const scalar_t*>(meta.addresses[1][t]);
    const opmath_t c = rates.template load<opmath_t>(meta.list_index[t], alpha);
    const bool xb = meta.broadcast[1][t];
    if (!xb && is_aligned<kILP>(out) && is_aligned<kILP>(x)) {
      using Vec = AlignedVector<scalar_t, kILP>;
      for (int64_t i = begin + threadIdx.x * kILP; i < end; i += int64_t(blockDim.x) * kILP) {
        if (i + kILP <= end) {
          const Vec xv = *reinterpret_cast<const Vec*>(x + i);
          Vec ov;
#pragma unroll
          for (int j = 0; j < kILP; ++j) {
            ov.val[j] = static_cast<scalar_t>(lslr_scale_op(static_cast<opmath_t>(xv.val[j]), c));
          }
          *reinterpret_cast<Vec*>(out + i) = ov;
        } else {
          for (int64_t j = i; j < end; ++j) {
            out[j] = static_cast<scalar_t>(lslr_scale_op(static_cast<opmath_t>(x[j]), c));
          }
        }
      }
    } else {
      const int64_t row = meta.row[t];
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        out[i] = static_cast<scalar_t>(lslr_scale_op(static_cast<opmath_t>(x[xb ? i % row : i]), c));
      }
    }
  }
};

// addresses[0]: xs, [1]: ys (each dense or task-broadcast). Writes the block's sum of x * y to
// partial[k * max_chunks + chunk]. Every thread accumulates in float64, as the CPU kernel does: a
// float32 running sum over a thread's share of a chunk lost ~3e-5 relative accuracy on the
// rates' gradient (a sum of ~300k products; measured on an H100). The kernel is memory-bound,
// so the float64 adds should be cheap on GPUs with full-rate FP64; not yet timed on one.
template <typename scalar_t>
struct LslrDotPartialFunctor {
  __device__ __forceinline__ void operator()(const TensorListMetadata<2>& meta, double* partial,
                                             int64_t max_chunks) const {
    __shared__ double shared[kWarpSize];
    const int t = meta.block_to_tensor[blockIdx.x];
    const int32_t chunk = meta.block_to_chunk[blockIdx.x];
    const int64_t begin = chunk_begin(chunk);
    const int64_t end = ::min(meta.numel[t], begin + kChunkSize);
    const auto* x = static_cast<const scalar_t*>(meta.addresses[0][t]);
    const auto* y = static_cast<const scalar_t*>(meta.addresses[1][t]);
    const bool xb = meta.broadcast[0][t];
    const bool yb = meta.broadcast[1][t];
    double acc = 0;
    if (!xb && !yb && is_aligned<kILP>(x) && is_aligned<kILP>(y)) {
      using Vec = AlignedVector<scalar_t, kILP>;
      for (int64_t i = begin + threadIdx.x * kILP; i < end; i += int64_t(blockDim.x) * kILP) {
        if (i + kILP <= end) {
          const Vec xv = *reinterpret_cast<const Vec*>(x + i);
          const Vec yv = *reinterpret_cast<const Vec*>(y + i);
#pragma unroll
          for (int j = 0; j < kILP; ++j) {
            acc = lslr_dot_op(acc, static_cast<double>(xv.val[j]), static_cast<double>(yv.val[j]));
          }
        } else {
          for (int64_t j = i; j < end; ++j) {
            acc = lslr_dot_op(acc, static_cast<double>(x[j]), static_cast<double>(y[j]));
          }
        }
      }
    } else {
      const int64_t row = meta.row[t];
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const int64_t r = (xb || yb) ? i % row : i;
        acc = lslr_dot_op(acc, static_cast<double>(x[xb ? r : i]), static_cast<double>(y[yb ? r : i]));
      }
    }
    const double total = block_sum<double>(acc, shared);
    if (threadIdx.x == 0) {
      partial[static_cast<int64_t>(meta.list_index[t]) * max_chunks + chunk] = total;
    }
  }
};

constexpr int kFinalizeThreads = 256;

// One block per tensor k: out[k, step] = alpha * sum_j partial[k, j], in a fixed order.
template <typename out_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    lslr_dot_finalize_kernel(const double* partial, int64_t max_chunks, out_t* out,
                             int64_t out_stride0, int64_t step_offset, double alpha) {
  __shared__ double shared[kWarpSize];
  const int64_t k = blockIdx.x;
  double acc = 0;
  for (int64_t j = threadIdx.x; j < max_chunks; j += blockDim.x) acc += partial[k * max_chunks + j];
  const double total = block_sum<double>(acc, shared);
  if (threadIdx.x == 0) out[k * out_stride0 + step_offset] = static_cast<out_t>(alpha * total);
}

}  // namespace

std::vector<at::Tensor> lslr_update_cuda(at::TensorList params, at::TensorList grads,
                                         const at::Tensor& lrs, int64_t step) {
  const auto dtype = check_lslr_update_args(params, grads, lrs, step);
  const c10::cuda::CUDAGuard guard(lrs.device());

  const auto p_ops = as_list_operands(params);
  const auto g_ops = as_list_operands(grads);
  std::vector<at::Tensor> outs;
  std::vector<ListEntry<3>> entries;
  outs.reserve(params.size());
  entries.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    outs.push_back(at::empty(params[k].sizes(), params[k].options()));
    ListEntry<3> e{};
    e.ptr[0] = outs.back().mutable_data_ptr();
    e.ptr[1] = const_cast<void*>(p_ops[k].tensor.const_data_ptr());
    e.ptr[2] = const_cast<void*>(g_ops[k].tensor.const_data_ptr());
    e.broadcast[0] = false;
    e.broadcast[1] = p_ops[k].broadcast;
    e.broadcast[2] = g_ops[k].broadcast;
    e.numel = params[k].numel();
    e.row = task_row_numel(params[k]);
    e.index = static_cast<int32_t>(k);
    entries.push_back(e);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lslr_update_cuda", [&] {
    if (lrs.scalar_type() == dtype) {
      multi_tensor_apply<3>(entries, LslrUpdateFunctor<scalar_t, scalar_t>(),
                            rate_column<scalar_t>(lrs, step));
    } else {
      multi_tensor_apply<3>(entries, LslrUpdateFunctor<scalar_t, float>(),
                            rate_column<float>(lrs, step));
    }
  });
  return outs;
}

std::vector<at::Tensor> lslr_scale_cuda(at::TensorList xs, const at::Tensor& lrs, int64_t step,
                                        double alpha) {
  const auto dtype = check_lslr_scale_args(xs, lrs, step);
  const c10::cuda::CUDAGuard guard(lrs.device());

  const auto x_ops = as_list_operands(xs);
  std::vector<at::Tensor> outs;
  std::vector<ListEntry<2>> entries;
  outs.reserve(xs.size());
  entries.reserve(xs.size());
  for (size_t k = 0; k < xs.size(); ++k) {
    outs.push_back(at::empty(xs[k].sizes(), xs[k].options()));
    ListEntry<2> e{};
    e.ptr[0] = outs.back().mutable_data_ptr();
    e.ptr[1] = const_cast<void*>(x_ops[k].tensor.const_data_ptr());
    e.broadcast[0] = false;
    e.broadcast[1] = x_ops[k].broadcast;
    e.numel = xs[k].numel();
    e.row = task_row_numel(xs[k]);
    e.index = static_cast<int32_t>(k);
    entries.push_back(e);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lslr_scale_cuda", [&] {
    if (lrs.scalar_type() == dtype) {
      multi_tensor_apply<2>(entries, LslrScaleFunctor<scalar_t, scalar_t>(),
                            rate_column<scalar_t>(lrs, step), alpha);
    } else {
      multi_tensor_apply<2>(entries, LslrScaleFunctor<scalar_t, float>(),
                            rate_column<float>(lrs, step), alpha);
    }
  });
  return outs;
}

at::Tensor lslr_dot_cuda(at::TensorList xs, at::TensorList ys, const at::Tensor& like,
                         int64_t step, double alpha) {
  const auto dtype = check_lslr_dot_args(xs, ys, like, step);
  const c10::cuda::CUDAGuard guard(like.device());

  at::Tensor out = at::zeros(like.sizes(), like.options());
  const int64_t K = static_cast<int64_t>(xs.size());
  if (K == 0) return out;
  const auto x_ops = as_list_operands(xs);
  const auto y_ops = as_list_operands(ys);
  int64_t max_chunks = 1;
  std::vector<ListEntry<2>> entries;
  entries.reserve(K);
  for (int64_t k = 0; k < K; ++k) {
    max_chunks = std::max(max_chunks, (xs[k].numel() + kChunkSize - 1) / kChunkSize);
    ListEntry<2> e{};
    e.ptr[0] = const_cast<void*>(x_ops[k].tensor.const_data_ptr());
    e.ptr[1] = const_cast<void*>(y_ops[k].tensor.const_data_ptr());
    e.broadcast[0] = x_ops[k].broadcast;
    e.broadcast[1] = y_ops[k].broadcast;
    e.numel = xs[k].numel();
    e.row = task_row_numel(xs[k]);
    e.index = static_cast<int32_t>(k);
    entries.push_back(e);
  }
  // Workspace sized by shapes only (never by data): capture-safe. Empty tensors keep zero rows.
  at::Tensor partial = at::zeros({K, max_chunks}, like.options().dtype(at::kDouble));
  double* partial_ptr = partial.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lslr_dot_cuda", [&] {
    multi_tensor_apply<2>(entries, LslrDotPartialFunctor<scalar_t>(), partial_ptr, max_chunks);
  });
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lslr_dot_finalize", [&] {
    lslr_dot_finalize_kernel<scalar_t><<<K, kFinalizeThreads, 0, stream>>>(
        partial_ptr, max_chunks, out.mutable_data_ptr<scalar_t>(), out.stride(0),
        step * out.stride(1), alpha);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace mamlpp

TORCH_LIBRARY_IMPL(mamlpp_ext, CUDA, m) {
  m.impl("lslr_update", &mamlpp::cuda::lslr_update_cuda);
  m.impl("_lslr_scale", &mamlpp::cuda::lslr_scale_cuda);
  m.impl("_lslr_dot", &mamlpp::cuda::lslr_dot_cuda);
}
