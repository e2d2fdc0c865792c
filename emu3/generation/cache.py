"""The static, preallocated KV cache.

One (B, kv_heads, max_length, head_dim) key tensor and one value tensor per layer, allocated once
per generation, so every decode step has the same shapes and one compiled graph serves them all.
The cache is an `ms.mutable` tuple (k0, v0, k1, v1, ...): as a graph input it is a variable, not a
constant, so passing it in does not trigger a recompilation per step.
"""

import mindspore as ms
from mindspore import ops


def init_cache(num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int, dtype):
    shape = (batch_size, num_kv_heads, max_length, head_dim)
    return ms.mutable(tuple(ops.zeros(shape, dtype) for _ in range(2 * num_layers)))


def write(cache, states, cache_position):
    """`cache` with (B, kv_heads, L, D) `states` written at slots `cache_position` (L,)."""
    idx = ops.broadcast_to(cache_position.reshape(1, 1, -1, 1), states.shape)
    return ops.tensor_scatter_elements(cache, idx, states, axis=2)
