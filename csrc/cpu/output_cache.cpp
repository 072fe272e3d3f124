#include "cpu/output_cache.h"

#include "cpu/row_writer.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>

#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace grouter::cpu {
namespace {

constexpr int64_t kMinCachedBytes = int64_t{1} << 20;  // smaller outputs: torch's allocator
constexpr int64_t kGranule = int64_t{2} << 20;         // block sizes: whole huge pages

struct Block {
  void* ptr;
  int64_t bytes;
};

class OutputCache {
 public:
  OutputCache() {
    const char* env = std::getenv("GROUTER_CPU_CACHE_MB");
    limit_ = env ? std::max<int64_t>(0, std::atoll(env)) << 20 : default_limit();
  }

  Block* take(int64_t bytes) {
    const int64_t rounded = (bytes + kGranule - 1) / kGranule * kGranule;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Best fit, but never hand out a block much larger than asked: that memory would idle.
      auto it = free_.lower_bound(rounded);
      if (it != free_.end() && it->first <= rounded + rounded / 4) {
        Block* b = it->second;
        free_.erase(it);
        held_ -= b->bytes;
        return b;
      }
    }
    void* p = std::aligned_alloc(kGranule, rounded);
    TORCH_CHECK(p != nullptr, "grouter: out of memory allocating ", rounded, " bytes");
    advise_huge_pages(p, rounded);
    return new Block{p, rounded};
  }

  void give_back(Block* b) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + b->bytes <= limit_) {
        free_.emplace(b->bytes, b);
        held_ += b->bytes;
        return;
      }
    }
    std::free(b->ptr);
    delete b;
  }

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = std::max<int64_t>(0, bytes);
    trim_locked(limit_);
  }

  int64_t limit() {
    std::lock_guard<std::mutex> lock(mu_);
    return limit_;
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    trim_locked(0);
  }

  // 1 GiB holds the outputs a few MoE layers free and ask for again every training step (one
  // layer of 8192 tokens, H=512, top-2, fp32 cycles ~100 MiB through the ops), but at most 1/16
  // of the machine's memory: the cache is idle memory once the loop ends.
  static int64_t default_limit() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    const int64_t physical = pages > 0 && page > 0 ? int64_t(pages) * page : int64_t{16} << 30;
    return std::min<int64_t>(int64_t{1} << 30, physical / 16);
  }

 private:
  void trim_locked(int64_t target) {
    bool freed = false;
    while (held_ > target && !free_.empty()) {
      auto it = std::prev(free_.end());  // largest first
      held_ -= it->second->bytes;
      std::free(it->second->ptr);
      delete it->second;
      free_.erase(it);
      freed = true;
    }
#if defined(__GLIBC__)
    // glibc keeps freed blocks of this size in its heap (its mmap threshold rises with use):
    // hand the pages back to the system, or emptying the cache would not lower the RSS.
    if (freed) malloc_trim(0);
#endif
  }

  std::mutex mu_;
  std::multimap<int64_t, Block*> free_;
  int64_t held_ = 0;
  int64_t limit_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
OutputCache& cache() {
  static OutputCache* c = new OutputCache();
  return *c;
}

void release(void* ctx) { cache().give_back(static_cast<Block*>(ctx)); }

// The allocator of cached outputs' storages, so that resize_() works on them as on any tensor:
// a larger size takes a new block from the cache and the old one goes back.
struct CacheAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    Block* b = cache().take(std::max<int64_t>(static_cast<int64_t>(n), 1));
    return {b->ptr, b, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

c10::Allocator* cache_allocator() {
  static CacheAllocator* a = new CacheAllocator();  // never destroyed, like the cache
  return a;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (bytes < kMinCachedBytes || cache().limit() == 0) {
    at::Tensor out = at::empty(sizes, options);
    advise_huge_pages(out.mutable_data_ptr(), bytes);  // cached blocks were advised when allocated
    return out;
  }
  Block* b = cache().take(bytes);
  return at::for_blob(b->ptr, sizes)
      .context(b, &release)
      .allocator(cache_allocator())
      .resizeable_storage()
      .options(options)
      .make_tensor();
}

void set_output_cache_limit(int64_t bytes) { cache().set_limit(bytes); }
int64_t output_cache_limit() { return cache().limit(); }
int64_t output_cache_bytes() { return cache().held(); }
void empty_output_cache() { cache().clear(); }

}  // namespace grouter::cpu
