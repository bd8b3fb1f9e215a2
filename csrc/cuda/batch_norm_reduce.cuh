// Block-wide reductions of the batch norm CUDA kernels: a Welford (count, mean, M2) triple and a
// fixed-size array of sums. Warp shuffles first, then one value per warp in shared memory, then
// the first warp. The order of every combination depends only on blockDim and the element-to-
// thread mapping, never on timing: results are bit-reproducible (no atomics).
#pragma once

#include <cuda_runtime.h>

namespace mamlpp {
namespace cuda {
namespace bn {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;  // blockDim.x <= 1024

// Running statistics of a set of values (Welford / Chan et al.).
template <typename T>
struct Welford {
  T count;
  T mean;
  T m2;  // sum of squared deviations from mean
};

template <typename T>
__device__ __forceinline__ Welford<T> welford_push(Welford<T> w, T x) {
  w.count += T(1);
  const T delta = x - w.mean;
  w.mean += delta / w.count;
  w.m2 += delta * (x - w.mean);
  return w;
}

template <typename T>
__device__ __forceinline__ Welford<T> welford_combine(const Welford<T>& a, const Welford<T>& b) {
  const T count = a.count + b.count;
  if (count == T(0)) return {T(0), T(0), T(0)};
  const T delta = b.mean - a.mean;
  const T fb = b.count / count;
  return {count, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.count * fb};
}

template <typename T>
__device__ __forceinline__ Welford<T> welford_warp(Welford<T> w) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Welford<T> o;
    o.count = __shfl_down_sync(0xffffffffu, w.count, offset);
    o.mean = __shfl_down_sync(0xffffffffu, w.mean, offset);
    o.m2 = __shfl_down_sync(0xffffffffu, w.m2, offset);
    w = welford_combine(w, o);
  }
  return w;
}

// Welford triple of the whole block, valid in thread 0. blockDim.x: a multiple of 32.
template <typename T>
__device__ Welford<T> welford_block(Welford<T> w) {
  __shared__ T s_count[kMaxWarps], s_mean[kMaxWarps], s_m2[kMaxWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  w = welford_warp(w);
  if (lane == 0) {
    s_count[warp] = w.count;
    s_mean[warp] = w.mean;
    s_m2[warp] = w.m2;
  }
  __syncthreads();
  const int nwarps = blockDim.x / kWarp;
  if (warp == 0) {
    w = lane < nwarps ? Welford<T>{s_count[lane], s_mean[lane], s_m2[lane]}
                      : Welford<T>{T(0), T(0), T(0)};
    w = welford_warp(w);
  }
  __syncthreads();
  return w;
}

// Sums of R values over the block, valid in thread 0. blockDim.x: a multiple of 32.
template <int R, typename T>
__device__ void sum_block(T (&v)[R]) {
  __shared__ T shared[R][kMaxWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      v[r] += __shfl_down_sync(0xffffffffu, v[r], offset);
    }
    if (lane == 0) shared[r][warp] = v[r];
  }
  __syncthreads();
  const int nwarps = blockDim.x / kWarp;
  if (warp == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      v[r] = lane < nwarps ? shared[r][lane] : T(0);
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        v[r] += __shfl_down_sync(0xffffffffu, v[r], offset);
      }
    }
  }
  __syncthreads();
}

}  // namespace bn
}  // namespace cuda
}  // namespace mamlpp
