// Value checks on index tensors (expert ids, a plan's row_of), one implementation per backend
// with the same messages (checks.h): a bad id is an exception, never an out-of-bounds access.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace grouter::cpu {

// Run before any kernel touches memory through the indices. O(T*K) over small int arrays,
// negligible next to the H-wide row traffic of the ops they guard.

// An index tensor the op validates and then reads again, as a contiguous copy that only this op
// holds: if another thread wrote the caller's tensor in between, the values used would not be the
// values checked (an out-of-bounds access). Costs one T*K integer copy, small next to the rows.
at::Tensor private_indices(const at::Tensor& indices);

// Every id in [0, E) and no id twice in one token's K ids. Raises IndexError / ValueError naming
// the first offending token (the lowest one, whatever the thread count).
void check_expert_id_values(const char* op, const at::Tensor& ids, int64_t num_experts);

// row_of (int32 [T, K], contiguous) holds each of 0..T*K-1 exactly once, so every output row is
// written exactly once and no index leaves its tensor.
void check_row_of_values(const char* op, const at::Tensor& row_of);

}  // namespace grouter::cpu

namespace grouter::cuda {

// The same checks written with ATen ops (they run on the device) and one device-to-host copy of
// the verdict; only called while cuda_checks_enabled(). The CUDA kernels also bounds-check every
// index they use, so with the checks off bad input gives a wrong result, never a bad access.
void check_expert_id_values(const char* op, const at::Tensor& ids, int64_t num_experts);
void check_row_of_values(const char* op, const at::Tensor& row_of);

}  // namespace grouter::cuda
