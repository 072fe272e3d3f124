// Value checks on index tensors, run before any kernel touches memory through them, so a bad
// id is an exception rather than an out-of-bounds access. Both are O(T*K) over small int arrays,
// negligible next to the H-wide row traffic of the ops they guard.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace grouter::cpu {

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
