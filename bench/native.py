"""The torch-native dispatch paths the op benchmarks compare with (CPU and GPU)."""

import torch


def native_permute(ids, x, K):
    """argsort + index_select."""
    order = ids.reshape(-1).argsort(stable=True)
    return x.index_select(0, order // K)


def native_unpermute(ids, y, w, K):
    """argsort + index_add_ of the weighted rows."""
    order = ids.reshape(-1).argsort(stable=True)
    out = torch.zeros(ids.shape[0], y.shape[1], device=y.device, dtype=y.dtype)
    return out.index_add_(0, order // K, y * w.reshape(-1)[order, None].to(y.dtype))
