// CPU kernels of the LSLR op family (lslr_update, _lslr_scale, _lslr_dot).
//
// The whole tensor list is cut into blocks of kBlockSize elements and the blocks run in one
// at::parallel_for, so one call does one parallel pass over the memory, however many tensors the
// list holds. Inner loops are plain contiguous loops over `opmath` values; for float32/float64
// they are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC/Clang
// target_clones), so the wheel runs on any x86-64 CPU. Task-broadcast operands (NOTE
// [Task-broadcast operands]) are walked row by row, never copied.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "mamlpp/lslr.h"
#include "mamlpp/tensor_list.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MAMLPP_NO_CLONES)
#define MAMLPP_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define MAMLPP_CLONES
#endif

namespace mamlpp {
namespace cpu {

constexpr int64_t kBlockSize = 16384;        // elements per parallel work item
constexpr int64_t kSerialThreshold = 32768;  // below this many elements in all, stay on one thread

// ---- inner loops (contiguous, n elements) -------------------------------------------------

MAMLPP_CLONES void update_loop_f32(float* __restrict out, const float* __restrict p,
                                   const float* __restrict g, float lr, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = lslr_update_op(p[i], g[i], lr);
}
MAMLPP_CLONES void update_loop_f64(double* __restrict out, const double* __restrict p,
                                   const double* __restrict g, double lr, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = lslr_update_op(p[i], g[i], lr);
}
MAMLPP_CLONES void scale_loop_f32(float* __restrict out, const float* __restrict x, float c,
                                  int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = lslr_scale_op(x[i], c);
}
MAMLPP_CLONES void scale_loop_f64(double* __restrict out, const double* __restrict x, double c,
                                  int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = lslr_scale_op(x[i], c);
}
// Eight independent float64 accumulators: vectorisable without reassociating one sum.
MAMLPP_CLONES double dot_loop_f32(const float* __restrict x, const float* __restrict y,
                                  int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] = lslr_dot_op<double>(acc[j], x[i + j], y[i + j]);
  }
  for (; i < n; ++i) acc[0] = lslr_dot_op<double>(acc[0], x[i], y[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}
MAMLPP_CLONES double dot_loop_f64(const double* __restrict x, const double* __restrict y,
                                  int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] = lslr_dot_op<double>(acc[j], x[i + j], y[i + j]);
  }
  for (; i < n; ++i) acc[0] = lslr_dot_op<double>(acc[0], x[i], y[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Reduced-precision types: convert to opmath (float) per element.
template <typename scalar_t>
void update_loop(scalar_t* out, const scalar_t* p, const scalar_t* g,
                 at::opmath_type<scalar_t> lr, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(lslr_update_op(static_cast<opmath_t>(p[i]),
                                                  static_cast<opmath_t>(g[i]), lr));
  }
}
template <>
void update_loop<float>(float* out, const float* p, const float* g, float lr, int64_t n) {
  update_loop_f32(out, p, g, lr, n);
}
template <>
void update_loop<double>(double* out, const double* p, const double* g, double lr, int64_t n) {
  update_loop_f64(out, p, g, lr, n);
}

template <typename scalar_t>
void scale_loop(scalar_t* out, const scalar_t* x, at::opmath_type<scalar_t> c, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(lslr_scale_op(static_cast<opmath_t>(x[i]), c));
  }
}
template <>
void scale_loop<float>(float* out, const float* x, float c, int64_t n) {
  scale_loop_f32(out, x, c, n);
}
template <>
void scale_loop<double>(double* out, const double* x, double c, int64_t n) {
  scale_loop_f64(out, x, c, n);
}

template <typename scalar_t>
double dot_loop(const scalar_t* x, const scalar_t* y, int64_t n) {
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc = lslr_dot_op<double>(acc, static_cast<double>(x[i]), static_cast<double>(y[i]));
  }
  return acc;
}
template <>
double dot_loop<float>(const float* x, const float* y, int64_t n) {
  return dot_loop_f32(x, y, n);
}
template <>
double dot_loop<double>(const double* x, const double* y, int64_t n) {
  return dot_loop_f64(x, y, n);
}

// ---- the list walk ----------------------------------------------------------------------------

// One parallel work item: elements [begin, end) of list tensor k.
struct WorkItem {
  int64_t k;
  int64_t begin;
  int64_t end;
};

std::vector<WorkItem> make_work(const std::vector<int64_t>& numels, int64_t* total) {
  std::vector<WorkItem> work;
  *total = 0;
  for (int64_t k = 0; k < static_cast<int64_t>(numels.size()); ++k) {
    for (int64_t b = 0; b < numels[k]; b += kBlockSize) {
      work.push_back({k, b, std::min(numels[k], b + kBlockSize)});
    }
    *total += numels[k];
  }
  return work;
}

// Runs fn(item_index, item) over all work items, in parallel when the list is large.
template <typename Fn>
void parallel_over(const std::vector<WorkItem>& work, int64_t total, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(work.size());
  if (n == 0) return;
  const int64_t grain = total < kSerialThreshold ? n : 1;
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) fn(w, work[w]);
  });
}

// Splits [begin, end) at task-row boundaries when an operand is task-broadcast and calls
// seg(i, offset_a, offset_b, len) with the element offsets to read from each operand.
template <typename Seg>
void for_each_segment(int64_t begin, int64_t end, int64_t row, bool bcast_a, bool bcast_b,
                      const Seg& seg) {
  if (!bcast_a && !bcast_b) {
    seg(begin, begin, begin, end - begin);
    return;
  }
  for (int64_t i = begin; i < end;) {
    const int64_t stop = std::min(end, (i / row + 1) * row);
    const int64_t r = i % row;
    seg(i, bcast_a ? r : i, bcast_b ? r : i, stop - i);
    i = stop;
  }
}

// lrs[k, step] * alpha for every k, read once on the host (lrs is a small CPU tensor here).
std::vector<double> rate_column(const at::Tensor& lrs, int64_t step, double alpha) {
  std::vector<double> out(lrs.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lrs.scalar_type(), "rate_column", [&] {
    const scalar_t* base = lrs.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < lrs.size(0); ++k) {
      out[k] = alpha * static_cast<double>(base[k * lrs.stride(0) + step * lrs.stride(1)]);
    }
  });
  return out;
}

std::vector<at::Tensor> dense_outputs(at::TensorList like) {
  std::vector<at::Tensor> outs;
  outs.reserve(like.size());
  for (const auto& t : like) outs.push_back(at::empty(t.sizes(), t.options()));
  return outs;
}

std::vector<int64_t> numels_of(at::TensorList list) {
  std::vector<int64_t> n;
  n.reserve(list.size());
  for (const auto& t : list) n.push_back(t.numel());
  return n;
}

// ---- entry points -----------------------------------------------------------------------------

std::vector<at::Tensor> lslr_update_cpu(at::TensorList params, at::TensorList grads,
                                        const at::Tensor& lrs, int64_t step) {
  const auto dtype = check_lslr_update_args(params, grads, lrs, step);

  auto p_ops = as_list_operands(params);
  auto g_ops = as_list_operands(grads);
  auto outs = dense_outputs(params);
  const auto coeff = rate_column(lrs, step, 1.0);
  int64_t total = 0;
  const auto work = make_work(numels_of(params), &total);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lslr_update_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    parallel_over(work, total, [&](int64_t, const WorkItem& w) {
      scalar_t* out = outs[w.k].mutable_data_ptr<scalar_t>();
      const scalar_t* p = p_ops[w.k].tensor.const_data_ptr<scalar_t>();
      const scalar_t* g = g_ops[w.k].tensor.const_data_ptr<scalar_t>();
      const auto lr = static_cast<opmath_t>(coeff[w.k]);
      for_each_segment(w.begin, w.end, task_row_numel(params[w.k]), p_ops[w.k].broadcast,
                       g_ops[w.k].broadcast, [&](int64_t i, int64_t ip, int64_t ig, int64_t n) {
                         update_loop<scalar_t>(out + i, p + ip, g + ig, lr, n);
                       });
    });
  });
  return outs;
}

std::vector<at::Tensor> lslr_scale_cpu(at::TensorList xs, const at::Tensor& lrs, int64_t step,
                                       double alpha) {
  const auto dtype = check_lslr_scale_args(xs, lrs, step);

  auto x_ops = as_list_operands(xs);
  auto outs = dense_outputs(xs);
  const auto coeff = rate_column(lrs, step, alpha);
  int64_t total = 0;
  const auto work = make_work(numels_of(xs), &total);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lslr_scale_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    parallel_over(work, total, [&](int64_t, const WorkItem& w) {
      scalar_t* out = outs[w.k].mutable_data_ptr<scalar_t>();
      const scalar_t* x = x_ops[w.k].tensor.const_data_ptr<scalar_t>();
      const auto c = static_cast<opmath_t>(coeff[w.k]);
      for_each_segment(w.begin, w.end, task_row_numel(xs[w.k]), x_ops[w.k].broadcast, false,
                       [&](int64_t i, int64_t ix, int64_t, int64_t n) {
                         scale_loop<scalar_t>(out + i, x + ix, c, n);
                       });
    });
  });
  return outs;
}

at::Tensor lslr_dot_cpu(at::TensorList xs, at::TensorList ys, const at::Tensor& like,
                        int64_t step, double alpha) {
  const auto dtype = check_lslr_dot_args(xs, ys, like, step);

  auto x_ops = as_list_operands(xs);
  auto y_ops = as_list_operands(ys);
  int64_t total = 0;
  const auto work = make_work(numels_of(xs), &total);
  // One partial sum per work item, then a fixed-order sum per tensor: the result does not
  // depend on the number of threads.
  std::vector<double> partial(work.size(), 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lslr_dot_cpu", [&] {
    parallel_over(work, total, [&](int64_t wi, const WorkItem& w) {
      const scalar_t* x = x_ops[w.k].tensor.const_data_ptr<scalar_t>();
      const scalar_t* y = y_ops[w.k].tensor.const_data_ptr<scalar_t>();
      double acc = 0;
      for_each_segment(w.begin, w.end, task_row_numel(xs[w.k]), x_ops[w.k].broadcast,
                       y_ops[w.k].broadcast, [&](int64_t, int64_t ix, int64_t iy, int64_t n) {
                         acc += dot_loop<scalar_t>(x + ix, y + iy, n);
                       });
      partial[wi] = acc;
    });
  });

  std::vector<double> sums(xs.size(), 0.0);
  for (size_t wi = 0; wi < work.size(); ++wi) sums[work[wi].k] += partial[wi];

  at::Tensor out = at::zeros(like.sizes(), like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lslr_dot_out", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (size_t k = 0; k < sums.size(); ++k) {
      o[k * out.size(1) + step] = static_cast<scalar_t>(alpha * sums[k]);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace mamlpp

TORCH_LIBRARY_IMPL(mamlpp_ext, CPU, m) {
  m.impl("lslr_update", &mamlpp::cpu::lslr_update_cpu);
  m.impl("_lslr_scale", &mamlpp::cpu::lslr_scale_cpu);
  m.impl("_lslr_dot", &mamlpp::cpu::lslr_dot_cpu);
}
