// The one block-wide reduction of the CUDA kernels (LSLR and batch norm), generic over the value
// type and the combining function: warp shuffles, then one value per warp in shared memory, then
// the first warp. Which values are combined, and in which order, depends only on blockDim.x and
// the caller's element-to-thread mapping, never on timing: for a given launch configuration the
// result is bit-reproducible (no atomics). Value types: float, double, or any trivially copyable
// struct made of 32-bit words (e.g. a Welford triple or a fixed array of sums).
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

namespace mamlpp {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;  // blockDim.x <= 1024

// The value of lane (lane + offset) of the warp. Arithmetic types go through one shuffle; a
// struct is moved as its 32-bit words (bit-exact).
template <typename T>
__device__ __forceinline__ T shfl_down(const T& v, int offset) {
  if constexpr (std::is_arithmetic_v<T>) {
    return __shfl_down_sync(0xffffffffu, v, offset);
  } else {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) % sizeof(int) == 0,
                  "shfl_down: T must be trivially copyable and made of 32-bit words");
    constexpr int kWords = sizeof(T) / sizeof(int);
    int words[kWords];
    memcpy(words, &v, sizeof(T));
#pragma unroll
    for (int i = 0; i < kWords; ++i) words[i] = __shfl_down_sync(0xffffffffu, words[i], offset);
    T out;
    memcpy(&out, words, sizeof(T));
    return out;
  }
}

// Combines the values `v` of all threads of the block with `combine` (associative), in a fixed
// tree order; the result is valid in thread 0. Every thread of the block must call it.
// blockDim.x: a multiple of 32, at most 1024. `shared`: room for blockDim.x / 32 values of T in
// shared memory; the call ends with a barrier, so the caller may reuse it afterwards.
template <typename T, typename Combine>
__device__ T block_reduce(T v, const Combine& combine, T* shared) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = combine(v, shfl_down(v, offset));
  }
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    // Lanes >= nwarps hold no warp's value; they are never combined into a lane below nwarps.
    const int nwarps = blockDim.x / kWarpSize;
    v = shared[lane < nwarps ? lane : 0];
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const T other = shfl_down(v, offset);
      if (lane + offset < nwarps) v = combine(v, other);
    }
  }
  __syncthreads();
  return v;
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

// Sum of `v` over the block, valid in thread 0 (block_reduce with +). `shared`: at least 32 T's.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  return block_reduce(v, SumOp{}, shared);
}

}  // namespace cuda
}  // namespace mamlpp
