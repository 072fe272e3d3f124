// permute on CUDA: one thread block per source token reads the token's row once, in the widest
// aligned vectors the row allows (16 bytes on the fast path), and writes it to its K rows.
#include "cuda/device_utils.cuh"

namespace grouter::cuda {
namespace {

template <typename vec_t>
__global__ void permute_rows(const vec_t* x, const int32_t* row_of, vec_t* out, int64_t K,
                             int64_t vectors_per_row, int64_t n_rows) {
  const int64_t t = blockIdx.x;
  const vec_t* src = x + t * vectors_per_row;
  const int32_t* rows = row_of + t * K;
  for (int64_t v = threadIdx.x; v < vectors_per_row; v += blockDim.x) {
    const vec_t value = src[v];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = rows[k];
      if (r >= 0 && r < n_rows) out[r * vectors_per_row + v] = value;  // guard: checks may be off
    }
  }
}

template <typename vec_t>
cudaError_t launch(const void* x, const int32_t* row_of, void* out, int64_t T, int64_t K,
                   int64_t row_bytes, cudaStream_t stream) {
  const int64_t vectors = row_bytes / int64_t(sizeof(vec_t));
  permute_rows<vec_t><<<static_cast<unsigned>(T), threads_for(vectors), 0, stream>>>(
      static_cast<const vec_t*>(x), row_of, static_cast<vec_t*>(out), K, vectors, T * K);
  return cudaGetLastError();
}

}  // namespace

cudaError_t permute(const void* x, const int32_t* row_of, void* out, int64_t T, int64_t K,
                    int64_t row_bytes, cudaStream_t stream) {
  if (T == 0 || K == 0 || row_bytes == 0) return cudaSuccess;
  switch (alignment_of(row_bytes, x, out)) {
    case 16: return launch<uint4>(x, row_of, out, T, K, row_bytes, stream);
    case 8: return launch<uint2>(x, row_of, out, T, K, row_bytes, stream);
    case 4: return launch<uint32_t>(x, row_of, out, T, K, row_bytes, stream);
    case 2: return launch<uint16_t>(x, row_of, out, T, K, row_bytes, stream);
    default: return launch<uint8_t>(x, row_of, out, T, K, row_bytes, stream);
  }
}

}  // namespace grouter::cuda
