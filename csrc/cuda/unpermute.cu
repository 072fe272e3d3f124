// unpermute (weighted combine) on CUDA and its fused backward: one thread block per destination
// token, no atomics. Forward: acc = 0; acc += w[t,k] * y[row_of[t,k]] for k in order, per
// element, in fp32 (fp64 when asked). Built with --fmad=false, so each product and sum is rounded
// separately, exactly like the PyTorch reference. Backward: grad_y rows scaled by their weight,
// and grad_w[t,k] = <grad_out[t], y[row]> summed per thread in a fixed order, then reduced by
// cub::BlockReduce (a fixed tree): bitwise reproducible run to run.
#include "cuda/device_utils.cuh"

#include <cub/block/block_reduce.cuh>

namespace grouter::cuda {
namespace {

constexpr int kBackwardThreads = 256;

template <typename scalar_t, typename acc_t, int VEC>
__global__ void combine(const scalar_t* y, const int32_t* row_of, const acc_t* w, scalar_t* out,
                        int64_t K, int64_t H, int64_t n_rows) {
  using V = Vec<scalar_t, VEC>;
  const int64_t t = blockIdx.x;
  const int64_t vectors = H / VEC;
  const int32_t* rows = row_of + t * K;
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = rows[k];
      if (r < 0 || r >= n_rows) continue;  // only with checks off and a corrupt plan
      const acc_t wk = w ? w[t * K + k] : acc_t(1);
      const V val = reinterpret_cast<const V*>(y + r * H)[v];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += wk * to_acc<acc_t>(val.v[i]);
    }
    V res;
#pragma unroll
    for (int i = 0; i < VEC; ++i) res.v[i] = from_acc<scalar_t>(acc[i]);
    reinterpret_cast<V*>(out + t * H)[v] = res;
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kBackwardThreads)
combine_backward(const scalar_t* grad_out, const scalar_t* y, const int32_t* row_of, const acc_t* w,
                 scalar_t* grad_y, acc_t* grad_w, int64_t K, int64_t H, int64_t n_rows) {
  using V = Vec<scalar_t, VEC>;
  using BlockReduce = cub::BlockReduce<acc_t, kBackwardThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_tmp;
  const int64_t t = blockIdx.x;
  const int64_t vectors = H / VEC;
  const V* g = reinterpret_cast<const V*>(grad_out + t * H);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t r = row_of[t * K + k];
    const bool valid = r >= 0 && r < n_rows;  // the same for the whole block
    const acc_t wk = w[t * K + k];
    acc_t dot = acc_t(0);
    if (valid) {
      V* dst = reinterpret_cast<V*>(grad_y + r * H);
      const V* yr = grad_w ? reinterpret_cast<const V*>(y + r * H) : nullptr;
      for (int64_t v = threadIdx.x; v < vectors; v += kBackwardThreads) {
        const V gv = g[v];
        V res;
#pragma unroll
        for (int i = 0; i < VEC; ++i) res.v[i] = from_acc<scalar_t>(wk * to_acc<acc_t>(gv.v[i]));
        dst[v] = res;
        if (yr) {
          const V yv = yr[v];
#pragma unroll
          for (int i = 0; i < VEC; ++i) dot += to_acc<acc_t>(gv.v[i]) * to_acc<acc_t>(yv.v[i]);
        }
      }
    }
    if (grad_w) {  // uniform across the block, so the barriers below are safe
      const acc_t total = BlockReduce(reduce_tmp).Sum(dot);
      if (threadIdx.x == 0) grad_w[t * K + k] = total;
      __syncthreads();  // reduce_tmp is reused by the next k
    }
  }
}

// Elements per access: 16 bytes when the row size and every pointer allow it, else 1.
template <typename scalar_t>
constexpr int kWide = 16 / int(sizeof(scalar_t));

}  // namespace

cudaError_t unpermute(const void* y, const int32_t* row_of, const void* w, void* out, int64_t T,
                      int64_t K, int64_t H, DType dtype, bool acc_double, cudaStream_t stream) {
  if (T == 0 || H == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_float(dtype, acc_double, [&]<typename scalar_t, typename acc_t>() {
    const auto* yp = static_cast<const scalar_t*>(y);
    const auto* wp = static_cast<const acc_t*>(w);
    auto* op = static_cast<scalar_t*>(out);
    constexpr int kVec = kWide<scalar_t>;
    if (alignment_of(H * int64_t(sizeof(scalar_t)), y, out) == 16) {
      combine<scalar_t, acc_t, kVec><<<static_cast<unsigned>(T), threads_for(H / kVec), 0, stream>>>(
          yp, row_of, wp, op, K, H, T * K);
    } else {
      combine<scalar_t, acc_t, 1><<<static_cast<unsigned>(T), threads_for(H), 0, stream>>>(
          yp, row_of, wp, op, K, H, T * K);
    }
    status = cudaGetLastError();
  });
  return status;
}

cudaError_t unpermute_backward(const void* grad_out, const void* y, const int32_t* row_of,
                               const void* w, void* grad_y, void* grad_w, int64_t T, int64_t K,
                               int64_t H, DType dtype, bool acc_double, cudaStream_t stream) {
  if (T == 0 || K == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_float(dtype, acc_double, [&]<typename scalar_t, typename acc_t>() {
    const auto* gp = static_cast<const scalar_t*>(grad_out);
    const auto* yp = static_cast<const scalar_t*>(y);
    const auto* wp = static_cast<const acc_t*>(w);
    auto* gyp = static_cast<scalar_t*>(grad_y);
    auto* gwp = static_cast<acc_t*>(grad_w);
    constexpr int kVec = kWide<scalar_t>;
    const bool wide = alignment_of(H * int64_t(sizeof(scalar_t)), grad_out, grad_y, y ? y : grad_y) == 16;
    if (wide)
      combine_backward<scalar_t, acc_t, kVec><<<static_cast<unsigned>(T), kBackwardThreads, 0, stream>>>(
          gp, yp, row_of, wp, gyp, gwp, K, H, T * K);
    else
      combine_backward<scalar_t, acc_t, 1><<<static_cast<unsigned>(T), kBackwardThreads, 0, stream>>>(
          gp, yp, row_of, wp, gyp, gwp, K, H, T * K);
    status = cudaGetLastError();
  });
  return status;
}

}  // namespace grouter::cuda
