"""Run from outside the repository with a CUDA torch: every compiled grouter op must have a CUDA
kernel. grouter::expert_mlp and its backward have a C++ CPU kernel and, for every other device, a
Python composite of torch ops and grouter::glu (CompositeExplicitAutograd)."""

import sys

import torch

import grouter

names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("grouter::"))
missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")
           and not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CompositeExplicitAutograd")]
print(f"grouter {grouter.__file__}: torch {torch.__version__}, CUDA backend built: {grouter.ops.has_cuda_kernels()}")
print("ops with a CUDA kernel:", ", ".join(n for n in names if n not in missing))
if not grouter.ops.has_cuda_kernels() or not names or missing:
    sys.exit(f"missing CUDA kernels: {missing or 'the whole backend'}")
