// routing_plan on CUDA: keys = expert ids, values = slot index t*K+k; CUB's device radix sort
// (histogram -> exclusive scan -> stable scatter, onesweep) orders the slots expert-major and,
// being stable, ascending (t, k) inside each expert. A scatter kernel then writes sorted_tokens
// and row_of, and one thread per expert finds its first row by binary search. No atomic decides
// any order and nothing is copied back to the host.
#include "cuda/device_utils.cuh"

#include <cub/device/device_radix_sort.cuh>

namespace grouter::cuda {
namespace {

constexpr int kThreads = 256;

// Bits of the largest key: E - 1 when the ids were validated, else E (the bucket of invalid ids,
// reachable only with the checks switched off). E = 256 validated sorts 8 bits: one radix pass.
int key_bits(int64_t num_experts, bool ids_checked) {
  const int64_t largest = ids_checked ? num_experts - 1 : num_experts;
  int bits = 1;
  while ((int64_t{1} << bits) <= largest) ++bits;
  return bits;
}

template <typename id_t>
__global__ void make_keys(const id_t* ids, int64_t n, int32_t E, int32_t* keys, int32_t* slots) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const id_t e = ids[i];
    keys[i] = (e >= 0 && e < E) ? int32_t(e) : E;
    slots[i] = int32_t(i);
  }
}

__global__ void scatter_rows(const int32_t* sorted_slots, int64_t n, int32_t K, int32_t* sorted_tokens,
                             int32_t* row_of) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < n; r += int64_t(gridDim.x) * blockDim.x) {
    const int32_t slot = sorted_slots[r];
    sorted_tokens[r] = slot / K;
    row_of[slot] = int32_t(r);
  }
}

__global__ void find_offsets(const int32_t* sorted_keys, int64_t n, int32_t E, int64_t* offsets) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e > E) return;
  int64_t lo = 0, hi = n;  // first row whose key is >= e
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted_keys[mid] < e) lo = mid + 1; else hi = mid;
  }
  offsets[e] = lo;
}

size_t round_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// CUB's temporary storage for sorting n pairs in double buffers (ours: keys and slots, in and
// out), so CUB allocates no alternate buffers of its own.
size_t cub_bytes(int64_t n, int bits) {
  size_t bytes = 0;
  cub::DoubleBuffer<int32_t> keys(nullptr, nullptr), values(nullptr, nullptr);
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, values, static_cast<int>(n), 0, bits);
  return bytes;
}

}  // namespace

size_t routing_plan_temp_bytes(int64_t n, int64_t num_experts, bool ids_checked) {
  return 4 * round_up(sizeof(int32_t) * n) + cub_bytes(n, key_bits(num_experts, ids_checked));
}

cudaError_t routing_plan(const void* ids, bool ids_int64, bool ids_checked, int64_t T, int64_t K,
                         int64_t num_experts, int32_t* sorted_tokens, int32_t* row_of, int64_t* offsets,
                         void* temp, size_t temp_bytes, cudaStream_t stream) {
  const int64_t n = T * K;
  const int32_t E = static_cast<int32_t>(num_experts);
  if (n == 0) return cudaMemsetAsync(offsets, 0, sizeof(int64_t) * (num_experts + 1), stream);
  const int bits = key_bits(num_experts, ids_checked);
  const size_t arr = round_up(sizeof(int32_t) * n);
  if (temp_bytes < 4 * arr) return cudaErrorInvalidValue;
  char* p = static_cast<char*>(temp);
  cub::DoubleBuffer<int32_t> keys(reinterpret_cast<int32_t*>(p), reinterpret_cast<int32_t*>(p + arr));
  cub::DoubleBuffer<int32_t> slots(reinterpret_cast<int32_t*>(p + 2 * arr), reinterpret_cast<int32_t*>(p + 3 * arr));
  size_t cub_size = temp_bytes - 4 * arr;  // the caller sized temp by routing_plan_temp_bytes
  const int grid = grid_for(n, kThreads);
  if (ids_int64)
    make_keys<<<grid, kThreads, 0, stream>>>(static_cast<const int64_t*>(ids), n, E, keys.Current(), slots.Current());
  else
    make_keys<<<grid, kThreads, 0, stream>>>(static_cast<const int32_t*>(ids), n, E, keys.Current(), slots.Current());
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (cudaError_t err = cub::DeviceRadixSort::SortPairs(p + 4 * arr, cub_size, keys, slots, static_cast<int>(n), 0,
                                                        bits, stream);
      err != cudaSuccess)
    return err;
  // The sorted pairs are in whichever buffer CUB's last pass wrote: Current().
  scatter_rows<<<grid, kThreads, 0, stream>>>(slots.Current(), n, static_cast<int32_t>(K), sorted_tokens, row_of);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  find_offsets<<<grid_for(num_experts + 1, kThreads, INT32_MAX), kThreads, 0, stream>>>(keys.Current(), n, E,
                                                                                         offsets);
  return cudaGetLastError();
}

}  // namespace grouter::cuda
