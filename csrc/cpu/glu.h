// The CPU gated-activation loops on caller-given contiguous rows, for ops that keep their
// intermediates in their own buffers (the expert MLP runs them per expert, between its GEMMs).
#pragma once

#include "glu_math.h"

#include <ATen/core/Tensor.h>

namespace grouter::cpu {

// a [rows, I] = act(gate) * up of h [rows, 2I]; float32, bfloat16 or float16, all contiguous.
void glu_rows(const at::Tensor& h, glu::Act act, const at::Tensor& a);

// a (recomputed) and grad_h [rows, 2I] from grad_a [rows, I] and h; same dtypes and layout.
void glu_backward_rows(const at::Tensor& grad_a, const at::Tensor& h, glu::Act act, const at::Tensor& a,
                       const at::Tensor& grad_h);

}  // namespace grouter::cpu
