"""The check itself: it passes a correct Ascend-only call and catches a wrong one."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from tests.ascend.compile_check import ascend_switch, unsupported_on_cpu


class _FlashAttention(nn.Cell):
    def __init__(self, keep_prob):
        super().__init__()
        self.keep_prob = keep_prob

    def construct(self, q, k, v, mask):
        return ops.flash_attention_score(q, k, v, 4, attn_mask=mask, keep_prob=self.keep_prob, scalar_value=0.25,
                                         input_layout="BNSD")


def _inputs():
    q = ms.Tensor(np.zeros((1, 4, 8, 16), np.float16))
    kv = ms.Tensor(np.zeros((1, 2, 8, 16), np.float16))
    return q, kv, kv, ms.Tensor(np.zeros((1, 1, 8, 8), np.uint8))


def test_a_correct_call_fails_only_at_kernel_selection():
    with ascend_switch():
        assert unsupported_on_cpu(_FlashAttention(1.0), *_inputs()) == "FlashAttentionScore"


def test_a_wrong_call_is_caught():
    # keep_prob < 1 needs a drop_mask: FlashAttentionScore's type inference refuses None.
    with ascend_switch(), pytest.raises(AssertionError, match="drop_mask"):
        unsupported_on_cpu(_FlashAttention(0.9), *_inputs())


def test_a_cpu_computation_is_not_mistaken_for_an_ascend_branch():
    with ascend_switch(), pytest.raises(AssertionError, match="ran on the CPU"):
        unsupported_on_cpu(nn.Dense(4, 4), ms.Tensor(np.zeros((1, 4), np.float32)))
