// The value types the batch norm CUDA kernels reduce over a block with block_reduce (reduce.cuh):
// a Welford (count, mean, M2) triple for the forward statistics and a fixed array of R sums for
// the backward ops, each with its combining function.
#pragma once

#include <cuda_runtime.h>

#include "reduce.cuh"

namespace mamlpp {
namespace cuda {
namespace bn {

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

// The statistics of the union of two sets (Chan et al.); an empty set is the identity.
struct WelfordCombine {
  template <typename T>
  __device__ __forceinline__ Welford<T> operator()(const Welford<T>& a,
                                                   const Welford<T>& b) const {
    const T count = a.count + b.count;
    if (count == T(0)) return {T(0), T(0), T(0)};
    const T delta = b.mean - a.mean;
    const T fb = b.count / count;
    return {count, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.count * fb};
  }
};

// R running sums.
template <typename T, int R>
struct Sums {
  T v[R];
};

struct SumsCombine {
  template <typename T, int R>
  __device__ __forceinline__ Sums<T, R> operator()(Sums<T, R> a, const Sums<T, R>& b) const {
#pragma unroll
    for (int r = 0; r < R; ++r) a.v[r] += b.v[r];
    return a;
  }
};

}  // namespace bn
}  // namespace cuda
}  // namespace mamlpp
