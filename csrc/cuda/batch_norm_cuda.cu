// CUDA kernels of the task-batched batch norm ops (batch_norm, batch_norm_eval,
// batch_norm_update_stats_, _batch_norm_backward, _batch_norm_double_backward).
//
// Every op is the same three-step pipeline over the G = T*C (task, channel) groups:
//   1. reduce:   grid (G, P); block (g, p) reduces chunk p of group g's M = N*H*W elements
//                (Welford for the forward statistics, R plain sums for the backward ops) and
//                writes one partial per block (P is chosen from the shape and the SM count so
//                that small-G, large-M shapes still fill the GPU);
//   2. finalize: one thread per group (or per affine entry, which then walks its tasks' groups in
//                task order) combines the P partials in a fixed order, forms the per-group
//                coefficients of mamlpp/batch_norm.h and folds the affine gradients over tasks;
//   3. apply:    one grid-stride elementwise pass that is an affine function of the element's
//                (u, Gx, x) with its group's coefficients.
// For the forward with P == 1 step 2 runs inside step 1. The block reductions are the one generic
// block_reduce (reduce.cuh) over the value types of batch_norm_reduce.cuh. No float atomics and a
// fixed combination order: on one GPU model (P depends on its SM count) results are bit-identical
// from run to run. Arithmetic is in opmath (float32 for float32/float16/bfloat16 input) where the
// CPU kernels accumulate in float64, so CUDA and CPU agree within float rounding, not bit for bit.
// Everything runs on the current stream with a launch check after each launch; workspace sizes
// depend only on shapes (no host synchronisation, graph-capturable). Argument checks, operands
// (contiguous NCHW copies of other layouts, channels_last included) and the dtype/flag dispatch
// are shared with the CPU entry points (mamlpp/batch_norm_checks.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "batch_norm_reduce.cuh"
#include "mamlpp/batch_norm.h"
#include "mamlpp/batch_norm_checks.h"

namespace mamlpp {
namespace cuda {
namespace {

constexpr int kBlockSize = 256;              // threads per block, every kernel
constexpr int64_t kMinElementsPerThread = 8;  // per reduction block before another is added
constexpr int kBlocksPerSm = 4;               // reduction grid target
constexpr int kApplyBlocksPerSm = 8;          // elementwise grid cap (grid-stride loops)

using Divider = at::cuda::detail::IntDivider<uint32_t>;

// Where group g's statistics are: element [offset + g % K] (BnArgs::stats_offset and
// stats_period: training offset 0, K = G; evaluation offset step * C, K = C of the (S, C) running
// tables).
template <typename opmath_t>
struct StatsRef {
  const opmath_t* mean;
  const opmath_t* var;
  int64_t offset;
  int64_t k;
  __device__ __forceinline__ opmath_t mean_of(int64_t g) const { return mean[offset + g % k]; }
  __device__ __forceinline__ opmath_t var_of(int64_t g) const { return var[offset + g % k]; }
};

// Group g's affine: element g % A of weight / bias (1 and 0 when absent).
template <typename scalar_t>
struct AffineRef {
  const scalar_t* weight;
  const scalar_t* bias;
  int64_t a;
  template <typename opmath_t>
  __device__ __forceinline__ opmath_t gamma(int64_t g) const {
    return weight != nullptr ? static_cast<opmath_t>(weight[g % a]) : opmath_t(1);
  }
  template <typename opmath_t>
  __device__ __forceinline__ opmath_t beta(int64_t g) const {
    return bias != nullptr ? static_cast<opmath_t>(bias[g % a]) : opmath_t(0);
  }
};

// Geometry of the reduction: group g's element j (< count) is at
// ((j / inner) * groups + g) * inner + j % inner; block (g, p) covers [p * chunk, (p+1) * chunk).
struct ReduceGeom {
  int64_t groups;
  uint32_t inner;
  uint32_t count;
  uint32_t chunk;
  Divider inner_div;
  __device__ __forceinline__ int64_t index(uint32_t j, int64_t g) const {
    const auto dm = inner_div.divmod(j);
    return (static_cast<int64_t>(dm.div) * groups + g) * inner + dm.mod;
  }
};

// Geometry of the elementwise passes: element i belongs to group (i / inner) % groups.
struct ApplyGeom {
  uint32_t numel;
  Divider inner_div;
  Divider groups_div;
  __device__ __forceinline__ uint32_t group(uint32_t i) const {
    return groups_div.divmod(inner_div.div(i)).mod;
  }
};

// ---- forward -----------------------------------------------------------------------------

// Writes group g's batch statistics and forward coefficients (scale, shift).
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ void finish_stats(int64_t g, const bn::Welford<opmath_t>& w,
                                             AffineRef<scalar_t> affine, opmath_t eps,
                                             opmath_t* mean_out, opmath_t* var_out,
                                             opmath_t* coeffs) {
  const opmath_t mean = w.count > opmath_t(0) ? w.mean : opmath_t(0);
  const opmath_t var = w.count > opmath_t(0) ? w.m2 / w.count : opmath_t(0);
  mean_out[g] = mean;
  var_out[g] = var;
  const auto k = bn_forward_coeffs<opmath_t>(mean, bn_invstd<opmath_t>(var, eps),
                                             affine.template gamma<opmath_t>(g),
                                             affine.template beta<opmath_t>(g));
  coeffs[2 * g] = k.scale;
  coeffs[2 * g + 1] = k.shift;
}

// Step 1 of the training forward: Welford statistics of block (g, p)'s chunk. With one chunk
// per group (gridDim.y == 1) it also finishes the group; otherwise it writes the partial
// (count, mean, m2) to partials[(g * P + p) * 3].
template <typename scalar_t, typename opmath_t>
__global__ void bn_stats_kernel(const scalar_t* __restrict__ x, ReduceGeom geo,
                                AffineRef<scalar_t> affine, opmath_t eps,
                                opmath_t* __restrict__ partials, opmath_t* __restrict__ mean_out,
                                opmath_t* __restrict__ var_out, opmath_t* __restrict__ coeffs) {
  const int64_t g = blockIdx.x;
  const uint32_t p = blockIdx.y;
  const uint32_t begin = p * geo.chunk;
  const uint32_t end = begin + geo.chunk < geo.count ? begin + geo.chunk : geo.count;
  bn::Welford<opmath_t> w{opmath_t(0), opmath_t(0), opmath_t(0)};
  for (uint32_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    w = bn::welford_push(w, static_cast<opmath_t>(x[geo.index(j, g)]));
  }
  __shared__ bn::Welford<opmath_t> shared[kMaxWarps];
  w = block_reduce(w, bn::WelfordCombine{}, shared);
  if (threadIdx.x != 0) return;
  if (gridDim.y == 1) {
    finish_stats(g, w, affine, eps, mean_out, var_out, coeffs);
  } else {
    opmath_t* out = partials + (g * gridDim.y + p) * 3;
    out[0] = w.count;
    out[1] = w.mean;
    out[2] = w.m2;
  }
}

// Step 2 of the training forward when a group has several chunks: one thread per group.
template <typename scalar_t, typename opmath_t>
__global__ void bn_stats_finalize_kernel(const opmath_t* __restrict__ partials, int64_t groups,
                                         int splits, AffineRef<scalar_t> affine, opmath_t eps,
                                         opmath_t* __restrict__ mean_out,
                                         opmath_t* __restrict__ var_out,
                                         opmath_t* __restrict__ coeffs) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  bn::Welford<opmath_t> w{opmath_t(0), opmath_t(0), opmath_t(0)};
  for (int p = 0; p < splits; ++p) {
    const opmath_t* in = partials + (g * splits + p) * 3;
    w = bn::WelfordCombine{}(w, bn::Welford<opmath_t>{in[0], in[1], in[2]});
  }
  finish_stats(g, w, affine, eps, mean_out, var_out, coeffs);
}

// Evaluation forward, step 2: coefficients from the running statistics, one thread per group.
template <typename scalar_t, typename opmath_t>
__global__ void bn_eval_coeffs_kernel(StatsRef<opmath_t> stats, int64_t groups,
                                      AffineRef<scalar_t> affine, opmath_t eps,
                                      opmath_t* __restrict__ coeffs) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const auto k = bn_forward_coeffs<opmath_t>(
      stats.mean_of(g), bn_invstd<opmath_t>(stats.var_of(g), eps),
      affine.template gamma<opmath_t>(g), affine.template beta<opmath_t>(g));
  coeffs[2 * g] = k.scale;
  coeffs[2 * g + 1] = k.shift;
}

// Step 3 of both forwards: out = act(x * scale + shift) (act: LeakyReLU with negative slope
// `slope` when kLeaky, else the identity).
template <typename scalar_t, typename opmath_t, bool kLeaky>
__global__ void bn_forward_apply_kernel(scalar_t* __restrict__ out,
                                        const scalar_t* __restrict__ x,
                                        const opmath_t* __restrict__ coeffs, opmath_t slope,
                                        ApplyGeom geo) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < geo.numel;
       i += blockDim.x * gridDim.x) {
    const opmath_t* c = coeffs + 2 * static_cast<int64_t>(geo.group(i));  // 64-bit product
    const opmath_t z = static_cast<opmath_t>(x[i]) * c[0] + c[1];
    out[i] = static_cast<scalar_t>(kLeaky ? bn_leaky(z, slope) : z);
  }
}

// ---- backward and double backward ---------------------------------------------------------

// The per-element terms of the backward sums. u = dy * slope(y); d = x - mean.
// R == 2: (u, u*d); R == 5 (with the upstream gradient Gx of dx): (u, u*d, Gx, Gx*d, Gx*u).
template <typename scalar_t, typename opmath_t, bool kLeaky, int R>
struct BnSumsOp {
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* y;    // the forward output when the LeakyReLU is fused
  const scalar_t* ggx;  // R == 5 only
  opmath_t negative_slope;  // of the fused activation (kLeaky)
  __device__ __forceinline__ void operator()(int64_t i, opmath_t mean,
                                             bn::Sums<opmath_t, R>& s) const {
    opmath_t(&v)[R] = s.v;
    const opmath_t slope =
        kLeaky ? bn_leaky_slope(static_cast<opmath_t>(y[i]), negative_slope) : opmath_t(1);
    const opmath_t u = static_cast<opmath_t>(dy[i]) * slope;
    const opmath_t d = static_cast<opmath_t>(x[i]) - mean;
    v[0] += u;
    v[1] += u * d;
    if constexpr (R == 5) {
      const opmath_t gx = static_cast<opmath_t>(ggx[i]);
      v[2] += gx;
      v[3] += gx * d;
      v[4] += gx * u;
    }
  }
};

// Step 1 of the backward ops: R sums of block (g, p)'s chunk into partials[(g * P + p) * R].
template <int R, typename opmath_t, typename Op>
__global__ void bn_sums_kernel(Op op, StatsRef<opmath_t> stats, ReduceGeom geo,
                               opmath_t* __restrict__ partials) {
  const int64_t g = blockIdx.x;
  const uint32_t p = blockIdx.y;
  const uint32_t begin = p * geo.chunk;
  const uint32_t end = begin + geo.chunk < geo.count ? begin + geo.chunk : geo.count;
  const opmath_t mean = stats.mean_of(g);
  bn::Sums<opmath_t, R> v;
#pragma unroll
  for (int r = 0; r < R; ++r) v.v[r] = opmath_t(0);
  for (uint32_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    op(geo.index(j, g), mean, v);
  }
  __shared__ bn::Sums<opmath_t, R> shared[kMaxWarps];
  v = block_reduce(v, bn::SumsCombine{}, shared);
  if (threadIdx.x == 0) {
    opmath_t* out = partials + (g * gridDim.y + p) * R;
#pragma unroll
    for (int r = 0; r < R; ++r) out[r] = v.v[r];
  }
}

// Sum r of group g over its P partials, in chunk order.
template <int R, typename opmath_t>
__device__ __forceinline__ opmath_t group_total(const opmath_t* partials, int64_t g, int splits,
                                                int r) {
  opmath_t s = opmath_t(0);
  for (int p = 0; p < splits; ++p) s += partials[(g * splits + p) * R + r];
  return s;
}

// Step 2 of the backward: thread a (< A, the affine-gradient length) handles the groups
// g = a, a + A, ... (its tasks, in order): backward coefficients (ku, kx, k0) per group, and
// dgamma[a] = sum S2, dbeta[a] = sum S1 over those groups.
template <typename scalar_t, typename opmath_t>
__global__ void bn_backward_finalize_kernel(const opmath_t* __restrict__ partials, int splits,
                                            StatsRef<opmath_t> stats, AffineRef<scalar_t> affine,
                                            int64_t groups, int64_t count, bool training,
                                            opmath_t eps, int64_t a_len,
                                            opmath_t* __restrict__ coeffs,
                                            scalar_t* __restrict__ dgamma,
                                            scalar_t* __restrict__ dbeta) {
  const int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= a_len) return;
  opmath_t acc_gamma = opmath_t(0), acc_beta = opmath_t(0);
  for (int64_t g = a; g < groups; g += a_len) {
    const opmath_t s1 = group_total<2>(partials, g, splits, 0);
    const opmath_t sud = group_total<2>(partials, g, splits, 1);
    const opmath_t invstd = bn_invstd<opmath_t>(stats.var_of(g), eps);
    const auto k = bn_backward_coeffs<opmath_t>(stats.mean_of(g), invstd,
                                                affine.template gamma<opmath_t>(g), s1, sud,
                                                count, training);
    coeffs[3 * g] = k.ku;
    coeffs[3 * g + 1] = k.kx;
    coeffs[3 * g + 2] = k.k0;
    acc_gamma += invstd * sud;
    acc_beta += s1;
  }
  dgamma[a] = static_cast<scalar_t>(acc_gamma);
  dbeta[a] = static_cast<scalar_t>(acc_beta);
}

// Step 3 of the backward: dx = ku * u + kx * x + k0.
template <typename scalar_t, typename opmath_t, bool kLeaky>
__global__ void bn_backward_apply_kernel(scalar_t* __restrict__ dx,
                                         const scalar_t* __restrict__ dy,
                                         const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ y,
                                         const opmath_t* __restrict__ coeffs,
                                         opmath_t negative_slope, ApplyGeom geo) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < geo.numel;
       i += blockDim.x * gridDim.x) {
    const uint32_t g = geo.group(i);
    const opmath_t slope =
        kLeaky ? bn_leaky_slope(static_cast<opmath_t>(y[i]), negative_slope) : opmath_t(1);
    const opmath_t u = static_cast<opmath_t>(dy[i]) * slope;
    const opmath_t* c = coeffs + 3 * static_cast<int64_t>(g);  // 64-bit: 3 * g may pass 2^32
    dx[i] = static_cast<scalar_t>(c[0] * u + c[1] * static_cast<opmath_t>(x[i]) + c[2]);
  }
}

constexpr int kDbwCoeffs = 7;  // p1, p2, p0, qu, qg, qx, q0

// Step 2 of the double backward (layout as bn_backward_finalize_kernel). ggw, ggb: the upstream
// gradients of dgamma / dbeta (length A, or null for zero).
template <typename scalar_t, typename opmath_t, int R>
__global__ void bn_double_backward_finalize_kernel(
    const opmath_t* __restrict__ partials, int splits, StatsRef<opmath_t> stats,
    AffineRef<scalar_t> affine, const scalar_t* __restrict__ ggw,
    const scalar_t* __restrict__ ggb, int64_t groups, int64_t count, bool training, opmath_t eps,
    int64_t a_len, opmath_t* __restrict__ coeffs, scalar_t* __restrict__ grad_gamma) {
  const int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= a_len) return;
  const opmath_t ggamma = ggw != nullptr ? static_cast<opmath_t>(ggw[a]) : opmath_t(0);
  const opmath_t gbeta = ggb != nullptr ? static_cast<opmath_t>(ggb[a]) : opmath_t(0);
  opmath_t acc = opmath_t(0);
  for (int64_t g = a; g < groups; g += a_len) {
    BnDoubleBackwardSums<opmath_t> s;
    s.s1 = group_total<R>(partials, g, splits, 0);
    s.sud = group_total<R>(partials, g, splits, 1);
    s.sg = R == 5 ? group_total<R>(partials, g, splits, 2) : opmath_t(0);
    s.sgd = R == 5 ? group_total<R>(partials, g, splits, 3) : opmath_t(0);
    s.a = R == 5 ? group_total<R>(partials, g, splits, 4) : opmath_t(0);
    const auto k = bn_double_backward_coeffs<opmath_t>(
        stats.mean_of(g), bn_invstd<opmath_t>(stats.var_of(g), eps),
        affine.template gamma<opmath_t>(g), ggamma, gbeta, s, count, training);
    opmath_t* c = coeffs + kDbwCoeffs * g;
    c[0] = k.p1;
    c[1] = k.p2;
    c[2] = k.p0;
    c[3] = k.qu;
    c[4] = k.qg;
    c[5] = k.qx;
    c[6] = k.q0;
    acc += k.dgamma;
  }
  grad_gamma[a] = static_cast<scalar_t>(acc);
}

// Step 3 of the double backward: grad_dy = a * (p1 Gx + p2 x + p0), grad_x = qu u + qg Gx + qx x + q0.
template <typename scalar_t, typename opmath_t, bool kLeaky, bool kHasGx>
__global__ void bn_double_backward_apply_kernel(
    scalar_t* __restrict__ grad_dy, scalar_t* __restrict__ grad_x,
    const scalar_t* __restrict__ ggx, const scalar_t* __restrict__ dy,
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
    const opmath_t* __restrict__ coeffs, opmath_t negative_slope, ApplyGeom geo) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < geo.numel;
       i += blockDim.x * gridDim.x) {
    const opmath_t* c = coeffs + kDbwCoeffs * static_cast<int64_t>(geo.group(i));  // 64-bit product
    const opmath_t slope =
        kLeaky ? bn_leaky_slope(static_cast<opmath_t>(y[i]), negative_slope) : opmath_t(1);
    const opmath_t u = static_cast<opmath_t>(dy[i]) * slope;
    const opmath_t xv = static_cast<opmath_t>(x[i]);
    const opmath_t gx = kHasGx ? static_cast<opmath_t>(ggx[i]) : opmath_t(0);
    grad_dy[i] = static_cast<scalar_t>(slope * (c[0] * gx + c[1] * xv + c[2]));
    grad_x[i] = static_cast<scalar_t>(c[3] * u + c[4] * gx + c[5] * xv + c[6]);
  }
}

// ---- running statistics -------------------------------------------------------------------

// One thread per channel c: row `step` of the running tables moves towards the mean over tasks
// of the batch mean and of the unbiased batch variance.
template <typename run_t, typename stat_t>
__global__ void bn_update_stats_kernel(run_t* running_mean, int64_t rm_s0, int64_t rm_s1,
                                       run_t* running_var, int64_t rv_s0, int64_t rv_s1,
                                       const stat_t* __restrict__ mean,
                                       const stat_t* __restrict__ var, int64_t tasks,
                                       int64_t channels, int64_t step, int64_t count,
                                       double momentum) {
  using acc_t = at::opmath_type<stat_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  acc_t bm = acc_t(0), bv = acc_t(0);
  for (int64_t t = 0; t < tasks; ++t) {
    bm += static_cast<acc_t>(mean[t * channels + c]);
    bv += bn_unbiased_var<acc_t>(static_cast<acc_t>(var[t * channels + c]), count);
  }
  const acc_t m = static_cast<acc_t>(momentum);
  run_t& rm = running_mean[step * rm_s0 + c * rm_s1];
  run_t& rv = running_var[step * rv_s0 + c * rv_s1];
  rm = static_cast<run_t>(bn_running_update<acc_t>(static_cast<acc_t>(rm), bm / tasks, m));
  rv = static_cast<run_t>(bn_running_update<acc_t>(static_cast<acc_t>(rv), bv / tasks, m));
}

// ---- host helpers -------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The 32-bit indexing of the kernels (grid-stride loops included, which step past numel):
// per-tensor element counts below 2^31.
void check_index_range(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.numel() <= static_cast<int64_t>(std::numeric_limits<int32_t>::max()), op,
              ": the CUDA kernels index with 32 bits; input has ", input.numel(),
              " elements (at most 2^31 - 1 supported)");
}

// Chunks per group of the reduction grid, and the ReduceGeom.
ReduceGeom reduce_geom(const BnGeometry& geo, int* splits) {
  const int64_t count = geo.count();
  const int64_t want = ceil_div(static_cast<int64_t>(kBlocksPerSm) * sm_count(),
                                std::max<int64_t>(geo.groups, 1));
  const int64_t most = std::max<int64_t>(1, count / (kBlockSize * kMinElementsPerThread));
  const int64_t p = std::clamp<int64_t>(want, 1, std::min<int64_t>(most, 65535));
  *splits = static_cast<int>(p);
  ReduceGeom rg;
  rg.groups = geo.groups;
  rg.inner = static_cast<uint32_t>(geo.inner);
  rg.count = static_cast<uint32_t>(count);
  rg.chunk = static_cast<uint32_t>(ceil_div(std::max<int64_t>(count, 1), p));
  rg.inner_div = Divider(static_cast<uint32_t>(std::max<int64_t>(geo.inner, 1)));
  return rg;
}

ApplyGeom apply_geom(const BnGeometry& geo, int64_t numel) {
  return {static_cast<uint32_t>(numel),
          Divider(static_cast<uint32_t>(std::max<int64_t>(geo.inner, 1))),
          Divider(static_cast<uint32_t>(std::max<int64_t>(geo.groups, 1)))};
}

dim3 apply_grid(int64_t numel) {
  return dim3(static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(numel, kBlockSize),
                           static_cast<int64_t>(kApplyBlocksPerSm) * sm_count()))));
}

// The grid of the reduction kernels: one block row per group. gridDim.x holds at most 2^31 - 1
// blocks; more groups than that pass check_index_range only when the input is empty (N = 0).
dim3 reduce_grid(int64_t groups, int splits) {
  TORCH_CHECK(groups <= static_cast<int64_t>(std::numeric_limits<int32_t>::max()),
              "mamlpp_ext batch norm (CUDA): ", groups,
              " (task, channel) groups exceed the grid limit of 2^31 - 1 blocks");
  return dim3(static_cast<unsigned>(groups), static_cast<unsigned>(splits));
}

dim3 thread_grid(int64_t n) {
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, ceil_div(n, kBlockSize))));
}

template <typename scalar_t>
AffineRef<scalar_t> affine_ref(const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias) {
  return {weight ? weight->const_data_ptr<scalar_t>() : nullptr,
          bias ? bias->const_data_ptr<scalar_t>() : nullptr, weight ? weight->numel() : 1};
}

template <typename opmath_t>
StatsRef<opmath_t> stats_ref(const BnArgs& args) {
  return {args.mean.const_data_ptr<opmath_t>(), args.var.const_data_ptr<opmath_t>(),
          args.stats_offset, args.stats_period};
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}
template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<scalar_t>() : nullptr;
}

// The two forwards share steps 1-3; args.training picks batch or running statistics. Training
// writes the batch statistics to mean_out / var_out.
at::Tensor forward_impl(const BnArgs& args, at::Tensor* mean_out, at::Tensor* var_out) {
  const at::Tensor& x = args.input;
  const BnGeometry& geo = args.geo;
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (geo.groups == 0) return out;
  const auto opmath_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor coeffs = at::empty({geo.groups, 2}, x.options().dtype(opmath_dtype));
  const auto stream = at::cuda::getCurrentCUDAStream();
  bn_dispatch(x.scalar_type(), args.activation, [&](auto type, auto act) {
    using scalar_t = typename decltype(type)::type;
    using opmath_t = at::opmath_type<scalar_t>;
    const auto affine = affine_ref<scalar_t>(args.weight, args.bias);
    const auto eps = static_cast<opmath_t>(args.eps);
    if (args.training) {
      int splits = 1;
      const ReduceGeom rg = reduce_geom(geo, &splits);
      at::Tensor partials;
      if (splits > 1) partials = at::empty({geo.groups, splits, 3}, coeffs.options());
      bn_stats_kernel<scalar_t, opmath_t>
          <<<reduce_grid(geo.groups, splits), kBlockSize, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), rg, affine, eps,
              splits > 1 ? partials.mutable_data_ptr<opmath_t>() : nullptr,
              mean_out->mutable_data_ptr<opmath_t>(), var_out->mutable_data_ptr<opmath_t>(),
              coeffs.mutable_data_ptr<opmath_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (splits > 1) {
        bn_stats_finalize_kernel<scalar_t, opmath_t>
            <<<thread_grid(geo.groups), kBlockSize, 0, stream>>>(
                partials.const_data_ptr<opmath_t>(), geo.groups, splits, affine, eps,
                mean_out->mutable_data_ptr<opmath_t>(), var_out->mutable_data_ptr<opmath_t>(),
                coeffs.mutable_data_ptr<opmath_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      bn_eval_coeffs_kernel<scalar_t, opmath_t><<<thread_grid(geo.groups), kBlockSize, 0, stream>>>(
          stats_ref<opmath_t>(args), geo.groups, affine, eps, coeffs.mutable_data_ptr<opmath_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (x.numel() > 0) {
      bn_forward_apply_kernel<scalar_t, opmath_t, decltype(act)::value>
          <<<apply_grid(x.numel()), kBlockSize, 0, stream>>>(
              out.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              coeffs.const_data_ptr<opmath_t>(), static_cast<opmath_t>(args.negative_slope),
              apply_geom(geo, x.numel()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

// ---- entry points -------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t tasks, double eps,
    std::optional<double> negative_slope) {
  const BnArgs args = batch_norm_args(input, weight, bias, tasks, eps, negative_slope);
  check_index_range("mamlpp_ext.batch_norm", input);
  c10::cuda::CUDAGuard guard(input.device());
  const auto stats_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  at::Tensor mean = at::empty({args.geo.groups}, stats_options);
  at::Tensor var = at::empty({args.geo.groups}, stats_options);
  at::Tensor out = forward_impl(args, &mean, &var);
  return {out, mean, var};
}

at::Tensor batch_norm_eval_cuda(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias,
                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                int64_t tasks, int64_t step, double eps,
                                std::optional<double> negative_slope) {
  const BnArgs args = batch_norm_eval_args(input, weight, bias, running_mean, running_var, tasks,
                                           step, eps, negative_slope);
  check_index_range("mamlpp_ext.batch_norm_eval", input);
  c10::cuda::CUDAGuard guard(input.device());
  return forward_impl(args, nullptr, nullptr);
}

void batch_norm_update_stats_cuda(const at::Tensor& running_mean, const at::Tensor& running_var,
                                  const at::Tensor& mean, const at::Tensor& var, int64_t tasks,
                                  int64_t step, int64_t count, double momentum) {
  const int64_t channels = check_batch_norm_update_stats_args(running_mean, running_var, mean,
                                                              var, tasks, step, count);
  if (count == 0 || channels == 0) return;
  c10::cuda::CUDAGuard guard(running_mean.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                  "batch_norm_update_stats_cuda", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(mc.scalar_type(), "batch_norm_update_stats_cuda_stats", [&] {
      bn_update_stats_kernel<run_t, scalar_t><<<thread_grid(channels), kBlockSize, 0, stream>>>(
          running_mean.mutable_data_ptr<run_t>(), running_mean.stride(0), running_mean.stride(1),
          running_var.mutable_data_ptr<run_t>(), running_var.stride(0), running_var.stride(1),
          mc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(), tasks, channels, step,
          count, momentum);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& out, const at::Tensor& mean, const at::Tensor& var,
    int64_t tasks, int64_t step, bool training, double eps, double negative_slope) {
  const BnArgs args = batch_norm_backward_args(grad_out, input, weight, out, mean, var, tasks,
                                               step, training, eps, negative_slope);
  check_index_range("mamlpp_ext._batch_norm_backward", input);
  c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor& x = args.input;
  const BnGeometry& geo = args.geo;
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dgamma = at::empty(args.affine_shape, x.options());
  at::Tensor dbeta = at::empty(args.affine_shape, x.options());
  if (geo.groups == 0) return {dx, dgamma, dbeta};
  const int64_t a_len = dgamma.numel();
  const auto stream = at::cuda::getCurrentCUDAStream();
  int splits = 1;
  const ReduceGeom rg = reduce_geom(geo, &splits);
  const auto opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor partials = at::empty({geo.groups, splits, 2}, opts);
  at::Tensor coeffs = at::empty({geo.groups, 3}, opts);
  bn_dispatch(x.scalar_type(), args.activation, [&](auto type, auto act) {
    using scalar_t = typename decltype(type)::type;
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr bool kLeaky = decltype(act)::value;
    const auto stats = stats_ref<opmath_t>(args);
    const auto slope = static_cast<opmath_t>(args.negative_slope);
    const scalar_t* py = data_or_null<scalar_t>(args.out);
    const BnSumsOp<scalar_t, opmath_t, kLeaky, 2> sop{args.grad_out.const_data_ptr<scalar_t>(),
                                                      x.const_data_ptr<scalar_t>(), py, nullptr,
                                                      slope};
    bn_sums_kernel<2, opmath_t>
        <<<reduce_grid(geo.groups, splits), kBlockSize, 0, stream>>>(
            sop, stats, rg, partials.mutable_data_ptr<opmath_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_backward_finalize_kernel<scalar_t, opmath_t><<<thread_grid(a_len), kBlockSize, 0, stream>>>(
        partials.const_data_ptr<opmath_t>(), splits, stats,
        affine_ref<scalar_t>(args.weight, std::nullopt), geo.groups, geo.count(), args.training,
        static_cast<opmath_t>(args.eps), a_len, coeffs.mutable_data_ptr<opmath_t>(),
        dgamma.mutable_data_ptr<scalar_t>(), dbeta.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (x.numel() > 0) {
      bn_backward_apply_kernel<scalar_t, opmath_t, kLeaky>
          <<<apply_grid(x.numel()), kBlockSize, 0, stream>>>(
              dx.mutable_data_ptr<scalar_t>(), args.grad_out.const_data_ptr<scalar_t>(),
              x.const_data_ptr<scalar_t>(), py, coeffs.const_data_ptr<opmath_t>(), slope,
              apply_geom(geo, x.numel()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dx, dgamma, dbeta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward_cuda(
    const std::optional<at::Tensor>& grad_grad_input,
    const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_out,
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& out, const at::Tensor& mean, const at::Tensor& var,
    int64_t tasks, int64_t step, bool training, double eps, double negative_slope) {
  const BnArgs args = batch_norm_double_backward_args(
      grad_grad_input, grad_grad_weight, grad_grad_bias, grad_out, input, weight, out, mean, var,
      tasks, step, training, eps, negative_slope);
  check_index_range("mamlpp_ext._batch_norm_double_backward", input);
  c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor& x = args.input;
  const BnGeometry& geo = args.geo;
  at::Tensor grad_dy = at::empty(x.sizes(), x.options());
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_gamma = at::empty(args.affine_shape, x.options());
  if (geo.groups == 0) return {grad_dy, grad_x, grad_gamma};
  const bool has_gx = args.grad_grad_input.defined();
  const auto stream = at::cuda::getCurrentCUDAStream();
  int splits = 1;
  const ReduceGeom rg = reduce_geom(geo, &splits);
  const auto opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor partials = at::empty({geo.groups, splits, has_gx ? 5 : 2}, opts);
  at::Tensor coeffs = at::empty({geo.groups, kDbwCoeffs}, opts);
  bn_dispatch(x.scalar_type(), args.activation, has_gx, [&](auto type, auto act, auto gx) {
    using scalar_t = typename decltype(type)::type;
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr bool kLeaky = decltype(act)::value;
    constexpr bool kHasGx = decltype(gx)::value;
    constexpr int R = kHasGx ? 5 : 2;
    const auto stats = stats_ref<opmath_t>(args);
    const auto slope = static_cast<opmath_t>(args.negative_slope);
    const scalar_t* py = data_or_null<scalar_t>(args.out);
    const scalar_t* pgx = data_or_null<scalar_t>(args.grad_grad_input);
    const BnSumsOp<scalar_t, opmath_t, kLeaky, R> sop{args.grad_out.const_data_ptr<scalar_t>(),
                                                      x.const_data_ptr<scalar_t>(), py, pgx,
                                                      slope};
    bn_sums_kernel<R, opmath_t>
        <<<reduce_grid(geo.groups, splits), kBlockSize, 0, stream>>>(
            sop, stats, rg, partials.mutable_data_ptr<opmath_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t a_len = grad_gamma.numel();
    bn_double_backward_finalize_kernel<scalar_t, opmath_t, R>
        <<<thread_grid(a_len), kBlockSize, 0, stream>>>(
            partials.const_data_ptr<opmath_t>(), splits, stats,
            affine_ref<scalar_t>(args.weight, std::nullopt),
            data_or_null<scalar_t>(args.grad_grad_weight),
            data_or_null<scalar_t>(args.grad_grad_bias), geo.groups, geo.count(), args.training,
            static_cast<opmath_t>(args.eps), a_len, coeffs.mutable_data_ptr<opmath_t>(),
            grad_gamma.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (x.numel() > 0) {
      bn_double_backward_apply_kernel<scalar_t, opmath_t, kLeaky, kHasGx>
          <<<apply_grid(x.numel()), kBlockSize, 0, stream>>>(
              grad_dy.mutable_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), pgx,
              args.grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), py,
              coeffs.const_data_ptr<opmath_t>(), slope, apply_geom(geo, x.numel()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_dy, grad_x, grad_gamma};
}

}  // namespace
}  // namespace cuda
}  // namespace mamlpp

TORCH_LIBRARY_IMPL(mamlpp_ext, CUDA, m) {
  m.impl("batch_norm", &mamlpp::cuda::batch_norm_cuda);
  m.impl("batch_norm_eval", &mamlpp::cuda::batch_norm_eval_cuda);
  m.impl("batch_norm_update_stats_", &mamlpp::cuda::batch_norm_update_stats_cuda);
  m.impl("_batch_norm_backward", &mamlpp::cuda::batch_norm_backward_cuda);
  m.impl("_batch_norm_double_backward", &mamlpp::cuda::batch_norm_double_backward_cuda);
}
