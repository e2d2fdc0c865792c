"""count_kernels reads the kernels a compiled decode step launches."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from emu3 import backend
from emu3.generation.kernels import count_kernels
from tests.mllm.tiny import tiny_model


class _DecodeStep(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.cache = model.init_cache(1, 16)

    def construct(self, input_ids, position_ids, cache_position, attention_mask):
        return self.model.forward_cached(input_ids, position_ids, cache_position, attention_mask, self.cache)


def _inputs():
    return (ms.Tensor([[5]], ms.int32), ms.Tensor([[3]], ms.int32), ms.Tensor([3], ms.int32),
            ms.Tensor(np.ones((1, 16)), ms.int32))


@pytest.mark.parametrize("fused, matmuls_per_layer", [(False, 7), (True, 4)])
def test_counts_the_matmuls_of_a_decode_step(fused, matmuls_per_layer):
    model = tiny_model()  # 2 layers
    if fused:
        model.fuse_projections()
    backend.set_run_mode("graph", "CPU")
    step = _DecodeStep(model)
    counts = count_kernels(step, *_inputs())
    # q, k, v, o, gate, up, down per layer (fused: qkv, o, gate_up, down), and the lm_head.
    assert counts["MatMul"] == 2 * matmuls_per_layer + 1
    assert counts["BatchMatMul"] == 2 * 2  # scores and weighted values per layer
    with pytest.raises(ValueError, match="already compiled"):
        count_kernels(step, *_inputs())


def test_needs_graph_mode():
    with pytest.raises(ValueError, match="GRAPH mode"):
        count_kernels(_DecodeStep(tiny_model()), *_inputs())
