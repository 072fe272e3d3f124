// permute on the CPU: each token's row is read once and written to its K rows of the expert-major
// output (out[row_of[t, k]] = x[t]). A scatter by row_of moves (1 + K) * T * H elements; the
// gather by sorted_tokens would read every source row K times instead of once.
#include "checks.h"
#include "index_checks.h"
#include "cpu/output_cache.h"
#include "cpu/permute.h"
#include "cpu/row_writer.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace grouter::cpu {

at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& row_of) {
  check_permute_args(x, row_of);
  return permute_rows("permute", x, row_of);
}

at::Tensor permute_rows(const char* op, const at::Tensor& x_, const at::Tensor& row_of_) {
  const at::Tensor x = x_.contiguous();
  const at::Tensor row_of = private_indices(row_of_);
  check_row_of_values(op, row_of);
  const int64_t T = x.size(0), H = x.size(1), K = row_of.size(1);
  at::Tensor out = empty_output({T * K, H}, x.options());
  if (out.numel() == 0) return out;

  const int64_t row_bytes = H * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int32_t* rows = row_of.const_data_ptr<int32_t>();
  const RowWriter writer(out.nbytes());
  at::parallel_for(0, T, tokens_per_task(row_bytes * (K + 1)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t k = 0; k < K; ++k)
        writer.write(dst + rows[t * K + k] * row_bytes, src + t * row_bytes, row_bytes);
    writer.finish();
  });
  return out;
}

TORCH_LIBRARY_IMPL(grouter, CPU, m) { m.impl("permute", &permute_cpu); }

}  // namespace grouter::cpu
