// Row copies for the permute family. Outputs far larger than the caches are written with
// non-temporal (streaming) stores: a plain store first reads the destination line into the cache
// (read-for-ownership), which adds a third stream of memory traffic to a copy. glibc's memcpy
// does the same for large copies, but our rows are only a few KiB each, below its threshold.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#define GROUTER_HAVE_SSE2 1
#endif

namespace grouter::cpu {

// Work per parallel task: large enough to amortise scheduling, small enough to balance 2+ cores.
inline int64_t tokens_per_task(int64_t bytes_per_token) {
  return std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(bytes_per_token, 1));
}

// A fresh output of tens of MiB is mostly page faults on first touch: with 4 KiB pages the
// kernel's fault-and-zero path runs at ~2 GB/s here, below a tenth of copy bandwidth. Asking for
// transparent huge pages (what torch's allocator does under THP_MEM_ALLOC_ENABLE=1) makes those
// faults 512x fewer. Only the 2 MiB-aligned interior is advised; failure is harmless.
inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < int64_t(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

class RowWriter {
 public:
  // Streaming pays off only when the output would not stay in the last-level cache anyway.
  static constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

  explicit RowWriter(int64_t out_bytes) : stream_(kHaveStreaming && out_bytes >= kStreamMinBytes) {}

  // Copies n bytes; streams when dst and n are 16-byte aligned, the usual case for rows of a
  // fresh (64-byte aligned) tensor whose row size is a multiple of 16 bytes.
  void write(char* dst, const char* src, int64_t n) const {
#if GROUTER_HAVE_SSE2
    if (stream_ && ((reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(n)) & 15) == 0) {
      for (int64_t i = 0; i < n; i += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), v);
      }
      return;
    }
#endif
    std::memcpy(dst, src, n);
  }

  // Streaming stores are weakly ordered: each task fences before its writes are handed on.
  void finish() const {
#if GROUTER_HAVE_SSE2
    if (stream_) _mm_sfence();
#endif
  }

 private:
#if GROUTER_HAVE_SSE2
  static constexpr bool kHaveStreaming = true;
#else
  static constexpr bool kHaveStreaming = false;
#endif
  bool stream_;
};

}  // namespace grouter::cpu
