// Value checks of CUDA index tensors, written with ATen ops (they run on the device) and one
// device-to-host copy of the verdict. Only called while cuda_checks_enabled().
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace grouter::cuda {

void check_expert_id_values(const char* op, const at::Tensor& ids, int64_t num_experts);
void check_row_of_values(const char* op, const at::Tensor& row_of);

}  // namespace grouter::cuda
