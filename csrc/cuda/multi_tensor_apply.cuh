// Multi-tensor apply: one kernel launch processes a whole list of tensors.
//
// The host walks the list, cuts every tensor into chunks of kChunkSize elements and packs, into a
// metadata struct passed *by value* as a kernel argument, the tensors' addresses and sizes and a
// block -> (tensor, chunk) map. When the struct is full (kMaxTensors tensors or kMaxBlocks
// blocks) it launches and starts a new one, carrying a half-processed tensor over; a list that
// fits (the ten fast-weight tensors of the MAML++ network, for example) is one launch. Nothing is
// copied to the device and nothing is allocated, so the launch is CUDA-graph capturable.
// Per-tensor scalars that depend on data (learned rates) are read by the kernels from device
// memory, never on the host.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <vector>

namespace mamlpp {
namespace cuda {

constexpr int kBlockSize = 512;
constexpr int64_t kChunkSize = 65536;
constexpr int kILP = 4;  // elements per thread per vectorised access
constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;

// Kernel-argument metadata for up to kMaxTensors tensors of kDepth operands each
// (3,292 bytes at kDepth = 3: under the classic 4 KiB kernel-parameter limit).
template <int kDepth>
struct TensorListMetadata {
  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t row[kMaxTensors];               // elements per task row (for broadcast operands)
  int32_t list_index[kMaxTensors];        // position k of the tensor in the op's list
  uint8_t broadcast[kDepth][kMaxTensors];  // operand read as data[i % row]
  uint8_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};

// One tensor of the list as the host describes it to the launcher.
template <int kDepth>
struct ListEntry {
  void* ptr[kDepth];
  bool broadcast[kDepth];
  int64_t numel;
  int64_t row;
  int32_t index;
};

template <int kDepth, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_apply_kernel(const TensorListMetadata<kDepth> meta, Functor functor, Args... args) {
  functor(meta, args...);
}

template <int kDepth, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<ListEntry<kDepth>>& entries, Functor functor,
                        Args... args) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  TensorListMetadata<kDepth> meta;
  int ntensors = 0;
  int nblocks = 0;
  auto launch = [&]() {
    multi_tensor_apply_kernel<kDepth><<<nblocks, kBlockSize, 0, stream>>>(meta, functor, args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  for (const auto& e : entries) {
    if (e.numel == 0) continue;
    for (int d = 0; d < kDepth; ++d) {
      meta.addresses[d][ntensors] = e.ptr[d];
      meta.broadcast[d][ntensors] = e.broadcast[d] ? 1 : 0;
    }
    meta.numel[ntensors] = e.numel;
    meta.row[ntensors] = e.row;
    meta.list_index[ntensors] = e.index;
    ++ntensors;
    const int64_t chunks = (e.numel + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[nblocks] = static_cast<uint8_t>(ntensors - 1);
      meta.block_to_chunk[nblocks] = static_cast<int32_t>(c);
      ++nblocks;
      const bool last_chunk = c == chunks - 1;
      if (nblocks == kMaxBlocks || (ntensors == kMaxTensors && last_chunk)) {
        launch();
        nblocks = 0;
        if (last_chunk) {
          ntensors = 0;
        } else {  // carry the unfinished tensor over as slot 0
          for (int d = 0; d < kDepth; ++d) {
            meta.addresses[d][0] = meta.addresses[d][ntensors - 1];
            meta.broadcast[d][0] = meta.broadcast[d][ntensors - 1];
          }
          meta.numel[0] = meta.numel[ntensors - 1];
          meta.row[0] = meta.row[ntensors - 1];
          meta.list_index[0] = meta.list_index[ntensors - 1];
          ntensors = 1;
        }
      }
    }
  }
  if (nblocks > 0) launch();
}

// A vector of N elements, aligned for one wide load/store.
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
};

template <int N, typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

}  // namespace cuda
}  // namespace mamlpp
