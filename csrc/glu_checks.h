// Argument checks and activation names of glu / glu_backward, shared by the CPU and CUDA kernels.
#pragma once

#include "glu_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string_view>
#include <vector>

namespace grouter::glu {

inline Act parse_activation(std::string_view name) {
  if (name == "silu") return Act::silu;
  if (name == "gelu") return Act::gelu;
  if (name == "gelu_tanh") return Act::gelu_tanh;
  if (name == "relu") return Act::relu;
  TORCH_CHECK_VALUE(false, "grouter.glu: unknown activation '", name, "' (have silu, gelu, gelu_tanh, relu)");
}

// h = [..., 2 * I] (gate | up) in float32, bfloat16 or float16; returns the shape of a, [..., I].
inline std::vector<int64_t> check_h(const char* op, const at::Tensor& h) {
  TORCH_CHECK_VALUE(h.defined() && h.dim() >= 1 && h.size(-1) % 2 == 0, "grouter.", op,
                    ": h must end in an even dimension [..., 2 * I] (gate | up), got shape ",
                    h.defined() ? h.sizes() : c10::IntArrayRef{});
  const auto dtype = h.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "grouter.", op,
                    ": h must be float32, bfloat16 or float16, got ", dtype);
  auto sizes = h.sizes().vec();
  sizes.back() /= 2;
  return sizes;
}

inline void check_grad_a(const at::Tensor& grad_a, const at::Tensor& h, const std::vector<int64_t>& sizes) {
  TORCH_CHECK_VALUE(grad_a.defined() && grad_a.sizes() == c10::IntArrayRef(sizes) &&
                        grad_a.scalar_type() == h.scalar_type() && grad_a.device() == h.device(),
                    "grouter.glu_backward: grad_a must be ", c10::IntArrayRef(sizes), " ", h.scalar_type(), " on ",
                    h.device(), " (the shape of a), got ",
                    grad_a.defined() ? grad_a.sizes() : c10::IntArrayRef{}, " ",
                    grad_a.defined() ? grad_a.scalar_type() : at::ScalarType::Undefined);
}

}  // namespace grouter::glu
