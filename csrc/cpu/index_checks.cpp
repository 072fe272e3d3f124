#include "index_checks.h"

#include "checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace grouter::cpu {

at::Tensor private_indices(const at::Tensor& indices) {
  return indices.is_contiguous() ? indices.clone() : indices.contiguous();
}

namespace {

// Above this K a pairwise duplicate scan (K^2/2 compares) loses to a per-task "last seen" table.
constexpr int64_t kPairwiseMaxK = 24;

template <typename id_t>
int64_t first_bad_token(const id_t* ids, int64_t T, int64_t K, int64_t E) {
  int64_t first_bad = T;
  std::mutex mu;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> seen_at;  // seen_at[e] = 1 + last token that used e
    if (K > kPairwiseMaxK) seen_at.assign(E, 0);
    for (int64_t t = begin; t < end; ++t) {
      const id_t* row = ids + t * K;
      bool bad = false;
      for (int64_t k = 0; k < K && !bad; ++k) bad = row[k] < 0 || row[k] >= E;
      if (!bad && K > kPairwiseMaxK) {
        for (int64_t k = 0; k < K && !bad; ++k) {
          bad = seen_at[row[k]] == t + 1;
          seen_at[row[k]] = t + 1;
        }
      } else if (!bad) {
        for (int64_t a = 1; a < K && !bad; ++a)
          for (int64_t b = 0; b < a && !bad; ++b) bad = row[a] == row[b];
      }
      if (bad) {
        std::lock_guard<std::mutex> lock(mu);
        first_bad = std::min(first_bad, t);
        return;
      }
    }
  });
  return first_bad;
}

}  // namespace

void check_expert_id_values(const char* op, const at::Tensor& ids, int64_t num_experts) {
  const int64_t T = ids.size(0), K = ids.size(1);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "grouter_check_expert_ids", [&] {
    const index_t* p = ids.const_data_ptr<index_t>();
    const int64_t bad = first_bad_token(p, T, K, num_experts);
    if (bad < T) raise_bad_token(op, p + bad * K, bad, K, num_experts);
  });
}

// The same verdict as the CUDA check, whatever else is wrong: the first slot holding a row out of
// range (IndexError), else the lowest row named twice (ValueError).
void check_row_of_values(const char* op, const at::Tensor& row_of) {
  const int64_t n = row_of.numel();
  const int32_t* rows = row_of.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    if (rows[i] < 0 || rows[i] >= n) raise_row_out_of_range(op, rows[i], n);
  std::vector<uint8_t> hits(n, 0);
  bool repeated = false;
  for (int64_t i = 0; i < n; ++i) {
    repeated |= hits[rows[i]] != 0;
    hits[rows[i]] = 1;
  }
  if (!repeated) return;
  std::fill(hits.begin(), hits.end(), 0);
  int64_t lowest = n;
  for (int64_t i = 0; i < n; ++i) {
    if (hits[rows[i]]) lowest = std::min<int64_t>(lowest, rows[i]);
    hits[rows[i]] = 1;
  }
  raise_row_repeated(op, lowest);
}

}  // namespace grouter::cpu
