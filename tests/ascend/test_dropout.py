"""Training with dropout on Ascend: flash attention's bit-packed drop mask and the generator-based
dropout get through MindSpore's type and shape inference, forward and backward."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from emu3 import backend
from tests.ascend.compile_check import ascend_switch, unsupported_on_cpu


class _AttentionStep(nn.Cell):
    """Loss and q/k/v gradients of flash attention with attention dropout."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def construct(self, q, k, v, mask):
        def loss(q, k, v):
            return backend.attention(q, k, v, mask, "flash_attention_2", self.p).astype(ms.float32).sum()
        return ops.value_and_grad(loss, (0, 1, 2))(q, k, v)


def _causal(length):
    return ms.Tensor(np.triu(np.ones((1, 1, length, length), np.bool_), 1))  # True: may not attend


# (heads, kv heads, length): GQA; 3 x 8 x 8 keep bits are not a multiple of the mask generator's 128
@pytest.mark.parametrize("heads, kv_heads, length", [(4, 2, 24), (3, 1, 8)])
def test_flash_attention_training_with_dropout_fails_only_at_kernel_selection(heads, kv_heads, length):
    q = ms.Tensor(np.zeros((2, heads, length, 16), np.float16))
    kv = ms.Tensor(np.zeros((2, kv_heads, length, 16), np.float16))
    with ascend_switch():
        assert unsupported_on_cpu(_AttentionStep(0.1), q, kv, kv, _causal(length)) == "DropoutGenMaskExt"


class _UnpackedMask(nn.Cell):
    # A plausible mistake: one mask byte per score instead of eight bits per byte.
    def construct(self, q, k, v):
        drop_mask = ops.ones((2, 4, 24, 24), ms.uint8)
        return ops.flash_attention_score(q, k, v, 4, drop_mask=drop_mask, keep_prob=0.9, scalar_value=0.25,
                                         input_layout="BNSD")


def test_an_unpacked_drop_mask_is_caught():
    q = ms.Tensor(np.zeros((2, 4, 24, 16), np.float16))
    kv = ms.Tensor(np.zeros((2, 2, 24, 16), np.float16))
    with ascend_switch(), pytest.raises(AssertionError, match="drop_mask"):
        unsupported_on_cpu(_UnpackedMask(), q, kv, kv)


def test_flash_attention_dropout_needs_a_key_length_divisible_by_8():
    x = ms.Tensor(np.zeros((1, 2, 12, 16), np.float16))
    with pytest.raises(ValueError, match="divisible by 8"):
        backend.attention(x, x, x, None, "flash_attention_2", 0.1)


class _Dropout(nn.Cell):
    def construct(self, x):
        return ops.grad(lambda y: (backend.apply_dropout(y, 0.1) * y).sum())(x)


def test_generator_dropout_fails_only_at_kernel_selection():
    with ascend_switch():
        assert unsupported_on_cpu(_Dropout(), ms.Tensor(np.ones((2, 8), np.float16))) == "DropoutExt"
