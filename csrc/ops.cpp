// The grouter operator library: schemas for every op (kernels register per backend in csrc/cpu
// and csrc/cuda) and the Python extension module that loads them.
#include "cuda_checks_switch.h"
#include "cpu/output_cache.h"

#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(grouter, m) {
  // Expert-major order of the T*K (token, k) slots; ascending (t, k) inside each expert.
  m.def("routing_plan(Tensor expert_ids, int num_experts) -> "
        "(Tensor sorted_tokens, Tensor row_of, Tensor expert_offsets)");
  // out[row_of[t, k]] = x[t]
  m.def("permute(Tensor x, Tensor row_of) -> Tensor");
  // out[t] = sum_k weights[t, k] * y[row_of[t, k]]  (weights of 1 when None)
  m.def("unpermute(Tensor y, Tensor row_of, Tensor? weights) -> Tensor");
  // grad_y[row_of[t, k]] = weights[t, k] * grad_out[t]; grad_weights[t, k] = <grad_out[t],
  // y[row_of[t, k]]> when y is given (else empty).
  m.def("unpermute_backward(Tensor grad_out, Tensor row_of, Tensor? weights, Tensor? y) -> "
        "(Tensor grad_y, Tensor grad_weights)");
  // C[i, j] = tokens routed to both i and j; C[i, i] = tokens routed to i.
  m.def("coactivation(Tensor expert_ids, int num_experts) -> Tensor");
  // a = act(gate) * up for h = [gate | up] ([..., 2I] -> [..., I]), fp32 math.
  m.def("glu(Tensor h, str activation) -> Tensor");
  // (a, grad_h) of glu: a recomputed (for the down projection's weight gradient) in the same pass.
  m.def("glu_backward(Tensor grad_a, Tensor h, str activation) -> (Tensor a, Tensor grad_h)");
  // Expert e's rows expert_offsets[e]:[e+1] through its gated MLP: h = rows @ gate_up_proj[e]^T
  // ([N, 2I], returned to be saved for backward), out = glu(h) @ down_proj[e]^T.
  m.def("expert_mlp(Tensor rows, Tensor expert_offsets, Tensor gate_up_proj, Tensor down_proj, str activation) -> "
        "(Tensor out, Tensor h)");
  m.def("expert_mlp_backward(Tensor grad_out, Tensor rows, Tensor h, Tensor expert_offsets, Tensor gate_up_proj, "
        "Tensor down_proj, str activation) -> (Tensor grad_rows, Tensor grad_gate_up, Tensor grad_down)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "grouter compiled core: registers the grouter:: ops with the PyTorch dispatcher";
  m.def("set_cpu_output_cache_limit", &grouter::cpu::set_output_cache_limit, pybind11::arg("bytes"),
        "Bytes of freed large CPU op outputs kept for reuse (0 disables the cache).");
  m.def("cpu_output_cache_limit", &grouter::cpu::output_cache_limit);
  m.def("cpu_output_cache_bytes", &grouter::cpu::output_cache_bytes,
        "Bytes of freed CPU op outputs held for reuse right now.");
  m.def("empty_cpu_output_cache", &grouter::cpu::empty_output_cache,
        "Return every cached CPU output block to the system.");
  m.def("set_cuda_checks", &grouter::set_cuda_checks, pybind11::arg("enabled"),
        "Validate CUDA index inputs before each op (one small device-to-host copy); on by default.");
  m.def("cuda_checks_enabled", &grouter::cuda_checks_enabled);
#ifdef GROUTER_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
