// Build information for the CUDA half of the extension (reported by _cuda_version).
#include <cuda_runtime_api.h>

#include <cstdint>

namespace mamlpp {

int64_t cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace mamlpp
