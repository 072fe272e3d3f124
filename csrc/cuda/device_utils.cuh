// Small device helpers shared by the CUDA kernels: vector loads, dtype conversions, launch sizes.
#pragma once

#include "cuda/launch.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace grouter::cuda {

// N elements moved as one aligned access (16 bytes for the fast path).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename acc_t> __device__ __forceinline__ acc_t to_acc(float x) { return x; }
template <typename acc_t> __device__ __forceinline__ acc_t to_acc(double x) { return acc_t(x); }
template <typename acc_t> __device__ __forceinline__ acc_t to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename acc_t> __device__ __forceinline__ acc_t to_acc(__half x) { return __half2float(x); }

// Round-to-nearest-even, as torch's casts do.
template <typename scalar_t> __device__ __forceinline__ scalar_t from_acc(float x);
template <typename scalar_t> __device__ __forceinline__ scalar_t from_acc(double x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ float from_acc<float>(double x) { return float(x); }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
// From fp64, twice (double -> float -> half type), as torch and the CPU kernels round: c10's
// BFloat16 and Half are built from a float only. Rounding once can differ in the last bit.
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(double x) { return __float2bfloat16_rn(float(x)); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(double x) { return __float2half_rn(float(x)); }

// The widest access (16, 8, 4, 2 or 1 bytes) that every pointer and the row size allow.
inline int alignment_of(int64_t row_bytes, const void* a, const void* b, const void* c = nullptr) {
  const auto bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                    reinterpret_cast<uintptr_t>(c) | static_cast<uintptr_t>(row_bytes);
  int align = 16;
  while (align > 1 && bits % align != 0) align /= 2;
  return align;
}

// Threads per row-block: enough to cover a row's vectors in one or two steps, at most 256.
inline int threads_for(int64_t vectors) {
  int threads = 32;
  while (threads < 256 && threads < vectors) threads *= 2;
  return threads;
}

inline int grid_for(int64_t n, int threads, int64_t max_blocks = 4096) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks));
}

// Calls body.template operator()<scalar_t, acc_t>() for the dtype and accumulation width.
template <typename Body>
void dispatch_float(DType dtype, bool acc_double, Body&& body) {
  switch (dtype) {
    case DType::kFloat64: body.template operator()<double, double>(); return;
    case DType::kFloat32:
      acc_double ? body.template operator()<float, double>() : body.template operator()<float, float>();
      return;
    case DType::kBFloat16:
      acc_double ? body.template operator()<__nv_bfloat16, double>()
                 : body.template operator()<__nv_bfloat16, float>();
      return;
    case DType::kFloat16:
      acc_double ? body.template operator()<__half, double>() : body.template operator()<__half, float>();
      return;
  }
}

}  // namespace grouter::cuda
