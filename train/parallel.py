"""Multi-process training: process groups, collectives with CPU fallbacks, Ulysses sequence
parallelism and ZeRO-3 parameter partitioning.

Conventions used by every piece here:
- The world is split into data-parallel replicas of `sp_size` consecutive ranks; the ranks of one
  replica share one batch and each holds a contiguous 1/sp_size of its sequence.
- Each rank's loss is its share of the global objective (see trainer.token_loss), so the gradient
  of the global objective is the plain SUM of every rank's gradient. All gradient reductions are
  therefore sums, never means.

Where `emu3.backend.native_collectives()` (Ascend) the real AlltoAll / ReduceScatter run. MindSpore's
CPU backend (mccl) has neither, nor a backward for AllGather, so there they are emulated with
AllGather / AllReduce (more traffic, same numbers) and every op below carries its own backward.
The same code path runs on both devices.
"""

import functools
import math
import os
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.communication import GlobalComm, create_group, get_group_size, get_rank, init

from emu3 import backend


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    sp_size: int = 1
    sp_group: str | None = None  # None: no sequence parallelism
    world_group: str | None = None  # None: single process

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size


def init_parallel(sp_size: int = 1, distributed: bool | None = None) -> ParallelState:
    """Initialise communication (when launched by msrun) and build the sequence-parallel groups."""
    if distributed is None:
        distributed = "MS_WORKER_NUM" in os.environ or "RANK_SIZE" in os.environ
    if not distributed:
        if sp_size != 1:
            raise ValueError(f"sp_size={sp_size} needs a multi-process launch (msrun); got a single process")
        return ParallelState()
    init()
    ms.set_auto_parallel_context(parallel_mode="stand_alone")
    rank, world = get_rank(), get_group_size()
    if world % sp_size:
        raise ValueError(f"the world size {world} is not a multiple of sp_size={sp_size}")
    sp_group = None
    if sp_size > 1:
        if sp_size == world:
            sp_group = GlobalComm.WORLD_COMM_GROUP
        elif not backend.native_collectives():
            raise ValueError(f"sp_size={sp_size} with {world} processes needs communication groups smaller than "
                             f"the world, which MindSpore's CPU backend lacks: use sp_size {world} or 1 on CPU")
        else:
            # Only the members create a group (as in create_group's documented example; MindSpore
            # warns that a rank outside a group "may cause some exception when initializing" it).
            first = rank - rank % sp_size
            sp_group = f"sp_group_{first}"
            create_group(sp_group, list(range(first, first + sp_size)))
    return ParallelState(rank, world, sp_size, sp_group, GlobalComm.WORLD_COMM_GROUP)


def _chunk(x, n: int, index: int, axis: int):
    # Plain static slices: the forms graph mode compiles (ops.narrow / split fail there).
    size = x.shape[axis] // n
    start = index * size
    if axis == 1:
        return x[:, start:start + size]
    return x[:, :, start:start + size]


class AllToAll(nn.Cell):
    """Split `x` along split_axis into group-size pieces, send piece j to rank j, and concatenate what
    arrives (ordered by source rank) along concat_axis. Backward is the inverse exchange."""

    def __init__(self, group: str, split_axis: int, concat_axis: int):
        super().__init__()
        self.size = get_group_size(group)
        self.rank = get_rank(group)
        self.split_axis, self.concat_axis = split_axis, concat_axis
        self.native = backend.native_collectives()
        if self.native:
            self.forward_op = ops.AlltoAll(self.size, split_axis, concat_axis, group=group)
            self.inverse_op = ops.AlltoAll(self.size, concat_axis, split_axis, group=group)
        else:
            self.gather = ops.AllGather(group=group)

    def _emulated(self, x, split_axis: int, concat_axis: int):
        # AllGather stacks every rank's full tensor along a new axis 0; keep the pieces meant for us.
        everything = self.gather(ops.expand_dims(x, 0))
        pieces = [_chunk(everything[j], self.size, self.rank, split_axis) for j in range(self.size)]
        return ops.cat(pieces, concat_axis)

    def construct(self, x):
        if self.native:
            return self.forward_op(x)
        return self._emulated(x, self.split_axis, self.concat_axis)

    def bprop(self, x, out, dout):
        if self.native:
            return (self.inverse_op(dout),)
        return (self._emulated(dout, self.concat_axis, self.split_axis),)


class ReduceScatter(nn.Cell):
    """Sum `x` (first axis divisible by the group size) over the group; rank r keeps chunk r."""

    def __init__(self, group: str):
        super().__init__()
        self.size = get_group_size(group)
        self.rank = get_rank(group)
        self.native = backend.native_collectives()
        if self.native:
            self.op = ops.ReduceScatter(ops.ReduceOp.SUM, group=group)
        else:
            self.op = ops.AllReduce(ops.ReduceOp.SUM, group=group)

    def construct(self, x):
        if self.native:
            return self.op(x)
        total = self.op(x)
        size = total.shape[0] // self.size
        return total[self.rank * size:(self.rank + 1) * size]


class UlyssesAttention(nn.Cell):
    """Sequence-parallel attention core (DeepSpeed-Ulysses).

    Inputs are (B, heads, L/sp, D) for this rank's slice of the sequence. An all-to-all trades the
    sequence split for a head split, so each rank attends over the FULL sequence for heads/sp of
    the heads; a second all-to-all trades back. The wrapped core gets a causal mask over the full
    sequence: training batches are right-padded, so causality alone keeps real tokens from ever
    seeing padding (padding positions carry no loss).
    """

    def __init__(self, core_attention, num_heads: int, num_kv_heads: int, group: str):
        super().__init__()
        self.inner = core_attention  # the model's own attention core (a bound method)
        self.sp = get_group_size(group)
        if num_heads % self.sp:
            raise ValueError(f"{num_heads} attention heads cannot be split over sp_size={self.sp}")
        # Fewer KV heads than ranks: give every rank its own copy of the KV head its queries use.
        self.kv_repeat = 1 if num_kv_heads % self.sp == 0 else self.sp // math.gcd(num_kv_heads, self.sp)
        self.seq_to_heads = AllToAll(group, split_axis=1, concat_axis=2)
        self.heads_to_seq = AllToAll(group, split_axis=2, concat_axis=1)

    def _repeat_kv(self, x):
        if self.kv_repeat == 1:
            return x
        b, h, s, d = x.shape
        return ops.broadcast_to(x[:, :, None], (b, h, self.kv_repeat, s, d)).reshape(b, h * self.kv_repeat, s, d)

    @staticmethod
    @functools.lru_cache(maxsize=2)
    def _causal_mask(length: int):
        # emu3.backend.attention's boolean map (True: not allowed), the format every kernel takes
        # as is: built once per sequence length and shared by every layer and step (at 4k tokens
        # a 16 MB constant; rebuilding it per layer and call cost ~135 ms of host time).
        return ms.Tensor(np.triu(np.ones((length, length), np.bool_), 1))

    def construct(self, q, k, v, mask):
        q = self.seq_to_heads(q)
        k = self.seq_to_heads(self._repeat_kv(k))
        v = self.seq_to_heads(self._repeat_kv(v))
        out = self.inner(q, k, v, self._causal_mask(q.shape[2]))
        return self.heads_to_seq(out)


def _ulysses_core_attention(self, q, k, v, mask):
    return self.ulysses(q, k, v, mask)


def enable_sequence_parallel(model, state: ParallelState) -> int:
    """Route the attention core of every layer of `model` through Ulysses SP; returns how many.

    The attention cell's class is swapped for a subclass whose `core_attention` calls the wrapper,
    which holds the original method, so the model's construct code runs unchanged.
    """
    cfg = model.config
    count = 0
    for _, cell in list(model.cells_and_names()):
        if hasattr(type(cell), "core_attention") and not hasattr(cell, "ulysses"):
            cell.ulysses = UlyssesAttention(cell.core_attention, cfg.num_attention_heads,
                                            cfg.num_key_value_heads, state.sp_group)
            cell.__class__ = type(f"Ulysses{type(cell).__name__}", (type(cell),),
                                  {"core_attention": _ulysses_core_attention})
            count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} has no attention core (core_attention) to wrap")
    return count
