// The run-time switch of the CUDA value checks.
#pragma once

namespace grouter {

// Value checks of CUDA inputs (ids in range and distinct per token, row_of a permutation).
// On by default; each checked op then makes one small device-to-host copy (a sync). Off
// (GROUTER_CUDA_CHECKS=0 or set_cuda_checks(false)) the kernels still guard every index, so a
// bad id can give a wrong plan but never an out-of-bounds access.
bool cuda_checks_enabled();
void set_cuda_checks(bool enabled);

}  // namespace grouter
