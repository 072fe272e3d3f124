// The inner loops of the weighted combine, compiled for AVX-512, AVX2 and baseline x86-64 and
// picked at load time (GCC/Clang target_clones), so one portable build still uses the wide units
// of the machine it runs on. Every loop is element-wise (or keeps its kLanes partial sums
// separate) and the build has -ffp-contract=off, so all versions give identical bits.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define GROUTER_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GROUTER_MULTIVERSION
#endif

namespace grouter::cpu {

// Dot products keep this many partial sums (lane j takes elements i = j mod kLanes), which
// vectorises without reassociating any sum; the lanes are added in a fixed tree at the end.
constexpr int kLanes = 16;

// acc[i] += w * src[i]
template <typename scalar_t, typename acc_t>
GROUTER_MULTIVERSION void axpy_row(acc_t* acc, const scalar_t* src, acc_t w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<acc_t>(src[i]);
}

// dst[i] = scalar_t(src[i])
template <typename scalar_t, typename acc_t>
GROUTER_MULTIVERSION void cast_row(scalar_t* dst, const acc_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// dst[i] = scalar_t(w * src[i])
template <typename scalar_t, typename acc_t>
GROUTER_MULTIVERSION void scale_row(scalar_t* dst, const scalar_t* src, acc_t w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(w * static_cast<acc_t>(src[i]));
}

// lane[i mod kLanes] += a[i] * b[i], for n a multiple of kLanes or the last block of a row.
template <typename scalar_t, typename acc_t>
GROUTER_MULTIVERSION void dot_lanes(acc_t* lane, const scalar_t* a, const scalar_t* b, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j)
      lane[j] += static_cast<acc_t>(a[i + j]) * static_cast<acc_t>(b[i + j]);
  for (int j = 0; i + j < n; ++j) lane[j] += static_cast<acc_t>(a[i + j]) * static_cast<acc_t>(b[i + j]);
}

template <typename acc_t>
acc_t sum_lanes(acc_t* lane) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) lane[j] += lane[j + width];
  return lane[0];
}

}  // namespace grouter::cpu
