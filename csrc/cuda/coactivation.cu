// coactivation on CUDA: every token adds its K*K (i, j) pairs with integer atomics — integer sums
// are order-independent, so the counts are deterministic. When an E x E tile of 32-bit counters
// fits in shared memory, each block counts its tokens there and flushes the tile once; otherwise
// the pairs go straight to the global int64 matrix.
#include "cuda/device_utils.cuh"

namespace grouter::cuda {
namespace {

constexpr int kThreads = 256;

template <typename id_t, bool kShared>
__global__ void count_pairs(const id_t* ids, int64_t T, int64_t K, int32_t E, unsigned long long* C) {
  extern __shared__ unsigned int tile[];
  const int64_t cells = int64_t(E) * E;
  if (kShared) {
    for (int64_t i = threadIdx.x; i < cells; i += blockDim.x) tile[i] = 0;
    __syncthreads();
  }
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < T; t += int64_t(gridDim.x) * blockDim.x) {
    const id_t* row = ids + t * K;
    for (int64_t a = 0; a < K; ++a) {
      const id_t i = row[a];
      if (i < 0 || i >= E) continue;  // only with checks off
      for (int64_t b = 0; b < K; ++b) {
        const id_t j = row[b];
        if (j < 0 || j >= E) continue;
        if (kShared)
          atomicAdd(&tile[int64_t(i) * E + j], 1u);
        else
          atomicAdd(&C[int64_t(i) * E + j], 1ull);
      }
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < cells; i += blockDim.x)
      if (tile[i]) atomicAdd(&C[i], static_cast<unsigned long long>(tile[i]));
  }
}

template <typename id_t>
cudaError_t launch(const id_t* ids, int64_t T, int64_t K, int64_t num_experts, int64_t* C,
                   cudaStream_t stream) {
  int device = 0, sms = 1, smem_optin = 48 << 10;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int32_t E = static_cast<int32_t>(num_experts);
  const int64_t tile_bytes = num_experts * num_experts * int64_t(sizeof(unsigned int));
  auto* out = reinterpret_cast<unsigned long long*>(C);
  // Few blocks: each flushes a whole tile, so more blocks than SMs only adds flush traffic. The
  // tile pays when its flush (at most grid * E^2 global atomics) is cheaper than the T * K^2
  // pairs added straight to global memory (large E with few tokens: it is not).
  const int grid = grid_for(T, kThreads, 2 * int64_t(sms));
  if (tile_bytes <= smem_optin && int64_t(grid) * num_experts * num_experts < T * K * K) {
    if (tile_bytes > (48 << 10)) {
      // The device's whole opt-in limit, not this call's size: the attribute is per function and
      // device-wide, so a smaller value set by another host thread could fail a larger launch.
      if (cudaError_t err = cudaFuncSetAttribute(count_pairs<id_t, true>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 smem_optin);
          err != cudaSuccess)
        return err;
    }
    count_pairs<id_t, true><<<grid, kThreads, static_cast<size_t>(tile_bytes), stream>>>(ids, T, K, E, out);
  } else {
    count_pairs<id_t, false><<<grid_for(T, kThreads, 16 * int64_t(sms)), kThreads, 0, stream>>>(ids, T, K, E, out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t coactivation(const void* ids, bool ids_int64, int64_t T, int64_t K, int64_t num_experts,
                         int64_t* C, cudaStream_t stream) {
  if (T == 0 || K == 0) return cudaSuccess;
  return ids_int64 ? launch(static_cast<const int64_t*>(ids), T, K, num_experts, C, stream)
                   : launch(static_cast<const int32_t*>(ids), T, K, num_experts, C, stream);
}

}  // namespace grouter::cuda
