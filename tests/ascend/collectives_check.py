"""Compile the Ascend branches of the training collectives on the CPU; run by test_collectives.py under
msrun with 2 processes (the collectives need communication initialised).

Prints one line per branch: `CHECK <name>: <op without a CPU kernel>` or `CHECK <name>: FAILED <error>`.
"""

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.communication import GlobalComm, init

from tests.ascend.compile_check import ascend_switch, unsupported_on_cpu
from train.parallel import AllToAll, ReduceScatter
from train.zero import GatherParam


class _Backward(nn.Cell):
    """The gradient of sum(cell(x) * weights) with respect to x: runs the cell's bprop."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.grad = ops.GradOperation(sens_param=True)

    def construct(self, x, sens):
        return self.grad(self.cell)(x, sens)


def _checks(group):
    x = ms.Tensor(np.arange(2 * 4 * 6 * 8, dtype=np.float16).reshape(2, 4, 6, 8))  # (B, heads, L/sp, D)
    seq_to_heads = np.zeros((2, 2, 12, 8), np.float16)  # heads split over 2 ranks, whole sequence
    shard = ms.Tensor(np.zeros(5, np.float32))  # a (3, 3) parameter padded to 10, cut in 2
    return {
        "AllToAll": (lambda: AllToAll(group, split_axis=1, concat_axis=2), (x,)),
        "AllToAll backward": (lambda: _Backward(AllToAll(group, split_axis=1, concat_axis=2)),
                              (x, ms.Tensor(seq_to_heads))),
        "ReduceScatter": (lambda: ReduceScatter(group), (ms.Tensor(np.zeros((4, 3), np.float32)),)),
        "GatherParam backward": (lambda: _Backward(GatherParam((3, 3), group)),
                                 (shard, ms.Tensor(np.ones((3, 3), np.float32)))),
    }


def main():
    init()
    for name, (build, inputs) in _checks(GlobalComm.WORLD_COMM_GROUP).items():
        with ascend_switch():
            try:
                result = unsupported_on_cpu(build(), *inputs)
            except AssertionError as err:
                result = "FAILED " + " ".join(str(err).split())[:2000]
        print(f"CHECK {name}: {result}", flush=True)


if __name__ == "__main__":
    main()
