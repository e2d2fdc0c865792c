"""The static, preallocated KV cache, written in place.

Each layer's keys and values are one (B, kv_heads, max_length, head_dim) Parameter, allocated
once, so every decode step has the same shapes and one compiled graph serves them all.

A step writes its keys and values into their slots in place, with the op that
`emu3.backend.write_cache_slots` picks per device: on the CPU IndexAdd into zeroed slots (0 + x is
exactly x), on Ascend InplaceIndexCopy (documented for bf16, which IndexAdd is not). The obvious
writes copy the whole cache on the CPU every token: a functional scatter returns a new tensor, and
ScatterNdUpdate / slice assignment copy their input (measured: ~0.7 ms per 4 MB layer tensor,
~11 ms a token for the 8-layer benchmark model at 4k slots). So a generation starts with `reset()`,
and each slot is written once.

Attention may read only the first `window` slots (emu3.backend.cache_windows): on the CPU, a
decode step early in a long generation then does not read thousands of empty slots.

The cache is a Cell: a compiled step that holds it updates it in place, and is compiled for its
shape.
"""

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Zero, initializer

from emu3 import backend


class KVCache(nn.Cell):
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int,
                 dtype):
        super().__init__()
        self.batch_size, self.max_length = batch_size, max_length
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.states = ms.ParameterTuple(
            # initializer, not ops.zeros: it allocates on the host, which also makes a bf16 cache on the
            # CPU (no bf16 Zeros kernel there), the one the Ascend compile checks write into.
            Parameter(initializer(Zero(), shape, dtype), name=f"kv_cache.{i}", requires_grad=False)
            for i in range(2 * num_layers))

    def reset(self) -> None:
        """Zero every slot (before a new generation reuses the cache)."""
        for state in self.states:
            ops.assign(state, ops.zeros_like(state))

    def update(self, layer: int, key, value, cache_position, window: int | None = None):
        """Write (B, kv_heads, L, D) `key`/`value` into the empty slots `cache_position` (L,) and
        return `layer`'s keys and values of the first `window` slots (default: all)."""
        keys, values = self.states[2 * layer], self.states[2 * layer + 1]
        # depend: in GRAPH mode a slice of the Parameter is otherwise not ordered after the write.
        keys = ops.depend(keys, backend.write_cache_slots(keys, cache_position, key))
        values = ops.depend(values, backend.write_cache_slots(values, cache_position, value))
        if window is None or window == self.max_length:
            return keys, values
        # Slice, not keys[:, :, :window]: on the CPU runtime a StridedSlice costs several times more.
        begin, size = (0, 0, 0, 0), (keys.shape[0], keys.shape[1], window, keys.shape[3])
        return ops.slice(keys, begin, size), ops.slice(values, begin, size)
