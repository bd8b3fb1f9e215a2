// CPU kernels of the task-batched batch norm ops (batch_norm, batch_norm_eval,
// batch_norm_update_stats_, _batch_norm_backward, _batch_norm_double_backward).
//
// The unit of work is one (task, channel) group: its M = N*H*W elements are N contiguous spans
// of H*W values in the NCHW input, and they stay in cache across the two or three passes each
// op makes over them (statistics or sums, then the elementwise write). Groups run in one
// at::parallel_for. Per-span sums use eight independent partial sums (vectorisable without
// reassociating one sum) in opmath, combined in a fixed order and accumulated across spans in
// float64; affine gradients are folded over tasks after the parallel loop, in task order. So
// every result is independent of the thread count. Per-group functions are compiled for
// AVX-512, AVX2+FMA and baseline x86-64 and picked at load time (target_clones). The
// arithmetic is in mamlpp/batch_norm.h, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "mamlpp/batch_norm.h"
#include "mamlpp/batch_norm_checks.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MAMLPP_NO_CLONES)
#define MAMLPP_BN_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define MAMLPP_BN_CLONES
#endif
#define MAMLPP_INLINE inline __attribute__((always_inline))

namespace mamlpp {
namespace cpu {

constexpr int kLanes = 8;                  // independent partial sums per reduction
constexpr int64_t kGrainElements = 32768;  // elements per parallel work item, at least

// Where the elements of group g lie: span n is [(n * groups + g) * inner, ... + inner).
struct BnLayout {
  int64_t batch;
  int64_t groups;
  int64_t inner;
  int64_t span(int64_t n, int64_t g) const { return (n * groups + g) * inner; }
};

// ---- span loops --------------------------------------------------------------------------

// out[r] = sum over i < n of term(i)[r], in opmath, with kLanes partial sums per r.
template <int R, typename opmath_t, typename Term>
MAMLPP_INLINE void span_reduce(int64_t n, const Term& term, opmath_t (&out)[R]) {
  opmath_t acc[R][kLanes];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kLanes; ++j) acc[r][j] = opmath_t(0);
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      opmath_t v[R];
      term(i + j, v);
      for (int r = 0; r < R; ++r) acc[r][j] += v[r];
    }
  }
  for (; i < n; ++i) {
    opmath_t v[R];
    term(i, v);
    for (int r = 0; r < R; ++r) acc[r][0] += v[r];
  }
  for (int r = 0; r < R; ++r) {
    out[r] = ((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3])) +
             ((acc[r][4] + acc[r][5]) + (acc[r][6] + acc[r][7]));
  }
}

// Sums over all spans of group g, accumulated across spans in float64.
template <int R, typename opmath_t, typename Term>
MAMLPP_INLINE void group_reduce(const BnLayout& L, int64_t g, const Term& term, double (&out)[R]) {
  for (int r = 0; r < R; ++r) out[r] = 0.0;
  for (int64_t n = 0; n < L.batch; ++n) {
    const int64_t base = L.span(n, g);
    opmath_t s[R];
    span_reduce<R, opmath_t>(L.inner, [&](int64_t i, opmath_t (&v)[R]) { term(base + i, v); }, s);
    for (int r = 0; r < R; ++r) out[r] += static_cast<double>(s[r]);
  }
}

template <typename scalar_t>
MAMLPP_INLINE at::opmath_type<scalar_t> ld(const scalar_t* p, int64_t i) {
  return static_cast<at::opmath_type<scalar_t>>(p[i]);
}

// ---- per-group work ----------------------------------------------------------------------

// Forward of group g. training: computes mean and biased var (two passes) into *mean, *var;
// otherwise reads them. Then writes out = act(x * scale + shift).
template <typename scalar_t, bool kLeaky>
MAMLPP_BN_CLONES void forward_group(scalar_t* __restrict out, const scalar_t* __restrict x,
                                    BnLayout L, int64_t g, bool training, double eps,
                                    double gamma, double beta, double* mean, double* var) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t m = L.batch * L.inner;
  if (training) {
    double s[1];
    group_reduce<1, opmath_t>(L, g, [&](int64_t i, opmath_t (&v)[1]) { v[0] = ld(x, i); }, s);
    *mean = m > 0 ? s[0] / static_cast<double>(m) : 0.0;
    const auto mu = static_cast<opmath_t>(*mean);
    group_reduce<1, opmath_t>(L, g, [&](int64_t i, opmath_t (&v)[1]) {
      const opmath_t d = ld(x, i) - mu;
      v[0] = d * d;
    }, s);
    *var = m > 0 ? s[0] / static_cast<double>(m) : 0.0;
  }
  const auto k = bn_forward_coeffs<double>(*mean, bn_invstd<double>(*var, eps), gamma, beta);
  const auto scale = static_cast<opmath_t>(k.scale);
  const auto shift = static_cast<opmath_t>(k.shift);
  for (int64_t n = 0; n < L.batch; ++n) {
    const int64_t base = L.span(n, g);
    scalar_t* __restrict o = out + base;
    const scalar_t* __restrict xi = x + base;
    for (int64_t i = 0; i < L.inner; ++i) {
      const opmath_t z = ld(xi, i) * scale + shift;
      o[i] = static_cast<scalar_t>(kLeaky ? bn_leaky(z) : z);
    }
  }
}

// Backward of group g: dx = ku * u + kx * x + k0 with u = dy * slope(out). Returns (S1, S2),
// this group's share of (dbeta, dgamma).
template <typename scalar_t, bool kLeaky>
MAMLPP_BN_CLONES void backward_group(scalar_t* __restrict dx, const scalar_t* __restrict dy,
                                     const scalar_t* __restrict x, const scalar_t* __restrict y,
                                     BnLayout L, int64_t g, bool training, double mean,
                                     double invstd, double gamma, double* s1, double* s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto mu = static_cast<opmath_t>(mean);
  double s[2];
  group_reduce<2, opmath_t>(L, g, [&](int64_t i, opmath_t (&v)[2]) {
    const opmath_t u = kLeaky ? ld(dy, i) * bn_leaky_slope(ld(y, i)) : ld(dy, i);
    v[0] = u;
    v[1] = u * (ld(x, i) - mu);
  }, s);
  *s1 = s[0];
  *s2 = invstd * s[1];
  const auto k = bn_backward_coeffs<double>(mean, invstd, gamma, s[0], s[1],
                                            L.batch * L.inner, training);
  const auto ku = static_cast<opmath_t>(k.ku);
  const auto kx = static_cast<opmath_t>(k.kx);
  const auto k0 = static_cast<opmath_t>(k.k0);
  for (int64_t n = 0; n < L.batch; ++n) {
    const int64_t base = L.span(n, g);
    scalar_t* __restrict o = dx + base;
    const scalar_t* __restrict gi = dy + base;
    const scalar_t* __restrict xi = x + base;
    const scalar_t* __restrict yi = kLeaky ? y + base : nullptr;
    for (int64_t i = 0; i < L.inner; ++i) {
      const opmath_t u = kLeaky ? ld(gi, i) * bn_leaky_slope(ld(yi, i)) : ld(gi, i);
      o[i] = static_cast<scalar_t>(ku * u + kx * ld(xi, i) + k0);
    }
  }
}

// Double backward of group g (see NOTE [Task-batched batch norm]). ggx: the upstream gradient
// of dx (absent when !kHasGx, i.e. zero). Returns this group's share of grad_weight.
template <typename scalar_t, bool kLeaky, bool kHasGx>
MAMLPP_BN_CLONES void double_backward_group(
    scalar_t* __restrict grad_dy, scalar_t* __restrict grad_x, const scalar_t* __restrict ggx,
    const scalar_t* __restrict dy, const scalar_t* __restrict x, const scalar_t* __restrict y,
    BnLayout L, int64_t g, bool training, double mean, double invstd, double gamma,
    double ggamma, double gbeta, double* dgamma) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto mu = static_cast<opmath_t>(mean);
  BnDoubleBackwardSums<double> sums{0, 0, 0, 0, 0};
  if (kHasGx) {
    double s[5];
    group_reduce<5, opmath_t>(L, g, [&](int64_t i, opmath_t (&v)[5]) {
      const opmath_t u = kLeaky ? ld(dy, i) * bn_leaky_slope(ld(y, i)) : ld(dy, i);
      const opmath_t d = ld(x, i) - mu;
      const opmath_t gx = ld(ggx, i);
      v[0] = u;
      v[1] = u * d;
      v[2] = gx;
      v[3] = gx * d;
      v[4] = gx * u;
    }, s);
    sums = {s[0], s[1], s[2], s[3], s[4]};
  } else {
    double s[2];
    group_reduce<2, opmath_t>(L, g, [&](int64_t i, opmath_t (&v)[2]) {
      const opmath_t u = kLeaky ? ld(dy, i) * bn_leaky_slope(ld(y, i)) : ld(dy, i);
      v[0] = u;
      v[1] = u * (ld(x, i) - mu);
    }, s);
    sums.s1 = s[0];
    sums.sud = s[1];
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
    scalar_t* __restrict o_dy = grad_dy + base;
    scalar_t* __restrict o_x = grad_x + base;
    const scalar_t* __restrict gi = dy + base;
    const scalar_t* __restrict xi = x + base;
    const scalar_t* __restrict yi = kLeaky ? y + base : nullptr;
    const scalar_t* __restrict gg = kHasGx ? ggx + base : nullptr;
    for (int64_t i = 0; i < L.inner; ++i) {
      const opmath_t a = kLeaky ? bn_leaky_slope(ld(yi, i)) : opmath_t(1);
      const opmath_t u = ld(gi, i) * a;
      const opmath_t xv = ld(xi, i);
      const opmath_t gx = kHasGx ? ld(gg, i) : opmath_t(0);
      o_dy[i] = static_cast<scalar_t>(a * (p1 * gx + p2 * xv + p0));
      o_x[i] = static_cast<scalar_t>(qu * u + qg * gx + qx * xv + q0);
    }
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

// Per-group affine values as float64 (1 without affine), element g % A of the flat weight.
std::vector<double> group_affine(const std::optional<at::Tensor>& t, const BnGeometry& geo,
                                 double fill) {
  std::vector<double> out(geo.groups, fill);
  if (!(t.has_value() && t->defined())) return out;
  const at::Tensor c = t->contiguous();
  const int64_t a = c.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "group_affine", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t g = 0; g < geo.groups; ++g) out[g] = static_cast<double>(p[g % a]);
  });
  return out;
}

// Per-group statistics as float64: element [row * K + g % K] of a (rows, K) table.
void group_stats(const at::Tensor& mean, const at::Tensor& var, const BnGeometry& geo,
                 bool training, int64_t step, std::vector<double>* m, std::vector<double>* v) {
  m->resize(geo.groups);
  v->resize(geo.groups);
  const at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  const int64_t k = training ? geo.groups : mc.size(1);
  const int64_t row = training ? 0 : step;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mc.scalar_type(), "group_stats", [&] {
    const scalar_t* pm = mc.const_data_ptr<scalar_t>();
    const scalar_t* pv = vc.const_data_ptr<scalar_t>();
    for (int64_t g = 0; g < geo.groups; ++g) {
      (*m)[g] = static_cast<double>(pm[row * k + g % k]);
      (*v)[g] = static_cast<double>(pv[row * k + g % k]);
    }
  });
}

// Folds per-group values into the affine-gradient shape: sum over tasks (in task order) for a
// shared (C,) affine, one value per group for a per-task (T, C) one.
at::Tensor fold_affine(const std::vector<double>& per_group, const BnGeometry& geo,
                       const std::optional<at::Tensor>& weight, const at::Tensor& input) {
  at::Tensor out = at::empty(bn_affine_shape(geo, weight), input.options());
  const int64_t a = out.numel();
  std::vector<double> acc(a, 0.0);
  for (int64_t g = 0; g < geo.groups; ++g) acc[g % a] += per_group[g];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fold_affine", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < a; ++i) p[i] = static_cast<scalar_t>(acc[i]);
  });
  return out;
}

std::optional<at::Tensor> defined_or_none(const std::optional<at::Tensor>& t) {
  if (t.has_value() && t->defined()) return t;
  return std::nullopt;
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

// Shared body of the two forwards.
at::Tensor forward_impl(const at::Tensor& x, const BnGeometry& geo,
                        const std::vector<double>& gamma, const std::vector<double>& beta,
                        bool training, double eps, bool leaky, std::vector<double>* mean,
                        std::vector<double>* var) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  const BnLayout L = layout_of(geo);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    parallel_groups(geo, [&](int64_t g) {
      if (leaky) {
        forward_group<scalar_t, true>(po, px, L, g, training, eps, gamma[g], beta[g],
                                      &(*mean)[g], &(*var)[g]);
      } else {
        forward_group<scalar_t, false>(po, px, L, g, training, eps, gamma[g], beta[g],
                                       &(*mean)[g], &(*var)[g]);
      }
    });
  });
  return out;
}

// ---- entry points -------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t tasks, double eps, bool leaky_relu) {
  constexpr const char* op = "mamlpp_ext.batch_norm";
  const BnGeometry geo = check_bn_input(op, input, tasks);
  check_bn_affine(op, geo, input, weight, bias);
  check_bn_training_count(op, geo, input);
  const at::Tensor x = input.contiguous();
  std::vector<double> mean(geo.groups, 0.0), var(geo.groups, 0.0);
  at::Tensor out = forward_impl(x, geo, group_affine(weight, geo, 1.0), group_affine(bias, geo, 0.0),
                                /*training=*/true, eps, leaky_relu, &mean, &var);
  return {out, stats_tensor(mean, input), stats_tensor(var, input)};
}

at::Tensor batch_norm_eval_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               int64_t tasks, int64_t step, double eps, bool leaky_relu) {
  constexpr const char* op = "mamlpp_ext.batch_norm_eval";
  const BnGeometry geo = check_bn_input(op, input, tasks);
  check_bn_affine(op, geo, input, weight, bias);
  check_bn_running_stats(op, "running_mean", running_mean, geo, input, step);
  check_bn_running_stats(op, "running_var", running_var, geo, input, step);
  std::vector<double> mean, var;
  group_stats(running_mean, running_var, geo, /*training=*/false, step, &mean, &var);
  return forward_impl(input.contiguous(), geo, group_affine(weight, geo, 1.0),
                      group_affine(bias, geo, 0.0), /*training=*/false, eps, leaky_relu, &mean,
                      &var);
}

void batch_norm_update_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, int64_t tasks,
                                 int64_t step, int64_t count, double momentum) {
  constexpr const char* op = "mamlpp_ext.batch_norm_update_stats_";
  check_bn_update_stats(op, running_mean, running_var, mean, var, tasks, step, count);
  if (count == 0) return;
  const int64_t channels = running_mean.size(1);
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
    int64_t tasks, int64_t step, bool training, double eps) {
  constexpr const char* op = "mamlpp_ext._batch_norm_backward";
  const BnGeometry geo = check_bn_input(op, input, tasks);
  const auto w = defined_or_none(weight);
  check_bn_affine(op, geo, input, w, w);
  check_bn_like(op, "grad_out", grad_out, input);
  const auto y_opt = defined_or_none(out);
  if (y_opt) check_bn_like(op, "out", *y_opt, input);
  check_bn_stats(op, training, mean, var, geo, input, step);

  const at::Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const at::Tensor y = y_opt ? y_opt->contiguous() : at::Tensor();
  std::vector<double> mu, sigma2;
  group_stats(mean, var, geo, training, step, &mu, &sigma2);
  const auto gamma = group_affine(w, geo, 1.0);
  std::vector<double> s1(geo.groups, 0.0), s2(geo.groups, 0.0);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const BnLayout L = layout_of(geo);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_norm_backward_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* py = y.defined() ? y.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    parallel_groups(geo, [&](int64_t g) {
      const double invstd = bn_invstd<double>(sigma2[g], eps);
      if (py != nullptr) {
        backward_group<scalar_t, true>(pdx, pdy, px, py, L, g, training, mu[g], invstd, gamma[g],
                                       &s1[g], &s2[g]);
      } else {
        backward_group<scalar_t, false>(pdx, pdy, px, py, L, g, training, mu[g], invstd,
                                        gamma[g], &s1[g], &s2[g]);
      }
    });
  });
  return {dx, fold_affine(s2, geo, w, input), fold_affine(s1, geo, w, input)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward_cpu(
    const std::optional<at::Tensor>& grad_grad_input,
    const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_out,
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& out, const at::Tensor& mean, const at::Tensor& var,
    int64_t tasks, int64_t step, bool training, double eps) {
  constexpr const char* op = "mamlpp_ext._batch_norm_double_backward";
  const BnGeometry geo = check_bn_input(op, input, tasks);
  const auto w = defined_or_none(weight);
  check_bn_affine(op, geo, input, w, w);
  check_bn_like(op, "grad_out", grad_out, input);
  const auto y_opt = defined_or_none(out);
  if (y_opt) check_bn_like(op, "out", *y_opt, input);
  const auto ggx_opt = defined_or_none(grad_grad_input);
  if (ggx_opt) check_bn_like(op, "grad_grad_input", *ggx_opt, input);
  const auto affine_shape = bn_affine_shape(geo, w);
  for (const auto& [name, t] :
       {std::pair<const char*, const std::optional<at::Tensor>*>{"grad_grad_weight",
                                                                 &grad_grad_weight},
        {"grad_grad_bias", &grad_grad_bias}}) {
    if (!(t->has_value() && (*t)->defined())) continue;
    TORCH_CHECK((*t)->sizes() == at::IntArrayRef(affine_shape), op, ": expected ", name,
                " to have shape ", at::IntArrayRef(affine_shape), ", but got ", (*t)->sizes());
    TORCH_CHECK((*t)->scalar_type() == input.scalar_type(), op, ": expected ", name,
                " to have the dtype of input (", input.scalar_type(), "), but got ",
                (*t)->scalar_type());
    TORCH_CHECK((*t)->device() == input.device(), op, ": expected ", name,
                " to be on the device of input (", input.device(), "), but it is on ",
                (*t)->device());
  }
  check_bn_stats(op, training, mean, var, geo, input, step);

  const at::Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const at::Tensor y = y_opt ? y_opt->contiguous() : at::Tensor();
  const at::Tensor ggx = ggx_opt ? ggx_opt->contiguous() : at::Tensor();
  std::vector<double> mu, sigma2;
  group_stats(mean, var, geo, training, step, &mu, &sigma2);
  const auto gamma = group_affine(w, geo, 1.0);
  const auto ggamma = group_affine(defined_or_none(grad_grad_weight), geo, 0.0);
  const auto gbeta = group_affine(defined_or_none(grad_grad_bias), geo, 0.0);
  std::vector<double> dgamma(geo.groups, 0.0);
  at::Tensor grad_dy = at::empty(x.sizes(), x.options());
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const BnLayout L = layout_of(geo);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_norm_double_backward_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* py = y.defined() ? y.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pgg = ggx.defined() ? ggx.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o_dy = grad_dy.mutable_data_ptr<scalar_t>();
    scalar_t* o_x = grad_x.mutable_data_ptr<scalar_t>();
    parallel_groups(geo, [&](int64_t g) {
      const double invstd = bn_invstd<double>(sigma2[g], eps);
      auto run = [&](auto leaky, auto has_gx) {
        double_backward_group<scalar_t, decltype(leaky)::value, decltype(has_gx)::value>(
            o_dy, o_x, pgg, pdy, px, py, L, g, training, mu[g], invstd, gamma[g], ggamma[g],
            gbeta[g], &dgamma[g]);
      };
      using T_ = std::true_type;
      using F_ = std::false_type;
      if (py != nullptr) {
        if (pgg != nullptr) run(T_{}, T_{}); else run(T_{}, F_{});
      } else {
        if (pgg != nullptr) run(F_{}, T_{}); else run(F_{}, F_{});
      }
    });
  });
  return {grad_dy, grad_x, fold_affine(dgamma, geo, w, input)};
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
