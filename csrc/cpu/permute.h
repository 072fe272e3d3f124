#pragma once

#include <ATen/core/Tensor.h>

namespace grouter::cpu {

// out[row_of[t, k]] = x[t].
at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& row_of);

// The same for arguments `op` has already checked (the backward of an unweighted unpermute):
// index errors name `op`.
at::Tensor permute_rows(const char* op, const at::Tensor& x, const at::Tensor& row_of);

}  // namespace grouter::cpu
