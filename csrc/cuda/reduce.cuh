// Deterministic block-wide sum: warp shuffles, then one value per warp in shared memory, then
// the first warp. The order of additions depends only on blockDim, never on timing, so the
// result is bit-reproducible (no atomics).
#pragma once

#include <cuda_runtime.h>

namespace mamlpp {
namespace cuda {

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum of `v` over the block; the result is valid in thread 0. blockDim.x must be a multiple of
// 32 and at most 1024. `shared` holds at least 32 T's.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x / kWarpSize;
  v = (threadIdx.x < nwarps) ? shared[lane] : T(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // `shared` may be reused by the caller
  return v;
}

}  // namespace cuda
}  // namespace mamlpp
