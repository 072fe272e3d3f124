// grouter::expert_mlp and its backward on the CPU: the gated MLP of every expert over its slice
// of expert-major rows, one expert at a time. Per expert the GEMMs run with the fused activation
// between them, on buffers of that expert's rows that are still in cache when the next GEMM reads
// them; [N, I] intermediates never exist (the activation is recomputed in the backward from h).
// Outputs come from the recycled-block cache: a fresh [N, 2I] output costs milliseconds of
// first-touch page faults, as much as the activation itself.
#include "cpu/glu.h"
#include "cpu/output_cache.h"
#include "glu_checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>
#include <vector>

namespace grouter::cpu {
namespace {

using glu::Act;

struct Slice {
  int64_t expert, start, rows;
};

// The non-empty experts' row slices; raises unless the offsets tile [0, rows) in order (else rows
// would be left unwritten or read past the end).
std::vector<Slice> expert_slices(const at::Tensor& offsets_in, int64_t rows, int64_t experts) {
  TORCH_CHECK_VALUE(offsets_in.dim() == 1 && offsets_in.device().is_cpu() &&
                        (offsets_in.scalar_type() == at::kLong || offsets_in.scalar_type() == at::kInt),
                    "grouter.expert_mlp: expert_offsets must be a 1-D int64 CPU tensor [E + 1], got ",
                    offsets_in.sizes(), " ", offsets_in.scalar_type(), " on ", offsets_in.device());
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t* b = offsets.const_data_ptr<int64_t>();
  const int64_t n = offsets.numel();
  bool ok = n == experts + 1 && b[0] == 0 && b[n - 1] == rows;
  for (int64_t e = 0; ok && e + 1 < n; ++e) ok = b[e + 1] >= b[e];
  if (!ok) {
    std::ostringstream got;
    for (int64_t i = 0; i < n; ++i) {
      if (n > 16 && i == 8) {
        got << "..., ";
        i = n - 8;
      }
      got << b[i] << (i + 1 < n ? ", " : "");
    }
    TORCH_CHECK_VALUE(false, "grouter.expert_mlp: expert offsets must rise from 0 to the ", rows, " rows over the ",
                      experts, " experts (", experts + 1, " values), got [", got.str(), "]");
  }
  std::vector<Slice> slices;
  for (int64_t e = 0; e < experts; ++e)
    if (b[e + 1] > b[e]) slices.push_back({e, b[e], b[e + 1] - b[e]});
  return slices;
}

struct Shapes {
  int64_t N, H, I, E;
};

Shapes check_weights(const at::Tensor& rows, const at::Tensor& gate_up, const at::Tensor& down) {
  TORCH_CHECK_VALUE(rows.dim() == 2 && at::isFloatingType(rows.scalar_type()),
                    "grouter.expert_mlp: rows must be a floating [N, H] tensor, got ", rows.sizes(), " ",
                    rows.scalar_type());
  const int64_t N = rows.size(0), H = rows.size(1);
  TORCH_CHECK_VALUE(gate_up.dim() == 3 && gate_up.size(2) == H && gate_up.size(1) % 2 == 0,
                    "grouter.expert_mlp: gate_up_proj must be [E, 2I, H=", H, "], got ", gate_up.sizes());
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK_VALUE(down.dim() == 3 && down.size(0) == E && down.size(1) == H && down.size(2) == I,
                    "grouter.expert_mlp: down_proj must be [E=", E, ", H=", H, ", I=", I, "], got ", down.sizes());
  TORCH_CHECK_VALUE(gate_up.scalar_type() == rows.scalar_type() && down.scalar_type() == rows.scalar_type(),
                    "grouter.expert_mlp: rows, gate_up_proj and down_proj must share a dtype, got ",
                    rows.scalar_type(), ", ", gate_up.scalar_type(), ", ", down.scalar_type());
  TORCH_CHECK_VALUE(gate_up.device() == rows.device() && down.device() == rows.device(),
                    "grouter.expert_mlp: rows, gate_up_proj and down_proj must be on one device, got ", rows.device(),
                    ", ", gate_up.device(), ", ", down.device());
  return {N, H, I, E};
}

bool fused(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}

// fp64 (gradcheck) and other dtypes the fused loops do not take: the same formulas in ATen ops.
at::Tensor act_of(Act act, const at::Tensor& g) {
  switch (act) {
    case Act::silu: return at::silu(g);
    case Act::gelu: return at::gelu(g);
    case Act::gelu_tanh: return at::gelu(g, "tanh");
    case Act::relu: return at::relu(g);
  }
  return {};
}

at::Tensor act_backward_of(Act act, const at::Tensor& grad, const at::Tensor& g) {
  switch (act) {
    case Act::silu: return at::silu_backward(grad, g);
    case Act::gelu: return at::gelu_backward(grad, g);
    case Act::gelu_tanh: return at::gelu_backward(grad, g, "tanh");
    case Act::relu: return at::threshold_backward(grad, g, 0);
  }
  return {};
}

void glu_into(const at::Tensor& h, Act act, at::Tensor a) {
  if (fused(h)) return glu_rows(h, act, a);
  const int64_t I = a.size(1);
  at::mul_out(a, act_of(act, h.narrow(1, 0, I)), h.narrow(1, I, I));
}

void glu_backward_into(const at::Tensor& grad_a, const at::Tensor& h, Act act, at::Tensor a,
                       const at::Tensor& grad_h) {
  if (fused(h)) return glu_backward_rows(grad_a, h, act, a, grad_h);
  const int64_t I = a.size(1);
  const at::Tensor g = h.narrow(1, 0, I), u = h.narrow(1, I, I), act_g = act_of(act, g);
  at::mul_out(a, act_g, u);
  grad_h.narrow(1, 0, I).copy_(act_backward_of(act, at::mul(grad_a, u), g));
  at::Tensor grad_u = grad_h.narrow(1, I, I);
  at::mul_out(grad_u, grad_a, act_g);
}

int64_t max_rows(const std::vector<Slice>& slices) {
  int64_t m = 0;
  for (const Slice& s : slices) m = std::max(m, s.rows);
  return m;
}

std::tuple<at::Tensor, at::Tensor> expert_mlp_cpu(const at::Tensor& rows_in, const at::Tensor& expert_offsets,
                                                  const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
                                                  c10::string_view activation) {
  const Shapes s = check_weights(rows_in, gate_up_proj, down_proj);
  const Act act = glu::parse_activation(activation);
  const auto slices = expert_slices(expert_offsets, s.N, s.E);
  const at::Tensor rows = rows_in.contiguous();
  const auto options = rows.options();
  at::Tensor out = empty_output({s.N, s.H}, options);
  at::Tensor h = empty_output({s.N, 2 * s.I}, options);
  at::Tensor a = empty_output({max_rows(slices), s.I}, options);  // one expert's activation at a time
  for (const Slice& e : slices) {
    at::Tensor h_e = h.narrow(0, e.start, e.rows), a_e = a.narrow(0, 0, e.rows), out_e = out.narrow(0, e.start, e.rows);
    at::mm_out(h_e, rows.narrow(0, e.start, e.rows), gate_up_proj[e.expert].t());
    glu_into(h_e, act, a_e);
    at::mm_out(out_e, a_e, down_proj[e.expert].t());
  }
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_mlp_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& rows_in, const at::Tensor& h_in, const at::Tensor& expert_offsets,
    const at::Tensor& gate_up_proj, const at::Tensor& down_proj, c10::string_view activation) {
  const Shapes s = check_weights(rows_in, gate_up_proj, down_proj);
  TORCH_CHECK_VALUE(grad_out_in.sizes() == rows_in.sizes() && grad_out_in.scalar_type() == rows_in.scalar_type() &&
                        h_in.dim() == 2 && h_in.size(0) == s.N && h_in.size(1) == 2 * s.I &&
                        h_in.scalar_type() == rows_in.scalar_type(),
                    "grouter.expert_mlp_backward: grad_out must be [N, H] = ", rows_in.sizes(), " and h [N, 2I] = [",
                    s.N, ", ", 2 * s.I, "] in ", rows_in.scalar_type(), ", got ", grad_out_in.sizes(), " ",
                    grad_out_in.scalar_type(), " and ", h_in.sizes(), " ", h_in.scalar_type());
  const Act act = glu::parse_activation(activation);
  const auto slices = expert_slices(expert_offsets, s.N, s.E);
  const at::Tensor rows = rows_in.contiguous(), h = h_in.contiguous(), grad_out = grad_out_in.contiguous();
  const auto options = rows.options();
  at::Tensor grad_rows = empty_output({s.N, s.H}, options);
  at::Tensor grad_gate_up = empty_output(gate_up_proj.sizes(), options);
  at::Tensor grad_down = empty_output(down_proj.sizes(), options);
  if (static_cast<int64_t>(slices.size()) < s.E) {  // experts without rows get zero gradients
    grad_gate_up.zero_();
    grad_down.zero_();
  }
  // One expert's grad_a, a and grad_h at a time, each read by the GEMMs right after it is written.
  const int64_t m = max_rows(slices);
  at::Tensor grad_a = empty_output({m, s.I}, options), a = empty_output({m, s.I}, options);
  at::Tensor grad_h = empty_output({m, 2 * s.I}, options);
  for (const Slice& e : slices) {
    const at::Tensor x_e = rows.narrow(0, e.start, e.rows), go_e = grad_out.narrow(0, e.start, e.rows);
    at::Tensor ga_e = grad_a.narrow(0, 0, e.rows), a_e = a.narrow(0, 0, e.rows), gh_e = grad_h.narrow(0, 0, e.rows);
    at::mm_out(ga_e, go_e, down_proj[e.expert]);
    glu_backward_into(ga_e, h.narrow(0, e.start, e.rows), act, a_e, gh_e);
    at::Tensor grad_down_e = grad_down[e.expert], grad_gate_up_e = grad_gate_up[e.expert];
    at::Tensor grad_rows_e = grad_rows.narrow(0, e.start, e.rows);
    at::mm_out(grad_down_e, go_e.t(), a_e);
    at::mm_out(grad_gate_up_e, gh_e.t(), x_e);
    at::mm_out(grad_rows_e, gh_e, gate_up_proj[e.expert]);
  }
  return {grad_rows, grad_gate_up, grad_down};
}

}  // namespace

TORCH_LIBRARY_IMPL(grouter, CPU, m) {
  m.impl("expert_mlp", &expert_mlp_cpu);
  m.impl("expert_mlp_backward", &expert_mlp_backward_cpu);
}

}  // namespace grouter::cpu
