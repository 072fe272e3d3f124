#include "cpu/output_cache.h"

#include "cpu/row_copy.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>

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
    limit_ = env ? std::max<int64_t>(0, std::atoll(env)) << 20 : int64_t{1} << 30;
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

 private:
  void trim_locked(int64_t target) {
    while (held_ > target && !free_.empty()) {
      auto it = std::prev(free_.end());  // largest first
      held_ -= it->second->bytes;
      std::free(it->second->ptr);
      delete it->second;
      free_.erase(it);
    }
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
  return at::for_blob(b->ptr, sizes).context(b, &release).options(options).make_tensor();
}

void set_output_cache_limit(int64_t bytes) { cache().set_limit(bytes); }
int64_t output_cache_limit() { return cache().limit(); }
int64_t output_cache_bytes() { return cache().held(); }
void empty_output_cache() { cache().clear(); }

}  // namespace grouter::cpu
