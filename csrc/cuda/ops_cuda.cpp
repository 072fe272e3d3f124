// CUDA registrations of the grouter ops: argument checks (shared with the CPU), the device guard,
// allocation on the caching allocator, then the launchers of csrc/cuda/*.cu on the current stream.
#include "checks.h"
#include "glu_checks.h"
#include "cuda_checks_switch.h"
#include "index_checks.h"
#include "cuda/launch.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace grouter::cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK_VALUE(false, "grouter: unsupported dtype ", t.scalar_type());
  }
  __builtin_unreachable();
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_plan_cuda(const at::Tensor& expert_ids,
                                                                 int64_t num_experts) {
  check_expert_ids_args("routing_plan", expert_ids, num_experts);
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const at::Tensor ids = expert_ids.contiguous();
  const bool checked = cuda_checks_enabled();
  if (checked) check_expert_id_values("routing_plan", ids, num_experts);
  const int64_t T = ids.size(0), K = ids.size(1);
  const auto int32 = ids.options().dtype(at::kInt);
  at::Tensor sorted_tokens = at::empty({T * K}, int32);
  at::Tensor row_of = at::empty({T, K}, int32);
  at::Tensor offsets = at::empty({num_experts + 1}, ids.options().dtype(at::kLong));
  const size_t temp_bytes = T * K > 0 ? routing_plan_temp_bytes(T * K, num_experts, checked) : 0;
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, ids.options().dtype(at::kByte));
  C10_CUDA_CHECK(routing_plan(ids.const_data_ptr(), ids.scalar_type() == at::kLong, checked, T, K, num_experts,
                              sorted_tokens.mutable_data_ptr<int32_t>(), row_of.mutable_data_ptr<int32_t>(),
                              offsets.mutable_data_ptr<int64_t>(), temp.mutable_data_ptr(), temp_bytes,
                              stream_of(ids)));
  return {sorted_tokens, row_of, offsets};
}

// permute for arguments `op` has already checked (also the backward of an unweighted unpermute).
at::Tensor permute_rows(const char* op, const at::Tensor& x_, const at::Tensor& row_of_) {
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor row_of = row_of_.contiguous();
  if (cuda_checks_enabled()) check_row_of_values(op, row_of);
  const int64_t T = x.size(0), H = x.size(1), K = row_of.size(1);
  at::Tensor out = at::empty({T * K, H}, x.options());
  C10_CUDA_CHECK(permute(x.const_data_ptr(), row_of.const_data_ptr<int32_t>(), out.mutable_data_ptr(),
                         T, K, H * x.element_size(), stream_of(x)));
  return out;
}

at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& row_of) {
  check_permute_args(x, row_of);
  return permute_rows("permute", x, row_of);
}

at::Tensor unpermute_cuda(const at::Tensor& y_, const at::Tensor& row_of_,
                          const c10::optional<at::Tensor>& weights) {
  check_unpermute_args("unpermute", y_, row_of_, weights);
  const c10::cuda::CUDAGuard guard(y_.device());
  const at::Tensor row_of = row_of_.contiguous();
  if (cuda_checks_enabled()) check_row_of_values("unpermute", row_of);
  const auto [y, w, acc, T, K, H] = combine_inputs(y_, row_of, weights);
  at::Tensor out = at::empty({T, H}, y.options());
  C10_CUDA_CHECK(unpermute(y.const_data_ptr(), row_of.const_data_ptr<int32_t>(),
                           w.defined() ? w.const_data_ptr() : nullptr, out.mutable_data_ptr(), T, K, H,
                           dtype_of(y), acc == at::kDouble, stream_of(y)));
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_out_,
                                                           const at::Tensor& row_of_,
                                                           const c10::optional<at::Tensor>& weights,
                                                           const c10::optional<at::Tensor>& y_) {
  check_unpermute_backward_args(grad_out_, row_of_, weights, y_);
  const c10::cuda::CUDAGuard guard(grad_out_.device());
  if (!has_tensor(weights)) {
    // Unweighted: grad_y is grad_out permuted, and there are no weights to differentiate.
    return {permute_rows("unpermute_backward", grad_out_, row_of_), at::empty({0}, grad_out_.options())};
  }
  const bool want_grad_w = has_tensor(y_);
  const at::Tensor row_of = row_of_.contiguous();
  if (cuda_checks_enabled()) check_row_of_values("unpermute_backward", row_of);
  const auto [grad_out, w, acc, T, K, H] = combine_inputs(grad_out_, row_of, weights);
  const at::Tensor y = want_grad_w ? y_->contiguous() : at::Tensor();
  at::Tensor grad_y = at::empty({T * K, H}, grad_out.options());
  at::Tensor grad_w = want_grad_w ? at::empty({T, K}, grad_out.options().dtype(acc))
                                  : at::empty({0}, grad_out.options());
  C10_CUDA_CHECK(unpermute_backward(grad_out.const_data_ptr(), want_grad_w ? y.const_data_ptr() : nullptr,
                                    row_of.const_data_ptr<int32_t>(), w.const_data_ptr(),
                                    grad_y.mutable_data_ptr(),
                                    want_grad_w ? grad_w.mutable_data_ptr() : nullptr, T, K, H,
                                    dtype_of(grad_out), acc == at::kDouble, stream_of(grad_out)));
  if (want_grad_w) grad_w = grad_w.to(weights->scalar_type());
  return {grad_y, grad_w};
}

at::Tensor coactivation_cuda(const at::Tensor& expert_ids, int64_t num_experts) {
  check_expert_ids_args("coactivation", expert_ids, num_experts);
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const at::Tensor ids = expert_ids.contiguous();
  if (cuda_checks_enabled()) check_expert_id_values("coactivation", ids, num_experts);
  at::Tensor C = at::zeros({num_experts, num_experts}, ids.options().dtype(at::kLong));
  C10_CUDA_CHECK(coactivation(ids.const_data_ptr(), ids.scalar_type() == at::kLong, ids.size(0),
                              ids.size(1), num_experts, C.mutable_data_ptr<int64_t>(), stream_of(ids)));
  return C;
}

at::Tensor glu_cuda(const at::Tensor& h_, c10::string_view activation) {
  const auto sizes = glu::check_h("glu", h_);
  const int act = static_cast<int>(glu::parse_activation(activation));
  const c10::cuda::CUDAGuard guard(h_.device());
  const at::Tensor h = h_.contiguous();
  at::Tensor a = at::empty(sizes, h.options());
  const int64_t I = sizes.back(), rows = I ? h.numel() / (2 * I) : 0;
  C10_CUDA_CHECK(glu(h.const_data_ptr(), a.mutable_data_ptr(), rows, I, dtype_of(h), act, stream_of(h)));
  return a;
}

std::tuple<at::Tensor, at::Tensor> glu_backward_cuda(const at::Tensor& grad_a_, const at::Tensor& h_,
                                                     c10::string_view activation) {
  const auto sizes = glu::check_h("glu_backward", h_);
  glu::check_grad_a(grad_a_, h_, sizes);
  const int act = static_cast<int>(glu::parse_activation(activation));
  const c10::cuda::CUDAGuard guard(h_.device());
  const at::Tensor h = h_.contiguous();
  const at::Tensor grad_a = grad_a_.contiguous();
  at::Tensor a = at::empty(sizes, h.options());
  at::Tensor grad_h = at::empty_like(h);
  const int64_t I = sizes.back(), rows = I ? h.numel() / (2 * I) : 0;
  C10_CUDA_CHECK(glu_backward(grad_a.const_data_ptr(), h.const_data_ptr(), a.mutable_data_ptr(),
                              grad_h.mutable_data_ptr(), rows, I, dtype_of(h), act, stream_of(h)));
  return {a, grad_h};
}

}  // namespace

TORCH_LIBRARY_IMPL(grouter, CUDA, m) {
  m.impl("routing_plan", &routing_plan_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
  m.impl("coactivation", &coactivation_cuda);
  m.impl("glu", &glu_cuda);
  m.impl("glu_backward", &glu_backward_cuda);
}

}  // namespace grouter::cuda
