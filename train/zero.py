"""ZeRO-3: every parameter, its gradient and its optimizer state live as 1/world shards.

Each parameter is flattened, zero-padded to a multiple of the world size and cut into equal
chunks; rank r keeps chunk r as the trainable Parameter (same name as the full one). The cell that
owns the parameter reads it through a `GatherParam` op, which all-gathers the full value just for
that use and whose backward reduce-scatters (sums) the gradient back into the shard. The
optimizer, clipping and loss scaling then see only shards.

Why not mindone.trainers.zero (read in mindone 0.5.0): at stage 3 it only partitions the weights
of nn.Dense/Conv cells whose first dimension divides by the group size (Emu3's 184,622-row
embedding and lm_head would stay whole), it switches the gradient reducer off so the weights it
does not partition (embedding, RMSNorm) are never reduced across ranks, it averages gradients
where sequence parallelism needs sums, its global-norm clipping sees only the local shard, and
its backward uses ReduceScatter, which has no CPU kernel.
"""

import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.communication import get_group_size, get_rank

from train.parallel import ReduceScatter


class GatherParam(nn.Cell):
    """shard (chunk,) -> the full parameter; backward: the summed gradient's chunk."""

    def __init__(self, shape: tuple, group: str):
        super().__init__()
        self.shape = tuple(shape)
        self.numel = int(np.prod(shape))
        size = get_group_size(group)
        self.padded = math.ceil(self.numel / size) * size
        self.gather = ops.AllGather(group=group)
        self.scatter = ReduceScatter(group)

    def construct(self, shard):
        return self.gather(shard)[: self.numel].reshape(self.shape)

    def bprop(self, shard, out, dout):
        flat = dout.reshape(-1).astype(shard.dtype)
        if self.padded > self.numel:
            flat = ops.cat([flat, ops.zeros(self.padded - self.numel, flat.dtype)])
        return (self.scatter(flat),)


def shard_array(full: np.ndarray, size: int, rank: int) -> np.ndarray:
    flat = full.reshape(-1)
    chunk = math.ceil(flat.size / size)
    flat = np.concatenate([flat, np.zeros(chunk * size - flat.size, flat.dtype)])
    return flat[rank * chunk:(rank + 1) * chunk].copy()


def unshard_arrays(shards: list[np.ndarray], shape) -> np.ndarray:
    numel = int(np.prod(shape))
    return np.concatenate([s.reshape(-1) for s in shards])[:numel].reshape(shape)


def _gathered_property(name):
    def read(self):
        return self._zero_gathers[name](self._params[f"zero_{name}"])
    return property(read)


def enable_zero3(model: nn.Cell, group: str) -> dict[str, tuple]:
    """Partition every trainable parameter of `model` in place; returns {name: full shape}.

    The owning cell's class is swapped for a subclass in which `self.<param>` is a property that
    gathers the shard, so the model's own construct code runs unchanged. Switch recompute on after
    this: a recompute cell keeps the parameter list it saw, and would give the shards no gradient.
    """
    # Cell.recompute() stores its recompute cell (and with it the parameter list) in _recompute_cell.
    recomputed = [name or "the model" for name, cell in model.cells_and_names()
                  if cell._recompute_cell is not None]  # pylint: disable=protected-access
    if recomputed:
        raise ValueError(f"recompute is already on for {recomputed[0]}: enable ZeRO-3 first, then recompute "
                         "(a recompute cell keeps the parameters it saw and would not train the shards)")
    size, rank = get_group_size(group), get_rank(group)
    shapes = {}
    for _, cell in list(model.cells_and_names()):
        own = [(k, p) for k, p in cell._params.items() if p is not None and p.requires_grad]
        if not own:
            continue
        gathers = nn.CellDict()
        props = {}
        for key, param in own:
            full_name = param.name
            shapes[full_name] = tuple(param.shape)
            shard = shard_array(param.asnumpy(), size, rank)
            del cell._params[key]
            cell._params[f"zero_{key}"] = ms.Parameter(ms.Tensor(shard), name=full_name)
            gathers[key] = GatherParam(param.shape, group)
            props[key] = _gathered_property(key)
        cell._zero_gathers = gathers
        cell.__class__ = type(f"Zero3{type(cell).__name__}", (type(cell),), props)
    return shapes
