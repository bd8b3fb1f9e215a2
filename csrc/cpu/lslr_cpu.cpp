// CPU kernels of the LSLR op family (lslr_update, _lslr_scale, _lslr_dot).
//
// A call makes one parallel pass over the whole tensor list: the list's elements, taken in list
// order, are cut into one contiguous range per thread (equal element counts), and each thread
// walks its range tensor by tensor (NOTE [CPU parallel pass]). _lslr_dot sums fixed blocks of
// kDotBlock elements instead, so that its result does not depend on the thread count. Inner
// loops are plain contiguous loops over `opmath` values; for float32/float64 they are compiled
// for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC/Clang target_clones), so the
// wheel runs on any x86-64 CPU. Task-broadcast operands (NOTE [Task-broadcast operands]) are
// walked row by row, never copied.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/SmallVector.h>
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

// NOTE [CPU parallel pass]
// at::parallel_for is a header template. With torch's OpenMP backend (AT_PARALLEL_OPENMP) its
// parallel branch is a `#pragma omp parallel` that exists only when the including file is
// compiled with -fopenmp (the header tests _OPENMP); without it the header runs the whole range
// on the calling thread, whatever torch.set_num_threads says. setup.py therefore compiles with
// -fopenmp (and links no OpenMP runtime of its own: the symbols resolve to the one libtorch_cpu
// loads). Each pass is one parallel region with one equal element range per thread; below
// kMinElementsPerThread per thread it stays on the calling thread (benchmarks/RESULTS.md,
// "CPU lslr_update against plain PyTorch").

namespace mamlpp {
namespace cpu {

// A thread's share of a pass is at least this many elements (ATen's grain size); smaller lists
// run on the calling thread, where a parallel region's fork and join would cost more than it saves.
constexpr int64_t kMinElementsPerThread = 32768;
// _lslr_dot sums each tensor in blocks of this many elements, one float64 partial per block, then
// adds the partials in block order: the same additions in the same order for any thread count.
constexpr int64_t kDotBlock = 16384;

// ---- inner loops (contiguous, n elements) -------------------------------------------------

// The update is computed as p - (lr * g) with two roundings, never contracted into one fused
// multiply-add: GCC contracted the 16-wide body and the scalar tail of a loop but not its 8-wide
// remainder, so an element's last bit depended on where the segment holding it began, i.e. on
// the thread count. Uncontracted, every path (and every clone: baseline x86-64 has no FMA) gives
// the same bits. The loops are memory-bound; the extra multiply costs no time.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
MAMLPP_CLONES void update_loop_f32(float* __restrict out, const float* __restrict p,
                                   const float* __restrict g, float lr, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = lslr_update_op(p[i], g[i], lr);
}
MAMLPP_CLONES void update_loop_f64(double* __restrict out, const double* __restrict p,
                                   const double* __restrict g, double lr, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = lslr_update_op(p[i], g[i], lr);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
MAMLPP_CLONES void scale_loop_f32(float* __restrict out, const float* __restrict x, float c,
                                  int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = lslr_scale_op(x[i], c);
}
MAMLPP_CLONES void scale_loop_f64(double* __restrict out, const double* __restrict x, double c,
                                  int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = lslr_scale_op(x[i], c);
}
// kDotLanes independent float64 accumulators: vectorisable without reassociating one sum, and
// enough independent add chains (four 4-wide vectors) that the loop waits on memory, not on the
// latency of one chain of additions. Always inlined, so it is compiled for each clone's ISA.
constexpr int kDotLanes = 16;
template <typename T>
C10_ALWAYS_INLINE double dot_loop_body(const T* __restrict x, const T* __restrict y, int64_t n) {
  double acc[kDotLanes] = {};
  int64_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) {
    for (int j = 0; j < kDotLanes; ++j) {
      acc[j] = lslr_dot_op<double>(acc[j], static_cast<double>(x[i + j]),
                                   static_cast<double>(y[i + j]));
    }
  }
  for (; i < n; ++i) {
    acc[0] = lslr_dot_op<double>(acc[0], static_cast<double>(x[i]), static_cast<double>(y[i]));
  }
  // Pairwise, in a fixed order.
  for (int w = kDotLanes / 2; w >= 1; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}
MAMLPP_CLONES double dot_loop_f32(const float* __restrict x, const float* __restrict y,
                                  int64_t n) {
  return dot_loop_body(x, y, n);
}
MAMLPP_CLONES double dot_loop_f64(const double* __restrict x, const double* __restrict y,
                                  int64_t n) {
  return dot_loop_body(x, y, n);
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

// ---- the parallel pass (NOTE [CPU parallel pass]) ---------------------------------------------

// How many parts (threads) a pass over `total` elements uses.
int64_t parts_for(int64_t total) {
  at::internal::lazy_init_num_threads();
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>(threads, total / kMinElementsPerThread));
}

// Runs body(p) for p = 0 .. parts-1, one part per thread of torch's intra-op team. `body` must
// not throw: it only reads and writes through data pointers taken before the pass.
template <typename Body>
void run_parts(int64_t parts, const Body& body) {
  if (parts <= 1) {
    for (int64_t p = 0; p < parts; ++p) body(p);
    return;
  }
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) body(p);
  });
}

// Where each tensor of a list starts when the list's elements are numbered in list order.
struct ListLayout {
  c10::SmallVector<int64_t, 16> start;  // start[k]; start[K] = total elements
  int64_t total() const { return start.back(); }
  int64_t size() const { return static_cast<int64_t>(start.size()) - 1; }
};

ListLayout layout_of(at::TensorList list) {
  ListLayout l;
  l.start.reserve(list.size() + 1);
  l.start.push_back(0);
  for (const auto& t : list) l.start.push_back(l.start.back() + t.numel());
  return l;
}

// Part p of `parts` equal shares of [0, total).
inline int64_t part_begin(int64_t total, int64_t parts, int64_t p) {
  return (total / parts) * p + (total % parts) * p / parts;  // floor(total * p / parts)
}

// Calls piece(k, begin, end) for the pieces of tensors that list elements [lo, hi) cover, with
// begin/end local to tensor k.
template <typename Piece>
void for_each_piece(const ListLayout& l, int64_t lo, int64_t hi, const Piece& piece) {
  if (lo >= hi) return;
  int64_t k = std::upper_bound(l.start.begin(), l.start.end(), lo) - l.start.begin() - 1;
  for (; k < l.size() && l.start[k] < hi; ++k) {
    const int64_t b = std::max(lo, l.start[k]) - l.start[k];
    const int64_t e = std::min(hi, l.start[k + 1]) - l.start[k];
    if (b < e) piece(k, b, e);
  }
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

// What the loops need of one list operand, read once before the pass.
template <typename scalar_t>
struct OperandView {
  const scalar_t* data;
  int64_t row;      // elements per task row
  bool broadcast;   // read element i as data[i % row]
};

template <typename scalar_t>
std::vector<OperandView<scalar_t>> views_of(const std::vector<ListOperand>& ops,
                                            at::TensorList list) {
  std::vector<OperandView<scalar_t>> v;
  v.reserve(ops.size());
  for (size_t k = 0; k < ops.size(); ++k) {
    v.push_back({ops[k].tensor.const_data_ptr<scalar_t>(), task_row_numel(list[k]),
                 ops[k].broadcast});
  }
  return v;
}

template <typename scalar_t>
std::vector<scalar_t*> data_of(std::vector<at::Tensor>& outs) {
  std::vector<scalar_t*> v;
  v.reserve(outs.size());
  for (auto& t : outs) v.push_back(t.mutable_data_ptr<scalar_t>());
  return v;
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

// NOTE [One allocation for the outputs]
// The K outputs of a call are carved from one allocation, each with its own storage (so no two
// outputs alias) whose deleter releases a reference to the shared block. Why: with K separate
// allocations glibc gave some of the freed outputs' pages back to the kernel between calls (how
// many depends on what the process allocated before), and the next call's first touch of them
// page-faulted: up to 544 faults, 1-1.5 ms, per call on the Omniglot list at T=8 on the project's
// 2-core VM, against 0.08-0.2 ms for the arithmetic. Once a block of the list's size has been
// freed, glibc's mmap and trim thresholds rise to its size (up to 32 MiB); it then serves the
// block from its heap and keeps the pages, so steady-state calls take no faults
// (benchmarks/RESULTS.md, issue 11). Blocks above 32 MiB are mapped afresh on every call, as
// separate outputs of that size were. The cost: one live output keeps the whole block alive; the
// outputs of a MAML inner step live and die together. The storages keep the CPU allocator, so
// resize_ works.
constexpr int64_t kOutputAlign = 64;  // bytes; every output starts on a cache line

void release_block(void* ctx) {
  c10::raw::intrusive_ptr::decref(static_cast<c10::StorageImpl*>(ctx));
}

std::vector<at::Tensor> dense_outputs(at::TensorList like) {
  std::vector<at::Tensor> outs;
  outs.reserve(like.size());
  c10::SmallVector<int64_t, 16> offset;
  int64_t bytes = 0;
  for (const auto& t : like) {
    offset.push_back(bytes);
    bytes += (t.numel() * t.element_size() + kOutputAlign - 1) / kOutputAlign * kOutputAlign;
  }
  if (bytes == 0) {
    for (const auto& t : like) outs.push_back(at::empty(t.sizes(), t.options()));
    return outs;
  }
  const at::Tensor block = at::empty({bytes}, like[0].options().dtype(at::kByte));
  c10::StorageImpl* storage = block.storage().unsafeGetStorageImpl();
  char* base = static_cast<char*>(block.storage().mutable_data());
  for (size_t k = 0; k < like.size(); ++k) {
    c10::raw::intrusive_ptr::incref(storage);  // released by release_block
    outs.push_back(at::for_blob(base + offset[k], like[k].sizes())
                       .context(storage, &release_block)
                       .options(like[k].options())
                       .allocator(c10::GetCPUAllocator())
                       .resizeable_storage()
                       .make_tensor());
  }
  return outs;
}

// ---- entry points -----------------------------------------------------------------------------

std::vector<at::Tensor> lslr_update_cpu(at::TensorList params, at::TensorList grads,
                                        const at::Tensor& lrs, int64_t step) {
  const auto dtype = check_lslr_update_args(params, grads, lrs, step);

  const auto p_ops = as_list_operands(params);
  const auto g_ops = as_list_operands(grads);
  auto outs = dense_outputs(params);
  const auto coeff = rate_column(lrs, step, 1.0);
  const ListLayout layout = layout_of(params);
  const int64_t parts = parts_for(layout.total());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lslr_update_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto p = views_of<scalar_t>(p_ops, params);
    const auto g = views_of<scalar_t>(g_ops, grads);
    const auto out = data_of<scalar_t>(outs);
    run_parts(parts, [&](int64_t part) {
      const int64_t lo = part_begin(layout.total(), parts, part);
      const int64_t hi = part_begin(layout.total(), parts, part + 1);
      for_each_piece(layout, lo, hi, [&](int64_t k, int64_t b, int64_t e) {
        const auto lr = static_cast<opmath_t>(coeff[k]);
        for_each_segment(b, e, p[k].row, p[k].broadcast, g[k].broadcast,
                         [&](int64_t i, int64_t ip, int64_t ig, int64_t n) {
                           update_loop<scalar_t>(out[k] + i, p[k].data + ip, g[k].data + ig, lr,
                                                 n);
                         });
      });
    });
  });
  return outs;
}

std::vector<at::Tensor> lslr_scale_cpu(at::TensorList xs, const at::Tensor& lrs, int64_t step,
                                       double alpha) {
  const auto dtype = check_lslr_scale_args(xs, lrs, step);

  const auto x_ops = as_list_operands(xs);
  auto outs = dense_outputs(xs);
  const auto coeff = rate_column(lrs, step, alpha);
  const ListLayout layout = layout_of(xs);
  const int64_t parts = parts_for(layout.total());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lslr_scale_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto x = views_of<scalar_t>(x_ops, xs);
    const auto out = data_of<scalar_t>(outs);
    run_parts(parts, [&](int64_t part) {
      const int64_t lo = part_begin(layout.total(), parts, part);
      const int64_t hi = part_begin(layout.total(), parts, part + 1);
      for_each_piece(layout, lo, hi, [&](int64_t k, int64_t b, int64_t e) {
        const auto c = static_cast<opmath_t>(coeff[k]);
        for_each_segment(b, e, x[k].row, x[k].broadcast, false,
                         [&](int64_t i, int64_t ix, int64_t, int64_t n) {
                           scale_loop<scalar_t>(out[k] + i, x[k].data + ix, c, n);
                         });
      });
    });
  });
  return outs;
}

at::Tensor lslr_dot_cpu(at::TensorList xs, at::TensorList ys, const at::Tensor& like,
                        int64_t step, double alpha) {
  const auto dtype = check_lslr_dot_args(xs, ys, like, step);

  const auto x_ops = as_list_operands(xs);
  const auto y_ops = as_list_operands(ys);
  const ListLayout layout = layout_of(xs);
  const int64_t parts = parts_for(layout.total());
  // first_block[k]: index of tensor k's first block among all blocks of the list.
  c10::SmallVector<int64_t, 16> first_block;
  first_block.reserve(layout.size() + 1);
  first_block.push_back(0);
  for (int64_t k = 0; k < layout.size(); ++k) {
    const int64_t n = layout.start[k + 1] - layout.start[k];
    first_block.push_back(first_block.back() + (n + kDotBlock - 1) / kDotBlock);
  }
  std::vector<double> partial(first_block.back(), 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lslr_dot_cpu", [&] {
    const auto x = views_of<scalar_t>(x_ops, xs);
    const auto y = views_of<scalar_t>(y_ops, ys);
    // A block belongs to the part whose element range holds the block's first element, so a part
    // boundary never splits a block and every partial sums the same elements for any `parts`.
    run_parts(parts, [&](int64_t part) {
      const int64_t lo = part_begin(layout.total(), parts, part);
      const int64_t hi = part_begin(layout.total(), parts, part + 1);
      for_each_piece(layout, lo, hi, [&](int64_t k, int64_t b, int64_t e) {
        const int64_t n = layout.start[k + 1] - layout.start[k];
        for (int64_t j = (b + kDotBlock - 1) / kDotBlock; j * kDotBlock < e; ++j) {
          const int64_t bb = j * kDotBlock;
          const int64_t be = std::min(n, bb + kDotBlock);
          double acc = 0;
          for_each_segment(bb, be, x[k].row, x[k].broadcast, y[k].broadcast,
                           [&](int64_t, int64_t ix, int64_t iy, int64_t len) {
                             acc += dot_loop<scalar_t>(x[k].data + ix, y[k].data + iy, len);
                           });
          partial[first_block[k] + j] = acc;
        }
      });
    });
  });

  at::Tensor out = at::zeros(like.sizes(), like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lslr_dot_out", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < layout.size(); ++k) {
      double sum = 0;
      for (int64_t j = first_block[k]; j < first_block[k + 1]; ++j) sum += partial[j];
      o[k * out.stride(0) + step * out.stride(1)] = static_cast<scalar_t>(alpha * sum);
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
