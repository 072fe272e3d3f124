// Argument checks shared by every backend: ranks, dtypes, shapes, devices. They raise
// ValueError (TORCH_CHECK_VALUE) so Python callers can tell bad input from an internal error.
// Checks on values (ids in range, rows forming a permutation) need the data and live with the
// kernels of each backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace grouter {

inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* an,
                              const at::Tensor& b, const char* bn) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "grouter.", op, ": ", an, " is on ", a.device(),
                    " but ", bn, " is on ", b.device());
}

// expert_ids [T, K] of int32/int64 with 0 <= K <= E, E >= 1, and T*K rows addressable by int32.
inline void check_expert_ids_args(const char* op, const at::Tensor& ids, int64_t num_experts) {
  TORCH_CHECK_VALUE(num_experts >= 1, "grouter.", op, ": num_experts must be >= 1, got ",
                    num_experts);
  TORCH_CHECK_VALUE(num_experts <= std::numeric_limits<int32_t>::max(), "grouter.", op,
                    ": num_experts must fit in int32, got ", num_experts);
  TORCH_CHECK_VALUE(ids.dim() == 2, "grouter.", op, ": expert_ids must be 2-D [T, K], got shape ",
                    ids.sizes());
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, "grouter.",
                    op, ": expert_ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.size(1) <= num_experts, "grouter.", op, ": top-k K=", ids.size(1),
                    " exceeds num_experts=", num_experts, " (a token cannot use an expert twice)");
  TORCH_CHECK_VALUE(ids.numel() <= std::numeric_limits<int32_t>::max(), "grouter.", op,
                    ": T*K=", ids.numel(), " rows exceed the int32 row index range");
}

// row_of [T, K] int32, as produced by routing_plan.
inline void check_row_of_args(const char* op, const at::Tensor& row_of) {
  TORCH_CHECK_VALUE(row_of.dim() == 2, "grouter.", op, ": row_of must be 2-D [T, K], got shape ",
                    row_of.sizes());
  TORCH_CHECK_VALUE(row_of.scalar_type() == at::kInt, "grouter.", op,
                    ": row_of must be int32 (as built by routing_plan), got ",
                    row_of.scalar_type());
}

inline void check_activation(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, "grouter.", op, ": ", name, " must be 2-D [rows, H], got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(is_activation_dtype(t.scalar_type()), "grouter.", op, ": ", name,
                    " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_permute_args(const at::Tensor& x, const at::Tensor& row_of) {
  check_activation("permute", x, "x");
  check_row_of_args("permute", row_of);
  check_same_device("permute", x, "x", row_of, "row_of");
  TORCH_CHECK_VALUE(x.size(0) == row_of.size(0), "grouter.permute: x has ", x.size(0),
                    " tokens but the plan has ", row_of.size(0));
}

// weights [T, K] of a float dtype on the device of `like`, or absent.
inline void check_weights_args(const char* op, const c10::optional<at::Tensor>& weights,
                               const at::Tensor& row_of, const at::Tensor& like) {
  if (!weights.has_value() || !weights->defined()) return;
  const at::Tensor& w = *weights;
  TORCH_CHECK_VALUE(w.sizes() == row_of.sizes(), "grouter.", op, ": weights must have shape ",
                    row_of.sizes(), " [T, K], got ", w.sizes());
  TORCH_CHECK_VALUE(is_activation_dtype(w.scalar_type()), "grouter.", op,
                    ": weights must be float32, float64, bfloat16 or float16, got ",
                    w.scalar_type());
  check_same_device(op, like, "the activations", w, "weights");
}

// y [T*K, H], row_of [T, K], weights [T, K] or absent.
inline void check_unpermute_args(const char* op, const at::Tensor& y, const at::Tensor& row_of,
                                 const c10::optional<at::Tensor>& weights) {
  check_activation(op, y, "y");
  check_row_of_args(op, row_of);
  check_same_device(op, y, "y", row_of, "row_of");
  TORCH_CHECK_VALUE(y.size(0) == row_of.numel(), "grouter.", op, ": y has ", y.size(0),
                    " rows but the plan has T*K=", row_of.numel());
  check_weights_args(op, weights, row_of, y);
}

// grad_out [T, H]; y (when given, to get grad_weights) [T*K, H] of grad_out's dtype.
inline void check_unpermute_backward_args(const at::Tensor& grad_out, const at::Tensor& row_of,
                                          const c10::optional<at::Tensor>& weights,
                                          const c10::optional<at::Tensor>& y) {
  constexpr const char* op = "unpermute_backward";
  check_activation(op, grad_out, "grad_out");
  check_row_of_args(op, row_of);
  check_same_device(op, grad_out, "grad_out", row_of, "row_of");
  TORCH_CHECK_VALUE(grad_out.size(0) == row_of.size(0), "grouter.", op, ": grad_out has ",
                    grad_out.size(0), " rows but the plan has ", row_of.size(0), " tokens");
  check_weights_args(op, weights, row_of, grad_out);
  if (!y.has_value() || !y->defined()) return;
  check_unpermute_args(op, *y, row_of, weights);
  TORCH_CHECK_VALUE(y->scalar_type() == grad_out.scalar_type() && y->size(1) == grad_out.size(1),
                    "grouter.", op, ": y (", y->scalar_type(), ", H=", y->size(1),
                    ") does not match grad_out (", grad_out.scalar_type(), ", H=",
                    grad_out.size(1), ")");
}

// Messages for bad index values, shared by the CPU and CUDA checks so both say the same thing.
template <typename id_t>
[[noreturn]] void raise_bad_token(const char* op, const id_t* row, int64_t t, int64_t K, int64_t E) {
  for (int64_t k = 0; k < K; ++k)
    TORCH_CHECK_INDEX(row[k] >= 0 && row[k] < E, "grouter.", op, ": expert id ",
                      static_cast<int64_t>(row[k]), " at [token ", t, ", k ", k,
                      "] is outside [0, ", E, ")");
  for (int64_t a = 1; a < K; ++a)
    for (int64_t b = 0; b < a; ++b)
      TORCH_CHECK_VALUE(row[a] != row[b], "grouter.", op, ": token ", t, " repeats expert ",
                        static_cast<int64_t>(row[a]), " (at k ", b, " and k ", a,
                        "); a token's K expert ids must be distinct");
  TORCH_CHECK(false, "grouter.", op, ": token ", t, " was reported bad but looks valid");
}

[[noreturn]] inline void raise_row_out_of_range(const char* op, int64_t row, int64_t rows) {
  TORCH_CHECK_INDEX(false, "grouter.", op, ": row_of holds row ", row, " outside [0, T*K=", rows,
                    "); pass the plan built by routing_plan");
  __builtin_unreachable();
}

[[noreturn]] inline void raise_row_repeated(const char* op, int64_t row) {
  TORCH_CHECK_VALUE(false, "grouter.", op, ": row_of names row ", row,
                    " twice; it must be a permutation of 0..T*K-1 (use routing_plan)");
  __builtin_unreachable();
}

inline bool has_tensor(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The accumulation dtype of a weighted combine: fp32 for 16/32-bit inputs, fp64 when either the
// activations or the weights are fp64 (so float64 stays float64 end to end).
inline at::ScalarType combine_acc_dtype(const at::Tensor& y, const c10::optional<at::Tensor>& w) {
  const bool wide = y.scalar_type() == at::kDouble || (has_tensor(w) && w->scalar_type() == at::kDouble);
  return wide ? at::kDouble : at::kFloat;
}

// The weights in the accumulation dtype (kernels never convert them per element), or undefined.
inline at::Tensor weights_as(const c10::optional<at::Tensor>& weights, at::ScalarType acc) {
  return has_tensor(weights) ? weights->to(acc).contiguous() : at::Tensor();
}

// A weighted combine's inputs (unpermute, and its backward) as both backends' kernels take them:
// activations contiguous, weights converted once to the accumulation dtype, and the sizes. The
// backend prepares row_of itself (the CPU reads a private copy of what it validated).
struct CombineInputs {
  at::Tensor rows;  // y [T*K, H], or grad_out [T, H] for the backward
  at::Tensor w;     // [T, K] in `acc`, undefined when unweighted
  at::ScalarType acc;
  int64_t T, K, H;
};

inline CombineInputs combine_inputs(const at::Tensor& rows, const at::Tensor& row_of,
                                    const c10::optional<at::Tensor>& weights) {
  const at::ScalarType acc = combine_acc_dtype(rows, weights);
  return {rows.contiguous(), weights_as(weights, acc), acc, row_of.size(0), row_of.size(1), rows.size(1)};
}

}  // namespace grouter
