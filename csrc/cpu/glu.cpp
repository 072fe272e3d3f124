// glu and glu_backward on the CPU: a = act(gate) * up for rows h = [gate | up], forward in one
// pass over h, backward (a recomputed, grad_h) in one pass over h and grad_a. fp32 math; bf16 and
// fp16 rows go through fp32 in blocks that stay in L1. The loops are compiled for AVX-512, AVX2
// (x86-64-v3: with FMA) and baseline x86-64: the polynomials' explicit fused multiply-adds
// (glu_math.h) are single instructions where the ISA has them (forward and backward ~2x faster
// than separate multiplies and adds, measured on AVX-512), a libm call on the baseline. Nothing
// is contracted implicitly, so every build, and the CUDA kernel, gives the same bits.
#include "cpu/glu.h"

#include "glu_checks.h"
#include "cpu/output_cache.h"
#include "cpu/vector_loops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

namespace grouter::cpu {
namespace {

using glu::Act;

#define GROUTER_DISPATCH_GLU_TYPES(TYPE, NAME, ...)                                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                       \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

constexpr int64_t kBlock = 512;  // elements converted to fp32 at a time (2 KiB per buffer)

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define GROUTER_MULTIVERSION_FMA __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define GROUTER_MULTIVERSION_FMA
#endif

template <Act A>
GROUTER_MULTIVERSION_FMA void forward_f32(float* __restrict__ a, const float* __restrict__ g, const float* __restrict__ u,
                                      int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = glu::act<A>(g[i]) * u[i];
}

template <Act A>
GROUTER_MULTIVERSION_FMA void backward_f32(float* __restrict__ a, float* __restrict__ grad_g, float* __restrict__ grad_u,
                                       const float* __restrict__ g, const float* __restrict__ u,
                                       const float* __restrict__ grad_a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float value, slope;
    glu::act_and_derivative<A>(g[i], value, slope);
    a[i] = value * u[i];
    grad_g[i] = grad_a[i] * u[i] * slope;
    grad_u[i] = grad_a[i] * value;
  }
}

template <typename T>
GROUTER_MULTIVERSION void to_float(float* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Outputs never overlap inputs (fresh tensors; gate and up are disjoint halves of a row), which
// __restrict__ tells the vectoriser: with six pointers it would not version the loop for aliasing.

// One row segment [i, i + n) of the I columns: fp32 rows in place, others through fp32 buffers.
template <typename T, Act A>
void forward_segment(T* a, const T* g, const T* u, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    forward_f32<A>(a, g, u, n);
  } else {
    float gf[kBlock], uf[kBlock], af[kBlock];
    to_float(gf, g, n);
    to_float(uf, u, n);
    forward_f32<A>(af, gf, uf, n);
    cast_row<T, float>(a, af, n);
  }
}

template <typename T, Act A>
void backward_segment(T* a, T* grad_g, T* grad_u, const T* g, const T* u, const T* grad_a, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    backward_f32<A>(a, grad_g, grad_u, g, u, grad_a, n);
  } else {
    float gf[kBlock], uf[kBlock], gaf[kBlock], af[kBlock], ggf[kBlock], guf[kBlock];
    to_float(gf, g, n);
    to_float(uf, u, n);
    to_float(gaf, grad_a, n);
    backward_f32<A>(af, ggf, guf, gf, uf, gaf, n);
    cast_row<T, float>(a, af, n);
    cast_row<T, float>(grad_g, ggf, n);
    cast_row<T, float>(grad_u, guf, n);
  }
}

template <typename F>
void with_act(Act act, F&& f) {
  switch (act) {
    case Act::silu: return f(std::integral_constant<Act, Act::silu>{});
    case Act::gelu: return f(std::integral_constant<Act, Act::gelu>{});
    case Act::gelu_tanh: return f(std::integral_constant<Act, Act::gelu_tanh>{});
    case Act::relu: return f(std::integral_constant<Act, Act::relu>{});
  }
}

// Rows of I columns each, split over threads; a row longer than kBlock is cut into segments.
template <typename F>
void for_segments(int64_t rows, int64_t I, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(I, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t c = 0; c < I; c += kBlock) f(r, c, std::min(kBlock, I - c));
  });
}

}  // namespace

void glu_rows(const at::Tensor& h, Act act, const at::Tensor& a) {
  const int64_t I = a.size(-1), rows = I ? a.numel() / I : 0;
  GROUTER_DISPATCH_GLU_TYPES(h.scalar_type(), "grouter_glu_cpu", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* ap = a.mutable_data_ptr<scalar_t>();
    with_act(act, [&](auto A) {
      for_segments(rows, I, [&](int64_t r, int64_t c, int64_t n) {
        const scalar_t* row = hp + r * 2 * I;
        forward_segment<scalar_t, decltype(A)::value>(ap + r * I + c, row + c, row + I + c, n);
      });
    });
  });
}

void glu_backward_rows(const at::Tensor& grad_a, const at::Tensor& h, Act act, const at::Tensor& a,
                       const at::Tensor& grad_h) {
  const int64_t I = a.size(-1), rows = I ? a.numel() / I : 0;
  GROUTER_DISPATCH_GLU_TYPES(h.scalar_type(), "grouter_glu_backward_cpu", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* gap = grad_a.const_data_ptr<scalar_t>();
    scalar_t* ap = a.mutable_data_ptr<scalar_t>();
    scalar_t* ghp = grad_h.mutable_data_ptr<scalar_t>();
    with_act(act, [&](auto A) {
      for_segments(rows, I, [&](int64_t r, int64_t c, int64_t n) {
        const scalar_t* row = hp + r * 2 * I;
        scalar_t* grad_row = ghp + r * 2 * I;
        backward_segment<scalar_t, decltype(A)::value>(ap + r * I + c, grad_row + c, grad_row + I + c, row + c,
                                                       row + I + c, gap + r * I + c, n);
      });
    });
  });
}

namespace {

at::Tensor glu_cpu(const at::Tensor& h_in, c10::string_view activation) {
  const auto sizes = glu::check_h("glu", h_in);
  const Act act = glu::parse_activation(activation);
  at::Tensor a = empty_output(sizes, h_in.options());  // recycled: no first-touch page faults
  glu_rows(h_in.contiguous(), act, a);
  return a;
}

std::tuple<at::Tensor, at::Tensor> glu_backward_cpu(const at::Tensor& grad_a_in, const at::Tensor& h_in,
                                                    c10::string_view activation) {
  const auto sizes = glu::check_h("glu_backward", h_in);
  glu::check_grad_a(grad_a_in, h_in, sizes);
  const Act act = glu::parse_activation(activation);
  at::Tensor a = empty_output(sizes, h_in.options());
  at::Tensor grad_h = empty_output(h_in.sizes(), h_in.options());
  glu_backward_rows(grad_a_in.contiguous(), h_in.contiguous(), act, a, grad_h);
  return {a, grad_h};
}

}  // namespace

TORCH_LIBRARY_IMPL(grouter, CPU, m) {
  m.impl("glu", &glu_cpu);
  m.impl("glu_backward", &glu_backward_cpu);
}

}  // namespace grouter::cpu
