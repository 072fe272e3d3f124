// routing_plan on the CPU: a stable counting sort of the T*K (token, k) slots by expert.
//   1. each task counts the experts of its token range (a private histogram per task);
//   2. an exclusive scan in (expert, task) order gives every task its first row in each expert;
//   3. each task scatters its slots in ascending (t, k) order from those cursors.
// Tasks cover ascending token ranges, so rows inside an expert come out in ascending (t, k) order
// and the result is the same for any number of tasks or threads.
#include "checks.h"
#include "index_checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace grouter::cpu {
namespace {

template <typename id_t>
void counting_sort(const id_t* ids, int64_t T, int64_t K, int64_t E, int32_t* sorted_tokens,
                   int32_t* row_of, int64_t* offsets) {
  // Enough slots per task to amortise its E-sized histogram and scan column.
  const int64_t slots_per_task = std::max<int64_t>(16384, 4 * E);
  const int64_t tasks = std::clamp<int64_t>(T * K / slots_per_task, 1, at::get_num_threads());
  auto token_begin = [&](int64_t task) { return T * task / tasks; };
  std::vector<int64_t> cursor(tasks * E, 0);  // cursor[task * E + e]

  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      int64_t* count = cursor.data() + task * E;
      for (int64_t i = token_begin(task) * K, n = token_begin(task + 1) * K; i < n; ++i)
        ++count[ids[i]];
    }
  });

  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e] = row;
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n = cursor[task * E + e];
      cursor[task * E + e] = row;
      row += n;
    }
  }
  offsets[E] = row;

  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      int64_t* next = cursor.data() + task * E;
      for (int64_t t = token_begin(task), t_end = token_begin(task + 1); t < t_end; ++t) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t r = next[ids[t * K + k]]++;
          sorted_tokens[r] = static_cast<int32_t>(t);
          row_of[t * K + k] = static_cast<int32_t>(r);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_plan_cpu(const at::Tensor& expert_ids,
                                                                int64_t num_experts) {
  check_expert_ids_args("routing_plan", expert_ids, num_experts);
  const at::Tensor ids = private_indices(expert_ids);
  check_expert_id_values("routing_plan", ids, num_experts);
  const int64_t T = ids.size(0), K = ids.size(1);
  const auto int32 = ids.options().dtype(at::kInt);
  at::Tensor sorted_tokens = at::empty({T * K}, int32);
  at::Tensor row_of = at::empty({T, K}, int32);
  at::Tensor offsets = at::empty({num_experts + 1}, ids.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "grouter_routing_plan_cpu", [&] {
    counting_sort(ids.const_data_ptr<index_t>(), T, K, num_experts,
                  sorted_tokens.mutable_data_ptr<int32_t>(), row_of.mutable_data_ptr<int32_t>(),
                  offsets.mutable_data_ptr<int64_t>());
  });
  return {sorted_tokens, row_of, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(grouter, CPU, m) { m.impl("routing_plan", &routing_plan_cpu); }

}  // namespace grouter::cpu
