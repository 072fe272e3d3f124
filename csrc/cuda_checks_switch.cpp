#include "cuda_checks_switch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace grouter {
namespace {

std::atomic<bool>& cuda_checks() {
  static std::atomic<bool> enabled{[] {
    const char* env = std::getenv("GROUTER_CUDA_CHECKS");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }()};
  return enabled;
}

}  // namespace

bool cuda_checks_enabled() { return cuda_checks().load(std::memory_order_relaxed); }
void set_cuda_checks(bool enabled) { cuda_checks().store(enabled, std::memory_order_relaxed); }

}  // namespace grouter
