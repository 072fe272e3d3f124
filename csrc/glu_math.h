// Gated activations a = act(gate) * up and their derivatives, in fp32, for the CPU and CUDA GLU
// kernels. Branch-free (selects, no libm calls but fmaf on the baseline) so the CPU loops vectorise: exp is a
// Cephes-style range reduction + polynomial (about 1 ulp over the clamped range), erf Eigen's
// rational approximation (a few ulp), tanh from exp. The polynomials use explicit fused
// multiply-adds (mul_add) and nothing is contracted implicitly (-ffp-contract=off, --fmad=false):
// every operation is a correctly rounded IEEE one, so every CPU build and the CUDA kernel give
// the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GROUTER_HD __host__ __device__ __forceinline__
#else
#define GROUTER_HD inline
#endif

namespace grouter::glu {

// The activations of grouter.ops.expert_mlp, by the names of the Python registry (grouter/ops/activations.py).
enum class Act : int { silu = 0, gelu = 1, gelu_tanh = 2, relu = 3 };

GROUTER_HD float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
#endif
}

GROUTER_HD float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// a * b + c rounded once: one instruction on GPUs and on CPUs with FMA (the AVX-512 and x86-64-v3
// builds of the loops), a correctly rounded libm call on the baseline build.
GROUTER_HD float mul_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// exp(x): x = n ln2 + r, exp(r) by a degree-7 polynomial, 2^n by building floats' exponent bits
// (two factors, so n can span the whole normal range). Beyond the normal range exp over- or
// underflows as fp32 does: +inf above 88.72, 0 below -87.34 (denormal results flushed). So
// act(g) and its slope reach their limits for huge |g| instead of terms like g * exp(-|g|)
// growing with |g|; NaN passes through.
GROUTER_HD float exp_approx(float x) {
  const float y = clampf(x, -87.33654f, 88.7f);
  // n = round(y / ln2) by the 1.5 * 2^23 trick (no float->int branch, so the loop vectorises;
  // no fast-math keeps the subtraction).
  const float n = mul_add(y, 1.44269504088896341f, 12582912.0f) - 12582912.0f;
  const float r = mul_add(n, 2.12194440e-4f, mul_add(n, -0.693359375f, y));
  float p = 1.9875691500e-4f;
  p = mul_add(p, r, 1.3981999507e-3f);
  p = mul_add(p, r, 8.3334519073e-3f);
  p = mul_add(p, r, 4.1665795894e-2f);
  p = mul_add(p, r, 1.6666665459e-1f);
  p = mul_add(p, r, 5.0000001201e-1f);
  p = mul_add(p * r, r, r) + 1.0f;
  const int32_t k = static_cast<int32_t>(n);
  const int32_t half = k >> 1;  // 2^k = 2^half * 2^(k - half), each factor a normal float
  const float e = p * bits_to_float((half + 127) << 23) * bits_to_float((k - half + 127) << 23);
  return x > 88.72284f ? bits_to_float(0x7f800000) : (x < -87.33654f ? 0.0f : e);
}

GROUTER_HD float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

GROUTER_HD float tanh_approx(float x) { return 1.0f - 2.0f / (exp_approx(2.0f * x) + 1.0f); }

GROUTER_HD float erf_approx(float x) {
  x = clampf(x, -4.0f, 4.0f);  // erf is +-1 in fp32 beyond
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = mul_add(p, x2, 2.77068142495902e-08f);
  p = mul_add(p, x2, -2.10102402082508e-06f);
  p = mul_add(p, x2, -5.69250639462346e-05f);
  p = mul_add(p, x2, -7.34990630326855e-04f);
  p = mul_add(p, x2, -2.95459980854025e-03f);
  p = mul_add(p, x2, -1.60960333262415e-02f);
  float q = -1.45660718464996e-05f;
  q = mul_add(q, x2, -2.13374055278905e-04f);
  q = mul_add(q, x2, -1.68282697438203e-03f);
  q = mul_add(q, x2, -7.37332916720468e-03f);
  q = mul_add(q, x2, -1.42647390514189e-02f);
  return x * p / q;
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCubic = 0.044715f;

// act(g)
template <Act A>
GROUTER_HD float act(float g) {
  if constexpr (A == Act::silu) {
    return g * sigmoid(g);
  } else if constexpr (A == Act::gelu) {
    return 0.5f * g * (1.0f + erf_approx(g * kSqrtHalf));
  } else if constexpr (A == Act::gelu_tanh) {
    return 0.5f * g * (1.0f + tanh_approx(kSqrt2OverPi * (g + kTanhCubic * g * g * g)));
  } else {
    return g <= 0.0f ? 0.0f : g;  // NaN passes, as torch.relu
  }
}

// (act(g), act'(g))
template <Act A>
GROUTER_HD void act_and_derivative(float g, float& value, float& slope) {
  if constexpr (A == Act::silu) {
    const float s = sigmoid(g);
    value = g * s;
    slope = s * (1.0f + g * (1.0f - s));
  } else if constexpr (A == Act::gelu) {
    const float cdf = 0.5f * (1.0f + erf_approx(g * kSqrtHalf));
    value = g * cdf;
    slope = cdf + g * kInvSqrt2Pi * exp_approx(-0.5f * g * g);
  } else if constexpr (A == Act::gelu_tanh) {
    const float t = tanh_approx(kSqrt2OverPi * (g + kTanhCubic * g * g * g));
    const float d = 1.0f - t * t;  // 0 once tanh saturates (|g| > ~6), before g * g can overflow
    value = 0.5f * g * (1.0f + t);
    slope = 0.5f * (1.0f + t) + (d == 0.0f ? 0.0f : 0.5f * g * d * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * g * g));
  } else {
    value = g <= 0.0f ? 0.0f : g;
    slope = g <= 0.0f ? 0.0f : 1.0f;
  }
}

}  // namespace grouter::glu
