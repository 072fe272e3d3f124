// coactivation on the CPU: C[i, j] = tokens whose K ids contain both i and j (C[i, i] = tokens
// routed to i). Each task counts its token range into a private E x E matrix; the partials are
// then added in task order. Integer sums, so the result does not depend on the split.
#include "checks.h"
#include "index_checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace grouter::cpu {
namespace {

// Private matrices beyond the output are capped at this many bytes; large E counts in one task.
constexpr int64_t kPartialBudgetBytes = int64_t{64} << 20;

template <typename id_t>
void count_pairs(const id_t* ids, int64_t T, int64_t K, int64_t E, int64_t* C) {
  const int64_t matrix = E * E;
  const int64_t by_memory = 1 + kPartialBudgetBytes / (matrix * int64_t(sizeof(int64_t)));
  const int64_t by_work = std::max<int64_t>(1, T * K * K / 65536);
  const int64_t tasks = std::min({int64_t(at::get_num_threads()), by_memory, by_work});
  std::vector<int64_t> partial((tasks - 1) * matrix, 0);
  auto matrix_of = [&](int64_t task) { return task == 0 ? C : partial.data() + (task - 1) * matrix; };

  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      int64_t* M = matrix_of(task);
      for (int64_t t = T * task / tasks, t_end = T * (task + 1) / tasks; t < t_end; ++t) {
        const id_t* row = ids + t * K;
        for (int64_t a = 0; a < K; ++a) {
          int64_t* Mi = M + int64_t(row[a]) * E;
          for (int64_t c = 0; c < K; ++c) ++Mi[row[c]];
        }
      }
    }
  });
  if (tasks == 1) return;
  at::parallel_for(0, matrix, 4096, [&](int64_t b, int64_t e) {
    for (int64_t task = 1; task < tasks; ++task) {
      const int64_t* P = matrix_of(task);
      for (int64_t i = b; i < e; ++i) C[i] += P[i];
    }
  });
}

at::Tensor coactivation_cpu(const at::Tensor& expert_ids, int64_t num_experts) {
  check_expert_ids_args("coactivation", expert_ids, num_experts);
  const at::Tensor ids = private_indices(expert_ids);
  check_expert_id_values("coactivation", ids, num_experts);
  at::Tensor C = at::zeros({num_experts, num_experts}, ids.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "grouter_coactivation_cpu", [&] {
    count_pairs(ids.const_data_ptr<index_t>(), ids.size(0), ids.size(1), num_experts,
                C.mutable_data_ptr<int64_t>());
  });
  return C;
}

}  // namespace

TORCH_LIBRARY_IMPL(grouter, CPU, m) { m.impl("coactivation", &coactivation_cpu); }

}  // namespace grouter::cpu
