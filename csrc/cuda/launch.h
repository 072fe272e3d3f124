// Host-callable launchers of the CUDA kernels. They take raw device pointers and the current
// stream, so the .cu files need no torch headers (fast nvcc builds, no header clashes); the
// torch-facing wrappers (argument checks, allocation, device guard) are in ops_cuda.cpp.
// Every launcher enqueues on `stream` and returns the launch status (cudaGetLastError).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace grouter::cuda {

enum class DType { kFloat32, kFloat64, kBFloat16, kFloat16 };

// routing_plan: stable radix sort of the T*K slots by expert (CUB), then a scatter and a
// lower-bound search for the offsets. Ids outside [0, E) sort into a trailing bucket (when checks
// are off: ids_checked false), so no index ever leaves its array. `temp` holds
// routing_plan_temp_bytes(n, E, ids_checked) bytes (CUB's storage is queried once there).
size_t routing_plan_temp_bytes(int64_t n, int64_t num_experts, bool ids_checked);
cudaError_t routing_plan(const void* ids, bool ids_int64, bool ids_checked, int64_t T, int64_t K,
                         int64_t num_experts, int32_t* sorted_tokens, int32_t* row_of, int64_t* offsets,
                         void* temp, size_t temp_bytes, cudaStream_t stream);

// permute: one block per token reads its row once and writes its K rows. Rows outside
// [0, T*K) in row_of are skipped.
cudaError_t permute(const void* x, const int32_t* row_of, void* out, int64_t T, int64_t K,
                    int64_t row_bytes, cudaStream_t stream);

// unpermute: one block per token; acc = 0, acc += w[t,k] * y[row_of[t,k]] in k order, in fp32
// (fp64 when acc_double). w is in the accumulation dtype, or null for weights of 1.
cudaError_t unpermute(const void* y, const int32_t* row_of, const void* w, void* out, int64_t T,
                      int64_t K, int64_t H, DType dtype, bool acc_double, cudaStream_t stream);

// unpermute backward: grad_y[row_of[t,k]] = w[t,k] * grad_out[t] and, when grad_w is not null,
// grad_w[t,k] = <grad_out[t], y[row_of[t,k]]> reduced in a fixed order inside the block.
cudaError_t unpermute_backward(const void* grad_out, const void* y, const int32_t* row_of,
                               const void* w, void* grad_y, void* grad_w, int64_t T, int64_t K,
                               int64_t H, DType dtype, bool acc_double, cudaStream_t stream);

// coactivation: C (int64 [E, E], zeroed by the caller) += pair counts, with integer atomics in
// shared-memory tiles when E*E fits, else in global memory. Ids outside [0, E) are skipped.
cudaError_t coactivation(const void* ids, bool ids_int64, int64_t T, int64_t K, int64_t num_experts,
                         int64_t* C, cudaStream_t stream);

// glu: a[r, c] = act(h[r, c]) * h[r, I + c] for h [rows, 2I]; glu_backward also writes
// grad_h = [grad_a * up * act'(gate) | grad_a * act(gate)] and a. act: glu::Act as an int.
cudaError_t glu(const void* h, void* a, int64_t rows, int64_t I, DType dtype, int act, cudaStream_t stream);
cudaError_t glu_backward(const void* grad_a, const void* h, void* a, void* grad_h, int64_t rows, int64_t I,
                         DType dtype, int act, cudaStream_t stream);

}  // namespace grouter::cuda
