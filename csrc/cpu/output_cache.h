// Uninitialised CPU outputs for the dispatch ops. Large ones come from a bounded cache of
// recycled blocks: a fresh multi-MiB output spends more time in first-touch page faults (the
// kernel zeroing every page) than the op spends copying, and a training loop frees and asks for
// the same sizes every step. Freed blocks are kept up to a byte limit (default 1 GiB or 1/16 of
// physical memory if less, env GROUTER_CPU_CACHE_MB, or set_output_cache_limit) and the rest go
// back to the system. Outputs from cached blocks resize like any tensor (their storage allocates
// from the cache).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace grouter::cpu {

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

void set_output_cache_limit(int64_t bytes);
int64_t output_cache_limit();
int64_t output_cache_bytes();  // bytes of freed blocks held right now
void empty_output_cache();

}  // namespace grouter::cpu
