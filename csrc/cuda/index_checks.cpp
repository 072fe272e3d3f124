#include "index_checks.h"

#include "checks.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

namespace grouter::cuda {

void check_expert_id_values(const char* op, const at::Tensor& ids, int64_t num_experts) {
  if (ids.numel() == 0) return;
  at::Tensor bad = ids.lt(0).logical_or_(ids.ge(num_experts)).any(1);
  if (ids.size(1) > 1) {
    const at::Tensor sorted = std::get<0>(ids.sort(1));
    bad.logical_or_(sorted.slice(1, 1).eq(sorted.slice(1, 0, -1)).any(1));
  }
  if (!bad.any().item<bool>()) return;
  const int64_t t = bad.nonzero()[0][0].item<int64_t>();  // nonzero is ascending: the first
  const at::Tensor row = ids[t].cpu();
  AT_DISPATCH_INDEX_TYPES(row.scalar_type(), "grouter_raise_bad_token", [&] {
    raise_bad_token(op, row.const_data_ptr<index_t>(), t, ids.size(1), num_experts);
  });
}

void check_row_of_values(const char* op, const at::Tensor& row_of) {
  const int64_t n = row_of.numel();
  if (n == 0) return;
  const at::Tensor flat = row_of.reshape({-1});
  const at::Tensor outside = flat.lt(0).logical_or_(flat.ge(n));
  // Counts by an integer scatter-add, not at::bincount (which reads min and max back to the host):
  // the one device-to-host copy of a valid plan is the verdict below.
  const at::Tensor clamped = flat.clamp(0, n - 1).to(at::kLong);
  const at::Tensor hits = at::zeros({n}, flat.options()).scatter_add_(0, clamped, at::ones_like(flat));
  const at::Tensor verdict = at::stack({outside.any(), hits.gt(1).any()}).cpu();
  if (verdict[0].item<bool>()) {
    const int64_t i = outside.nonzero()[0][0].item<int64_t>();
    raise_row_out_of_range(op, flat[i].item<int64_t>(), n);
  }
  if (verdict[1].item<bool>()) raise_row_repeated(op, hits.gt(1).nonzero()[0][0].item<int64_t>());
}

}  // namespace grouter::cuda
