#pragma once

#include <ATen/core/Tensor.h>

namespace grouter::cpu {

// out[row_of[t, k]] = x[t]; also the backward of an unweighted unpermute.
at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& row_of);

}  // namespace grouter::cpu
