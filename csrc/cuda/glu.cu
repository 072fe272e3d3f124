// glu and glu_backward on CUDA: element-wise over the [rows, I] outputs, grid-stride, fp32 math
// (glu_math.h, the CPU kernels' formulas), bf16/fp16 loaded and stored as such.
#include "cuda/device_utils.cuh"
#include "glu_math.h"

namespace grouter::cuda {
namespace {

using glu::Act;

template <typename scalar_t, Act A>
__global__ void glu_forward_kernel(const scalar_t* h, scalar_t* a, int64_t rows, int64_t I) {
  const int64_t n = rows * I;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / I, c = i - r * I;
    const scalar_t* row = h + r * 2 * I;
    const float g = to_acc<float>(row[c]), u = to_acc<float>(row[I + c]);
    a[i] = from_acc<scalar_t>(glu::act<A>(g) * u);
  }
}

template <typename scalar_t, Act A>
__global__ void glu_backward_kernel(const scalar_t* grad_a, const scalar_t* h, scalar_t* a, scalar_t* grad_h,
                                    int64_t rows, int64_t I) {
  const int64_t n = rows * I;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / I, c = i - r * I;
    const scalar_t* row = h + r * 2 * I;
    const float g = to_acc<float>(row[c]), u = to_acc<float>(row[I + c]), ga = to_acc<float>(grad_a[i]);
    float value, slope;
    glu::act_and_derivative<A>(g, value, slope);
    a[i] = from_acc<scalar_t>(value * u);
    grad_h[r * 2 * I + c] = from_acc<scalar_t>(ga * u * slope);
    grad_h[r * 2 * I + I + c] = from_acc<scalar_t>(ga * value);
  }
}

constexpr int kThreads = 256;

template <typename scalar_t, Act A>
struct Forward {
  static cudaError_t run(const void* h, void* a, int64_t rows, int64_t I, cudaStream_t stream) {
    glu_forward_kernel<scalar_t, A><<<grid_for(rows * I, kThreads, 65536), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(h), static_cast<scalar_t*>(a), rows, I);
    return cudaGetLastError();
  }
};

template <typename scalar_t, Act A>
struct Backward {
  static cudaError_t run(const void* grad_a, const void* h, void* a, void* grad_h, int64_t rows, int64_t I,
                         cudaStream_t stream) {
    glu_backward_kernel<scalar_t, A><<<grid_for(rows * I, kThreads, 65536), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad_a), static_cast<const scalar_t*>(h), static_cast<scalar_t*>(a),
        static_cast<scalar_t*>(grad_h), rows, I);
    return cudaGetLastError();
  }
};

template <template <typename, Act> class Launch, typename scalar_t, typename... Args>
cudaError_t with_act(int act, Args... args) {
  switch (static_cast<Act>(act)) {
    case Act::silu: return Launch<scalar_t, Act::silu>::run(args...);
    case Act::gelu: return Launch<scalar_t, Act::gelu>::run(args...);
    case Act::gelu_tanh: return Launch<scalar_t, Act::gelu_tanh>::run(args...);
    case Act::relu: return Launch<scalar_t, Act::relu>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <template <typename, Act> class Launch, typename... Args>
cudaError_t with_types(DType dtype, int act, Args... args) {
  switch (dtype) {
    case DType::kFloat32: return with_act<Launch, float>(act, args...);
    case DType::kBFloat16: return with_act<Launch, __nv_bfloat16>(act, args...);
    case DType::kFloat16: return with_act<Launch, __half>(act, args...);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t glu(const void* h, void* a, int64_t rows, int64_t I, DType dtype, int act, cudaStream_t stream) {
  if (rows == 0 || I == 0) return cudaSuccess;
  return with_types<Forward>(dtype, act, h, a, rows, I, stream);
}

cudaError_t glu_backward(const void* grad_a, const void* h, void* a, void* grad_h, int64_t rows, int64_t I,
                         DType dtype, int act, cudaStream_t stream) {
  if (rows == 0 || I == 0) return cudaSuccess;
  return with_types<Backward>(dtype, act, grad_a, h, a, grad_h, rows, I, stream);
}

}  // namespace grouter::cuda
