"""The devices the op tests run on: the CPU always, CUDA where a GPU and grouter's CUDA kernels exist."""

import torch

from grouter import ops

HAS_CUDA = torch.cuda.is_available() and ops.has_cuda_kernels()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
