// unpermute (weighted combine) on the CPU, and its fused backward.
//   forward : out[t] = sum_k w[t, k] * y[row_of[t, k]], accumulated in acc_t in k order
//   backward: grad_y[row_of[t, k]] = w[t, k] * grad_out[t]
//             grad_w[t, k]         = <grad_out[t], y[row_of[t, k]]>   (same pass over y's rows)
// Each token is owned by one task and every sum has a fixed order, so results are bitwise equal
// for any thread count. Built with -ffp-contract=off so `acc += w * y` rounds the product and
// the sum separately, exactly like the PyTorch reference.
#include "checks.h"
#include "index_checks.h"
#include "cpu/output_cache.h"
#include "cpu/permute.h"
#include "cpu/row_writer.h"
#include "cpu/vector_loops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace grouter::cpu {
namespace {

// Columns per step: a block of acc_t partial sums stays in L1 while K rows stream through it.
// A multiple of kLanes, so column h always lands in dot lane h mod kLanes.
constexpr int64_t kBlock = 512;
static_assert(kBlock % kLanes == 0);

template <typename scalar_t, typename acc_t>
void combine_kernel(const scalar_t* y, const int32_t* row_of, const acc_t* w, scalar_t* out,
                    int64_t T, int64_t K, int64_t H) {
  const RowWriter writer(T * H * int64_t(sizeof(scalar_t)));
  at::parallel_for(0, T, tokens_per_task(H * (K + 1) * int64_t(sizeof(scalar_t))),
                   [&](int64_t b, int64_t e) {
    acc_t acc[kBlock];
    scalar_t res[kBlock];
    for (int64_t t = b; t < e; ++t) {
      for (int64_t h0 = 0; h0 < H; h0 += kBlock) {
        const int64_t n = std::min(kBlock, H - h0);
        std::fill_n(acc, n, acc_t(0));
        for (int64_t k = 0; k < K; ++k)
          axpy_row(acc, y + int64_t(row_of[t * K + k]) * H + h0, w ? w[t * K + k] : acc_t(1), n);
        cast_row(res, acc, n);
        writer.write(reinterpret_cast<char*>(out + t * H + h0), reinterpret_cast<const char*>(res),
                     n * int64_t(sizeof(scalar_t)));
      }
    }
    writer.finish();
  });
}

template <typename scalar_t, typename acc_t>
void combine_backward_kernel(const scalar_t* grad_out, const scalar_t* y, const int32_t* row_of,
                             const acc_t* w, scalar_t* grad_y, acc_t* grad_w, int64_t T,
                             int64_t K, int64_t H) {
  const RowWriter writer(T * K * H * int64_t(sizeof(scalar_t)));
  const int64_t rows_read = grad_w ? 2 * K + 1 : K + 1;
  at::parallel_for(0, T, tokens_per_task(H * rows_read * int64_t(sizeof(scalar_t))),
                   [&](int64_t b, int64_t e) {
    scalar_t res[kBlock];
    for (int64_t t = b; t < e; ++t) {
      const scalar_t* g = grad_out + t * H;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = row_of[t * K + k];
        const acc_t wk = w[t * K + k];
        const scalar_t* yr = grad_w ? y + r * H : nullptr;
        acc_t lane[kLanes] = {};
        for (int64_t h0 = 0; h0 < H; h0 += kBlock) {
          const int64_t n = std::min(kBlock, H - h0);
          scale_row(res, g + h0, wk, n);
          writer.write(reinterpret_cast<char*>(grad_y + r * H + h0),
                       reinterpret_cast<const char*>(res), n * int64_t(sizeof(scalar_t)));
          if (grad_w) dot_lanes(lane, g + h0, yr + h0, n);
        }
        if (grad_w) grad_w[t * K + k] = sum_lanes(lane);
      }
    }
    writer.finish();
  });
}

// Runs body.template operator()<scalar_t, acc_t>() for y's dtype and the accumulation dtype.
template <typename Body>
void dispatch_combine(const at::Tensor& y, at::ScalarType acc, Body&& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "grouter_combine", [&] {
    if (acc == at::kDouble)
      body.template operator()<scalar_t, double>();
    else
      body.template operator()<scalar_t, float>();
  });
}

at::Tensor unpermute_cpu(const at::Tensor& y_, const at::Tensor& row_of_,
                         const c10::optional<at::Tensor>& weights) {
  check_unpermute_args("unpermute", y_, row_of_, weights);
  const at::Tensor row_of = private_indices(row_of_);
  check_row_of_values("unpermute", row_of);
  const auto [y, w, acc, T, K, H] = combine_inputs(y_, row_of, weights);
  at::Tensor out = empty_output({T, H}, y.options());
  if (out.numel() == 0) return out;
  dispatch_combine(y, acc, [&]<typename scalar_t, typename acc_t>() {
    combine_kernel<scalar_t, acc_t>(y.const_data_ptr<scalar_t>(), row_of.const_data_ptr<int32_t>(),
                                    w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                                    out.mutable_data_ptr<scalar_t>(), T, K, H);
  });
  return out;
}

// grad_weights is computed only when y is given (the weights need a gradient); otherwise, and
// when there are no weights, it is an empty tensor.
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_out_,
                                                          const at::Tensor& row_of_,
                                                          const c10::optional<at::Tensor>& weights,
                                                          const c10::optional<at::Tensor>& y_) {
  check_unpermute_backward_args(grad_out_, row_of_, weights, y_);
  if (!has_tensor(weights)) {
    // Unweighted: grad_y is grad_out permuted, and there are no weights to differentiate.
    return {permute_rows("unpermute_backward", grad_out_, row_of_), at::empty({0}, grad_out_.options())};
  }
  const bool want_grad_w = has_tensor(y_);
  const at::Tensor row_of = private_indices(row_of_);
  check_row_of_values("unpermute_backward", row_of);
  const auto [grad_out, w, acc, T, K, H] = combine_inputs(grad_out_, row_of, weights);
  const at::Tensor y = want_grad_w ? y_->contiguous() : at::Tensor();
  at::Tensor grad_y = empty_output({T * K, H}, grad_out.options());
  at::Tensor grad_w = want_grad_w ? at::empty({T, K}, grad_out.options().dtype(acc))
                                  : at::empty({0}, grad_out.options());
  if (T * K > 0) {
    dispatch_combine(grad_out, acc, [&]<typename scalar_t, typename acc_t>() {
      combine_backward_kernel<scalar_t, acc_t>(
          grad_out.const_data_ptr<scalar_t>(), want_grad_w ? y.const_data_ptr<scalar_t>() : nullptr,
          row_of.const_data_ptr<int32_t>(), w.const_data_ptr<acc_t>(),
          grad_y.mutable_data_ptr<scalar_t>(),
          want_grad_w ? grad_w.mutable_data_ptr<acc_t>() : nullptr, T, K, H);
    });
  }
  if (want_grad_w) grad_w = grad_w.to(weights->scalar_type());
  return {grad_y, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(grouter, CPU, m) {
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace grouter::cpu
