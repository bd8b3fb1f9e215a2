// CPU kernels of the task-batched batch norm ops (batch_norm, batch_norm_eval,
// batch_norm_update_stats_, _batch_norm_backward, _batch_norm_double_backward).
//
// The unit of work is one (task, channel) group: its M = N*H*W elements are N contiguous spans
// of H*W values in the NCHW input, and they stay in cache across the two or three passes each
// op makes over them (statistics or sums, then the elementwise write). Groups run in one
// at::parallel_for. Inner loops use explicit 32-byte vectors (GCC vector extensions); per-span
// sums are vector partial sums in opmath, reduced in a fixed order and accumulated across spans
// in float64; affine gradients are folded over tasks after the parallel loop, in task order. So
// every result is independent of the thread count. Per-group functions are compiled for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and baseline x86-64 and picked at load time by ISA
// level (target_clones; an arch=<cpu model> clone is never picked on other vendors' CPUs). The
// arithmetic is in mamlpp/batch_norm.h, and the argument checks, operands and dtype/flag dispatch
// in mamlpp/batch_norm_checks.h, both shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "mamlpp/batch_norm.h"
#include "mamlpp/batch_norm_checks.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MAMLPP_NO_CLONES)
#define MAMLPP_BN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MAMLPP_BN_CLONES
#endif
#define MAMLPP_INLINE inline __attribute__((always_inline))
// The 32-byte vector types below are only passed between always-inlined functions.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mamlpp {
namespace cpu {

constexpr int64_t kGrainElements = 32768;  // elements per parallel work item, at least

// Where the elements of group g lie: span n is [(n * groups + g) * inner, ... + inner).
struct BnLayout {
  int64_t batch;
  int64_t groups;
  int64_t inner;
  int64_t span(int64_t n, int64_t g) const { return (n * groups + g) * inner; }
};

// ---- span loops --------------------------------------------------------------------------
//
// Inner loops are written once, as generic lambdas over a "lane type" L: the 32-byte GCC vector
// of opmath values (8 floats / 4 doubles: one AVX2 register in the x86-64-v3 clone, two SSE
// registers in the baseline one) for the body of a float/double span, and the opmath scalar
// for the tail and for float16/bfloat16 spans. Explicit vectors: the loops vectorise whatever
// the auto-vectoriser decides about pointer aliasing.

template <typename T>
struct Simd {
  static constexpr int kWidth = 0;  // no vector path (float16/bfloat16: convert per element)
  using type = T;
};
template <>
struct Simd<float> {
  static constexpr int kWidth = 8;
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  static constexpr int kWidth = 4;
  typedef double type __attribute__((vector_size(32)));
};

template <typename L>
constexpr bool is_lane_scalar() {
  return std::is_arithmetic_v<L>;
}

// Loads / stores one lane type's worth of elements at p (converting to / from opmath).
template <typename L, typename scalar_t>
MAMLPP_INLINE L load(const scalar_t* p) {
  if constexpr (is_lane_scalar<L>()) {
    return static_cast<L>(*p);
  } else {
    L v;
    std::memcpy(&v, p, sizeof(L));
    return v;
  }
}
template <typename L, typename scalar_t>
MAMLPP_INLINE void store(scalar_t* p, L v) {
  if constexpr (is_lane_scalar<L>()) {
    *p = static_cast<scalar_t>(v);
  } else {
    std::memcpy(p, &v, sizeof(L));
  }
}
template <typename L, typename T>
MAMLPP_INLINE L splat(T s) {
  if constexpr (is_lane_scalar<L>()) {
    return static_cast<L>(s);
  } else {
    using elem_t = std::remove_cv_t<std::remove_reference_t<decltype(L{}[0])>>;
    return L{} + static_cast<elem_t>(s);
  }
}
// Lane-wise c ? a : b (c: a comparison of lane types).
template <typename C, typename L>
MAMLPP_INLINE L select(C c, L a, L b) {
  return c ? a : b;
}
// The fused activation (mamlpp/batch_norm.h: bn_leaky, bn_leaky_slope) on lanes.
template <typename L, typename T>
MAMLPP_INLINE L leaky(L z, T slope) {
  return select(z > splat<L>(0), z, z * splat<L>(slope));
}
template <typename L, typename T>
MAMLPP_INLINE L leaky_slope(L out, T slope) {
  return select(out > splat<L>(0), splat<L>(1), splat<L>(slope));
}

// Horizontal sum of a vector in a fixed order.
template <typename V>
MAMLPP_INLINE auto hsum(V v) {
  constexpr int w = sizeof(V) / sizeof(v[0]);
  auto s0 = v[0] + v[1];
  auto s1 = v[2] + v[3];
  if constexpr (w == 8) {
    s0 += v[4] + v[5];
    s1 += v[6] + v[7];
  }
  return s0 + s1;
}

// body(i, L{}) for the lanes of a span of n elements: vectors of the opmath type, then scalars.
template <typename scalar_t, typename Body>
MAMLPP_INLINE void span_for(int64_t n, const Body& body) {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t i = 0;
  if constexpr (Simd<scalar_t>::kWidth > 0) {
    constexpr int w = Simd<scalar_t>::kWidth;
    for (; i + w <= n; i += w) body(i, typename Simd<scalar_t>::type{});
  }
  for (; i < n; ++i) body(i, opmath_t{});
}

// out[r] += sum over the span of term(i, v)[r]: term fills v (an array of R lane values).
template <int R, typename scalar_t, typename Term>
MAMLPP_INLINE void span_sums(int64_t n, const Term& term, double (&out)[R]) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t acc[R];
  for (int r = 0; r < R; ++r) acc[r] = opmath_t(0);
  int64_t i = 0;
  if constexpr (Simd<scalar_t>::kWidth > 0) {
    using V = typename Simd<scalar_t>::type;
    constexpr int w = Simd<scalar_t>::kWidth;
    V vacc[R];
    for (int r = 0; r < R; ++r) vacc[r] = V{};
    for (; i + w <= n; i += w) {
      V v[R];
      term(i, v);
      for (int r = 0; r < R; ++r) vacc[r] += v[r];
    }
    for (int r = 0; r < R; ++r) acc[r] = hsum(vacc[r]);
  }
  for (; i < n; ++i) {
    opmath_t v[R];
    term(i, v);
    for (int r = 0; r < R; ++r) acc[r] += v[r];
  }
  for (int r = 0; r < R; ++r) out[r] += static_cast<double>(acc[r]);
}

// ---- per-group work ----------------------------------------------------------------------

// Forward of group g. training: computes mean and biased var (two passes) into *mean, *var;
// otherwise reads them. Then writes out = act(x * scale + shift) (act: LeakyReLU with
// negative slope `slope` when kLeaky, else the identity).
template <typename scalar_t, bool kLeaky>
MAMLPP_BN_CLONES void forward_group(scalar_t* out, const scalar_t* x, BnLayout L, int64_t g,
                                    bool training, double eps, double gamma, double beta,
                                    double slope, double* mean, double* var) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t m = L.batch * L.inner;
  if (training) {
    double s[1] = {0.0};
    for (int64_t n = 0; n < L.batch; ++n) {
      const scalar_t* xs = x + L.span(n, g);
      span_sums<1, scalar_t>(L.inner, [&](int64_t i, auto& v) {
        using Lane = std::remove_reference_t<decltype(v[0])>;
        v[0] = load<Lane>(xs + i);
      }, s);
    }
    *mean = m > 0 ? s[0] / static_cast<double>(m) : 0.0;
    const auto mu = static_cast<opmath_t>(*mean);
    s[0] = 0.0;
    for (int64_t n = 0; n < L.batch; ++n) {
      const scalar_t* xs = x + L.span(n, g);
      span_sums<1, scalar_t>(L.inner, [&](int64_t i, auto& v) {
        using Lane = std::remove_reference_t<decltype(v[0])>;
        const Lane d = load<Lane>(xs + i) - splat<Lane>(mu);
        v[0] = d * d;
      }, s);
    }
    *var = m > 0 ? s[0] / static_cast<double>(m) : 0.0;
  }
  const auto k = bn_forward_coeffs<double>(*mean, bn_invstd<double>(*var, eps), gamma, beta);
  const auto scale = static_cast<opmath_t>(k.scale);
  const auto shift = static_cast<opmath_t>(k.shift);
  const auto a = static_cast<opmath_t>(slope);
  for (int64_t n = 0; n < L.batch; ++n) {
    const int64_t base = L.span(n, g);
    scalar_t* o = out + base;
    const scalar_t* xs = x + base;
    span_for<scalar_t>(L.inner, [&](int64_t i, auto lane) {
      using Lane = decltype(lane);
      const Lane z = load<Lane>(xs + i) * splat<Lane>(scale) + splat<Lane>(shift);
      if constexpr (kLeaky) {
        store(o + i, leaky(z, a));
      } else {
        store(o + i, z);
      }
    });
  }
}

// u = dy * (slope of the fused activation, read from the output's sign).
template <bool kLeaky, typename Lane, typename scalar_t, typename T>
MAMLPP_INLINE Lane load_u(const scalar_t* dy, const scalar_t* y, int64_t i, T slope) {
  if constexpr (kLeaky) {
    return load<Lane>(dy + i) * leaky_slope(load<Lane>(y + i), slope);
  } else {
    return load<Lane>(dy + i);
  }
}

// Backward of group g: dx = ku * u + kx * x + k0. Returns (S1, S2), this group's share of
// (dbeta, dgamma).
template <typename scalar_t, bool kLeaky>
MAMLPP_BN_CLONES void backward_group(scalar_t* dx, const scalar_t* dy, const scalar_t* x,
                                     const scalar_t* y, BnLayout L, int64_t g, bool training,
                                     double mean, double invstd, double gamma, double slope,
                                     double* s1, double* s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto mu = static_cast<opmath_t>(mean);
  const auto a = static_cast<opmath_t>(slope);
  double s[2] = {0.0, 0.0};
  for (int64_t n = 0; n < L.batch; ++n) {
    const int64_t base = L.span(n, g);
    const scalar_t *dys = dy + base, *xs = x + base, *ys = kLeaky ? y + base : nullptr;
    span_sums<2, scalar_t>(L.inner, [&](int64_t i, auto& v) {
      using Lane = std::remove_reference_t<decltype(v[0])>;
      const Lane u = load_u<kLeaky, Lane>(dys, ys, i, a);
      v[0] = u;
      v[1] = u * (load<Lane>(xs + i) - splat<Lane>(mu));
    }, s);
  }
  *s1 = s[0];
  *s2 = invstd * s[1];
  const auto k = bn_backward_coeffs<double>(mean, invstd, gamma, s[0], s[1],
                                            L.batch * L.inner, training);
  const auto ku = static_cast<opmath_t>(k.ku);
  const auto kx = static_cast<opmath_t>(k.kx);
  const auto k0 = static_cast<opmath_t>(k.k0);
  for (int64_t n = 0; n < L.batch; ++n) {
    const int64_t base = L.span(n, g);
    scalar_t* o = dx + base;
    const scalar_t *dys = dy + base, *xs = x + base, *ys = kLeaky ? y + base : nullptr;
    span_for<scalar_t>(L.inner, [&](int64_t i, auto lane) {
      using Lane = decltype(lane);
      const Lane u = load_u<kLeaky, Lane>(dys, ys, i, a);
      store(o + i, u * splat<Lane>(ku) + load<Lane>(xs + i) * splat<Lane>(kx) + splat<Lane>(k0));
    });
  }
}

// Double backward of group g (see NOTE [Task-batched batch norm]). ggx: the upstream gradient
// of dx (absent when !kHasGx, i.e. zero). Returns this group's share of grad_weight.
template <typename scalar_t, bool kLeaky, bool kHasGx>
MAMLPP_BN_CLONES void double_backward_group(scalar_t* grad_dy, scalar_t* grad_x,
                                            const scalar_t* ggx, const scalar_t* dy,
                                            const scalar_t* x, const scalar_t* y, BnLayout L,
                                            int64_t g, bool training, double mean, double invstd,
                                            double gamma, double ggamma, double gbeta,
                                            double slope, double* dgamma) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto mu = static_cast<opmath_t>(mean);
  const auto a_slope = static_cast<opmath_t>(slope);
  BnDoubleBackwardSums<double> sums{0, 0, 0, 0, 0};
  constexpr int R = kHasGx ? 5 : 2;
  double s[R];
  for (int r = 0; r < R; ++r) s[r] = 0.0;
  for (int64_t n = 0; n < L.batch; ++n) {
    const int64_t base = L.span(n, g);
    const scalar_t *dys = dy + base, *xs = x + base, *ys = kLeaky ? y + base : nullptr;
    const scalar_t* gs = kHasGx ? ggx + base : nullptr;
    span_sums<R, scalar_t>(L.inner, [&](int64_t i, auto& v) {
      using Lane = std::remove_reference_t<decltype(v[0])>;
      const Lane u = load_u<kLeaky, Lane>(dys, ys, i, a_slope);
      const Lane d = load<Lane>(xs + i) - splat<Lane>(mu);
      v[0] = u;
      v[1] = u * d;
      if constexpr (kHasGx) {
        const Lane gx = load<Lane>(gs + i);
        v[2] = gx;
        v[3] = gx * d;
        v[4] = gx * u;
      }
    }, s);
  }
  sums.s1 = s[0];
  sums.sud = s[1];
  if constexpr (kHasGx) {
    sums.sg = s[2];
    sums.sgd = s[3];
    sums.a = s[4];
  }
  const auto k = bn_double_backward_coeffs<double>(mean, invstd, gamma, ggamma, gbeta, sums,
                                                   L.batch * L.inner, training);
  *dgamma = k.dgamma;
  const auto p1 = static_cast<opmath_t>(k.p1), p2 = static_cast<opmath_t>(k.p2),
             p0 = static_cast<opmath_t>(k.p0);
  const auto qu = static_cast<opmath_t>(k.qu), qg = static_cast<opmath_t>(k.qg),
             qx = static_cast<opmath_t>(k.qx), q0 = static_cast<opmath_t>(k.q0);
  for (int64_t n = 0; n < L.batch; ++n) {
    const int64_t base = L.span(n, g);
    scalar_t* o_dy = grad_dy + base;
    scalar_t* o_x = grad_x + base;
    const scalar_t *dys = dy + base, *xs = x + base, *ys = kLeaky ? y + base : nullptr;
    const scalar_t* gs = kHasGx ? ggx + base : nullptr;
    span_for<scalar_t>(L.inner, [&](int64_t i, auto lane) {
      using Lane = decltype(lane);
      const Lane a = kLeaky ? leaky_slope(load<Lane>(ys + i), a_slope) : splat<Lane>(1);
      const Lane u = load<Lane>(dys + i) * a;
      const Lane xv = load<Lane>(xs + i);
      const Lane gx = kHasGx ? load<Lane>(gs + i) : splat<Lane>(0);
      store(o_dy + i, a * (gx * splat<Lane>(p1) + xv * splat<Lane>(p2) + splat<Lane>(p0)));
      store(o_x + i, u * splat<Lane>(qu) + gx * splat<Lane>(qg) + xv * splat<Lane>(qx) +
                         splat<Lane>(q0));
    });
  }
}

// ---- helpers ------------------------------------------------------------------------------

// Runs fn(g) for every group, in parallel when there is enough work.
template <typename Fn>
void parallel_groups(const BnGeometry& geo, const Fn& fn) {
  const int64_t m = std::max<int64_t>(geo.count(), 1);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / m);
  at::parallel_for(0, geo.groups, grain, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) fn(g);
  });
}

// Per-group affine values as float64 (`fill` without affine), element g % A of the flat
// (contiguous) weight.
std::vector<double> group_affine(const std::optional<at::Tensor>& t, const BnGeometry& geo,
                                 double fill) {
  std::vector<double> out(geo.groups, fill);
  if (!t) return out;
  const int64_t a = t->numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "group_affine", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    for (int64_t g = 0; g < geo.groups; ++g) out[g] = static_cast<double>(p[g % a]);
  });
  return out;
}

// Per-group statistics as float64 (BnArgs::mean / var, opmath dtype, with its indexing).
void group_stats(const BnArgs& args, std::vector<double>* m, std::vector<double>* v) {
  m->resize(args.geo.groups);
  v->resize(args.geo.groups);
  AT_DISPATCH_FLOATING_TYPES(args.mean.scalar_type(), "group_stats", [&] {
    const scalar_t* pm = args.mean.const_data_ptr<scalar_t>() + args.stats_offset;
    const scalar_t* pv = args.var.const_data_ptr<scalar_t>() + args.stats_offset;
    for (int64_t g = 0; g < args.geo.groups; ++g) {
      (*m)[g] = static_cast<double>(pm[g % args.stats_period]);
      (*v)[g] = static_cast<double>(pv[g % args.stats_period]);
    }
  });
}

// Folds per-group values into the affine-gradient shape: sum over tasks (in task order) for a
// shared (C,) affine, one value per group for a per-task (T, C) one.
at::Tensor fold_affine(const std::vector<double>& per_group, const BnArgs& args) {
  at::Tensor out = at::empty(args.affine_shape, args.input.options());
  const int64_t a = out.numel();
  std::vector<double> acc(a, 0.0);
  for (int64_t g = 0; g < args.geo.groups; ++g) acc[g % a] += per_group[g];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fold_affine", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < a; ++i) p[i] = static_cast<scalar_t>(acc[i]);
  });
  return out;
}

at::Tensor stats_tensor(const std::vector<double>& v, const at::Tensor& input) {
  at::Tensor out = at::empty({static_cast<int64_t>(v.size())},
                             input.options().dtype(at::toOpMathType(input.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "stats_tensor", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return out;
}

BnLayout layout_of(const BnGeometry& geo) { return {geo.batch, geo.groups, geo.inner}; }

// Shared body of the two forwards: statistics from the batch (training; written to mean, var)
// or read from mean, var (evaluation), then out = act(x * scale + shift).
at::Tensor forward_impl(const BnArgs& args, std::vector<double>* mean, std::vector<double>* var) {
  const at::Tensor& x = args.input;
  at::Tensor out = at::empty(x.sizes(), x.options());
  const auto gamma = group_affine(args.weight, args.geo, 1.0);
  const auto beta = group_affine(args.bias, args.geo, 0.0);
  const BnLayout L = layout_of(args.geo);
  bn_dispatch(x.scalar_type(), args.activation, [&](auto type, auto act) {
    using scalar_t = typename decltype(type)::type;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    parallel_groups(args.geo, [&](int64_t g) {
      forward_group<scalar_t, decltype(act)::value>(po, px, L, g, args.training, args.eps,
                                                     gamma[g], beta[g], args.negative_slope,
                                                     &(*mean)[g], &(*var)[g]);
    });
  });
  return out;
}

// ---- entry points -------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t tasks, double eps,
    std::optional<double> negative_slope) {
  const BnArgs args = batch_norm_args(input, weight, bias, tasks, eps, negative_slope);
  std::vector<double> mean(args.geo.groups, 0.0), var(args.geo.groups, 0.0);
  at::Tensor out = forward_impl(args, &mean, &var);
  return {out, stats_tensor(mean, input), stats_tensor(var, input)};
}

at::Tensor batch_norm_eval_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               int64_t tasks, int64_t step, double eps,
                               std::optional<double> negative_slope) {
  const BnArgs args = batch_norm_eval_args(input, weight, bias, running_mean, running_var, tasks,
                                           step, eps, negative_slope);
  std::vector<double> mean, var;
  group_stats(args, &mean, &var);
  return forward_impl(args, &mean, &var);
}

void batch_norm_update_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, int64_t tasks,
                                 int64_t step, int64_t count, double momentum) {
  const int64_t channels = check_batch_norm_update_stats_args(running_mean, running_var, mean,
                                                              var, tasks, step, count);
  if (count == 0) return;
  const at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  std::vector<double> bm(channels, 0.0), bv(channels, 0.0);
  AT_DISPATCH_FLOATING_TYPES(mc.scalar_type(), "update_stats_read", [&] {
    const scalar_t* pm = mc.const_data_ptr<scalar_t>();
    const scalar_t* pv = vc.const_data_ptr<scalar_t>();
    for (int64_t t = 0; t < tasks; ++t) {
      for (int64_t c = 0; c < channels; ++c) {
        bm[c] += static_cast<double>(pm[t * channels + c]);
        bv[c] += bn_unbiased_var<double>(static_cast<double>(pv[t * channels + c]), count);
      }
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                  "update_stats_write", [&] {
    scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
    scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
    const int64_t sm0 = running_mean.stride(0), sm1 = running_mean.stride(1);
    const int64_t sv0 = running_var.stride(0), sv1 = running_var.stride(1);
    for (int64_t c = 0; c < channels; ++c) {
      scalar_t& m = rm[step * sm0 + c * sm1];
      scalar_t& v = rv[step * sv0 + c * sv1];
      m = static_cast<scalar_t>(
          bn_running_update<double>(static_cast<double>(m), bm[c] / tasks, momentum));
      v = static_cast<scalar_t>(
          bn_running_update<double>(static_cast<double>(v), bv[c] / tasks, momentum));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& out, const at::Tensor& mean, const at::Tensor& var,
    int64_t tasks, int64_t step, bool training, double eps, double negative_slope) {
  const BnArgs args = batch_norm_backward_args(grad_out, input, weight, out, mean, var, tasks,
                                               step, training, eps, negative_slope);
  std::vector<double> mu, sigma2;
  group_stats(args, &mu, &sigma2);
  const auto gamma = group_affine(args.weight, args.geo, 1.0);
  std::vector<double> s1(args.geo.groups, 0.0), s2(args.geo.groups, 0.0);
  at::Tensor dx = at::empty(args.input.sizes(), args.input.options());
  const BnLayout L = layout_of(args.geo);
  bn_dispatch(args.input.scalar_type(), args.activation, [&](auto type, auto act) {
    using scalar_t = typename decltype(type)::type;
    const scalar_t* px = args.input.const_data_ptr<scalar_t>();
    const scalar_t* pdy = args.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* py = act ? args.out.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    parallel_groups(args.geo, [&](int64_t g) {
      backward_group<scalar_t, decltype(act)::value>(
          pdx, pdy, px, py, L, g, args.training, mu[g], bn_invstd<double>(sigma2[g], args.eps),
          gamma[g], args.negative_slope, &s1[g], &s2[g]);
    });
  });
  return {dx, fold_affine(s2, args), fold_affine(s1, args)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward_cpu(
    const std::optional<at::Tensor>& grad_grad_input,
    const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_out,
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& out, const at::Tensor& mean, const at::Tensor& var,
    int64_t tasks, int64_t step, bool training, double eps, double negative_slope) {
  const BnArgs args = batch_norm_double_backward_args(
      grad_grad_input, grad_grad_weight, grad_grad_bias, grad_out, input, weight, out, mean, var,
      tasks, step, training, eps, negative_slope);
  std::vector<double> mu, sigma2;
  group_stats(args, &mu, &sigma2);
  const auto gamma = group_affine(args.weight, args.geo, 1.0);
  const auto ggamma = group_affine(args.grad_grad_weight, args.geo, 0.0);
  const auto gbeta = group_affine(args.grad_grad_bias, args.geo, 0.0);
  std::vector<double> dgamma(args.geo.groups, 0.0);
  at::Tensor grad_dy = at::empty(args.input.sizes(), args.input.options());
  at::Tensor grad_x = at::empty(args.input.sizes(), args.input.options());
  const BnLayout L = layout_of(args.geo);
  const bool has_gx = args.grad_grad_input.defined();
  bn_dispatch(args.input.scalar_type(), args.activation, has_gx, [&](auto type, auto act,
                                                                       auto gx) {
    using scalar_t = typename decltype(type)::type;
    const scalar_t* px = args.input.const_data_ptr<scalar_t>();
    const scalar_t* pdy = args.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* py = act ? args.out.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pgg = gx ? args.grad_grad_input.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o_dy = grad_dy.mutable_data_ptr<scalar_t>();
    scalar_t* o_x = grad_x.mutable_data_ptr<scalar_t>();
    parallel_groups(args.geo, [&](int64_t g) {
      double_backward_group<scalar_t, decltype(act)::value, decltype(gx)::value>(
          o_dy, o_x, pgg, pdy, px, py, L, g, args.training, mu[g],
          bn_invstd<double>(sigma2[g], args.eps), gamma[g], ggamma[g], gbeta[g],
          args.negative_slope, &dgamma[g]);
    });
  });
  return {grad_dy, grad_x, fold_affine(dgamma, args)};
}

}  // namespace cpu
}  // namespace mamlpp

TORCH_LIBRARY_IMPL(mamlpp_ext, CPU, m) {
  m.impl("batch_norm", &mamlpp::cpu::batch_norm_cpu);
  m.impl("batch_norm_eval", &mamlpp::cpu::batch_norm_eval_cpu);
  m.impl("batch_norm_update_stats_", &mamlpp::cpu::batch_norm_update_stats_cpu);
  m.impl("_batch_norm_backward", &mamlpp::cpu::batch_norm_backward_cpu);
  m.impl("_batch_norm_double_backward", &mamlpp::cpu::batch_norm_double_backward_cpu);
}
