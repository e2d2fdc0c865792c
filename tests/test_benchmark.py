"""The benchmark's kernel counter on a cell whose kernels are known."""

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from emu3 import backend
from emu3.cli.benchmark import count_kernels


class _FiveKernels(nn.Cell):
    def __init__(self):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)
        self.weight = ms.Parameter(ms.Tensor(np.ones((8, 8), np.float32)), name="weight")

    def construct(self, x):
        return ops.softmax(self.matmul(x, self.weight) * 2.0 + 1.0, -1).sum()  # MatMul, Mul, Add, Softmax, ReduceSum


def test_count_kernels_reads_the_compiled_graph():
    backend.set_run_mode("graph", "CPU")
    cell = _FiveKernels()
    x = ms.Tensor(np.ones((2, 8), np.float32))
    assert count_kernels(lambda: cell(x).asnumpy()) == 5
    assert count_kernels(lambda: cell(x).asnumpy()) is None  # nothing compiled: the graph was cached
