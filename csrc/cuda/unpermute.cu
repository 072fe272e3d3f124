// unpermute (weighted combine) on CUDA and its fused backward: one thread block per destination
// token, no atomics. Forward: acc = 0; acc += w[t,k] * y[row_of[t,k]] for k in order, per
// element, in fp32 (fp64 when asked). Built with --fmad=false, so each product and sum is rounded
// separately, exactly like the PyTorch reference. Backward: grad_y rows scaled by their weight,
// and grad_w[t,k] = <grad_out[t], y[row]> in the CPU kernel's order (kDotLanes partial sums, lane j
// taking the elements h = j mod kDotLanes in increasing h, then a fixed halving tree): the same bits
// as the CPU, whatever the alignment of the rows, and run to run.
#include "cuda/device_utils.cuh"

namespace grouter::cuda {
namespace {

constexpr int kBackwardThreads = 256;

// csrc/cpu/vector_loops.h's kLanes: the dot products' partial sums, one thread each here.
constexpr int kDotLanes = 16;
constexpr int kDotGroups = kBackwardThreads / kDotLanes;  // slots (t, k) whose dots run at once

// k's whose rows are loaded together before any is added in: a single load in flight per thread
// would leave the kernel latency-bound, not bandwidth-bound.
constexpr int kRowsInFlight = 4;

// rows[k] (a token's row_of), or -1 past K or, with checks off and a corrupt plan, outside [0, n_rows).
__device__ __forceinline__ int64_t row_or_skip(const int32_t* rows, int64_t k, int64_t K, int64_t n_rows) {
  const int64_t r = k < K ? rows[k] : -1;
  return r >= 0 && r < n_rows ? r : -1;
}

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
    for (int64_t k0 = 0; k0 < K; k0 += kRowsInFlight) {
      V val[kRowsInFlight];
      acc_t wk[kRowsInFlight];
      int64_t row[kRowsInFlight];
#pragma unroll
      for (int j = 0; j < kRowsInFlight; ++j) {
        row[j] = row_or_skip(rows, k0 + j, K, n_rows);
        wk[j] = row[j] >= 0 && w ? w[t * K + k0 + j] : acc_t(1);
        if (row[j] >= 0) val[j] = reinterpret_cast<const V*>(y + row[j] * H)[v];
      }
#pragma unroll
      for (int j = 0; j < kRowsInFlight; ++j) {  // added in k order
        if (row[j] < 0) continue;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += wk[j] * to_acc<acc_t>(val[j].v[i]);
      }
    }
    V res;
#pragma unroll
    for (int i = 0; i < VEC; ++i) res.v[i] = from_acc<scalar_t>(acc[i]);
    reinterpret_cast<V*>(out + t * H)[v] = res;
  }
}

// grad_w[t, k] for the k's of token t: kDotGroups slots at a time, kDotLanes threads per slot,
// thread j summing the elements h = j (mod kDotLanes) in increasing h (scalar loads: the order
// never depends on the vector width), then lanes j and j + width added for width 8, 4, 2, 1, as
// the CPU's sum_lanes does. A warp holds two groups; both run every shuffle (trip counts uniform).
template <typename scalar_t, typename acc_t>
__device__ void dot_products(const scalar_t* grad_out, const scalar_t* y, const int32_t* rows, acc_t* grad_w,
                             int64_t K, int64_t H, int64_t n_rows) {
  const int lane = threadIdx.x % kDotLanes, group = threadIdx.x / kDotLanes;
  for (int64_t k0 = 0; k0 < K; k0 += kDotGroups) {
    const int64_t k = k0 + group;
    const int64_t row = row_or_skip(rows, k, K, n_rows);
    acc_t dot = acc_t(0);
    if (row >= 0) {
      const scalar_t* yr = y + row * H;
      for (int64_t h = lane; h < H; h += kDotLanes) dot += to_acc<acc_t>(grad_out[h]) * to_acc<acc_t>(yr[h]);
    }
#pragma unroll
    for (int width = kDotLanes / 2; width > 0; width /= 2) {
      const acc_t other = __shfl_down_sync(0xffffffffu, dot, width, kDotLanes);
      if (lane < width) dot += other;
    }
    if (lane == 0 && k < K) grad_w[k] = dot;
  }
}

// Backward: grad_y, kRowsInFlight rows per pass over grad_out[t] (read once per pass); then the
// dot products of grad_w (grad_out[t] is in cache by then).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kBackwardThreads)
combine_backward(const scalar_t* grad_out, const scalar_t* y, const int32_t* row_of, const acc_t* w,
                 scalar_t* grad_y, acc_t* grad_w, int64_t K, int64_t H, int64_t n_rows) {
  using V = Vec<scalar_t, VEC>;
  const int64_t t = blockIdx.x;
  const int64_t vectors = H / VEC;
  const V* g = reinterpret_cast<const V*>(grad_out + t * H);
  for (int64_t k0 = 0; k0 < K; k0 += kRowsInFlight) {
    int64_t row[kRowsInFlight];
    acc_t wk[kRowsInFlight];
#pragma unroll
    for (int j = 0; j < kRowsInFlight; ++j) {
      row[j] = row_or_skip(row_of + t * K, k0 + j, K, n_rows);  // the same for the whole block
      wk[j] = k0 + j < K ? w[t * K + k0 + j] : acc_t(0);
    }
    for (int64_t v = threadIdx.x; v < vectors; v += kBackwardThreads) {
      const V gv = g[v];
#pragma unroll
      for (int j = 0; j < kRowsInFlight; ++j) {
        if (row[j] < 0) continue;
        V res;
#pragma unroll
        for (int i = 0; i < VEC; ++i) res.v[i] = from_acc<scalar_t>(wk[j] * to_acc<acc_t>(gv.v[i]));
        reinterpret_cast<V*>(grad_y + row[j] * H)[v] = res;
      }
    }
  }
  if (grad_w) dot_products(grad_out + t * H, y, row_of + t * K, grad_w + t * K, K, H, n_rows);
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
    // y is read only by the dot products, element by element: its alignment does not matter.
    const bool wide = alignment_of(H * int64_t(sizeof(scalar_t)), grad_out, grad_y) == 16;
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
