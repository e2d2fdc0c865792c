"""The Ascend branches of attention, RMSNorm, the KV-cache write and whole decode / prefill /
training graphs, compiled on the CPU with the Ascend switch on: each must fail only at kernel
selection (tests/ascend/compile_check.py)."""

import contextlib
import re

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from emu3 import backend
from emu3.generation.cache import KVCache
from emu3.generation.constraints import VISUAL
from emu3.generation.generate import FORCED_STEP, TEXT, VISUAL_STEP, GenerationConfig, GenerationStep
from emu3.mllm import Emu3ForCausalLM
from tests.ascend.compile_check import ascend_switch, unsupported_on_cpu
from tests.mllm.tiny import tiny_config

DTYPES = [ms.float16, ms.bfloat16]


def _t(x, dtype=ms.int32):
    return ms.Tensor(np.asarray(x), dtype)


class _Attention(nn.Cell):
    def construct(self, q, k, v, masked):
        return backend.attention(q, k, v, masked, "flash_attention_2")


def _qkv(dtype, length):
    """(B, 4 heads, L, 16) query, (B, 2 kv heads, 8 slots, 16) key and value."""
    kv = _t(np.zeros((2, 2, 8, 16)), dtype)
    return _t(np.zeros((2, 4, length, 16)), dtype), kv, kv


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_and_training_attention_is_flash_attention_with_either_mask_shape(dtype):
    q, k, v = _qkv(dtype, 8)
    masked = _t(np.triu(np.ones((2, 1, 8, 8), bool), 1), ms.bool_)
    for mask in (masked, masked[0, 0]):  # (B, 1, L, S) with padding, (L, S) causal only
        with ascend_switch():
            assert unsupported_on_cpu(_Attention(), q, k, v, mask) == "FlashAttentionScore"


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token_decode_is_the_incremental_fused_infer_attention(dtype):
    q, k, v = _qkv(dtype, 1)
    with ascend_switch():
        assert unsupported_on_cpu(_Attention(), q, k, v, _t(np.zeros((2, 1, 1, 8), bool), ms.bool_)) == \
            "FusedInferAttentionScore"


def test_an_additive_float_mask_is_caught():
    # The format the layers used to convert per layer: FlashAttentionScore takes bool/uint8 only.
    q, k, v = _qkv(ms.float16, 8)
    with ascend_switch(), pytest.raises(AssertionError, match=r"attn_mask.*Float32"):
        unsupported_on_cpu(_Attention(), q, k, v, _t(np.zeros((2, 1, 8, 8)), ms.float32))


class _RMSNorm(nn.Cell):
    def construct(self, x, weight):
        return backend.rms_norm(x, weight, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_the_fused_kernel(dtype):
    with ascend_switch():
        assert unsupported_on_cpu(_RMSNorm(), _t(np.ones((2, 3, 16)), dtype), _t(np.ones(16), dtype)) == "RmsNorm"


class _CacheWrite(nn.Cell):
    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def construct(self, key, value, slots):
        return self.cache.update(0, key, value, slots)[0]


@contextlib.contextmanager
def _graph_on_cpu():
    backend.set_run_mode("graph", "CPU")
    try:
        yield
    finally:
        backend.set_run_mode("pynative", "CPU")


def _validated_ir(directory) -> str:
    """The IR of the last compilation after type inference (MindSpore's `validate` stage)."""
    return "".join(path.read_text() for path in sorted(directory.glob("*validate*.ir")))


@pytest.mark.parametrize("on_ascend, op", [(False, "IndexAdd"), (True, "InplaceIndexCopy")])
def test_the_bf16_cache_write_is_an_in_place_index_copy_into_the_parameter(tmp_path, on_ascend, op):
    # The CPU's IndexAdd, which tests/mllm shows to update the cache in place in GRAPH mode, and
    # Ascend's InplaceIndexCopy compile to the same form: a side-effect write into the cache's
    # Parameter itself (not into a loaded copy), ordered by a UMonad.
    dtype = ms.bfloat16 if on_ascend else ms.float32
    kv = _t(np.ones((1, 2, 2, 16)), dtype)
    with ascend_switch() if on_ascend else _graph_on_cpu():
        ms.set_context(save_graphs=True, save_graphs_path=str(tmp_path))
        try:
            write = _CacheWrite(KVCache(1, 1, 2, 8, 16, dtype))
            if on_ascend:
                assert unsupported_on_cpu(write, kv, kv, _t([3, 4])) == op
            else:
                assert write(kv, kv, _t([3, 4])).asnumpy()[0, 0, :, 0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
        finally:
            ms.set_context(save_graphs=False)
    assert re.search(rf"{op}\(%para\d+_[\w.]*kv_cache\.0, [^\n]*UMonad", _validated_ir(tmp_path))


def _model(dtype, fused, **overrides):
    model = Emu3ForCausalLM(tiny_config(**overrides), dtype=dtype, attn_implementation="flash_attention_2")
    assert model.attn_implementation == "flash_attention_2"  # built under the switch: no fallback
    model.set_train(False)
    return model.fuse_projections() if fused else model


@pytest.mark.parametrize("dtype, first_unsupported", [("fp16", "RmsNorm"), ("bf16", "Gather")])
def test_whole_generation_steps_get_through_inference(dtype, first_unsupported):
    # Kernel selection starts only after the whole graph is inferred; the first op without a CPU
    # kernel is RMSNorm in fp16 and the embedding's bf16 gather in bf16.
    with ascend_switch():
        model = _model(dtype, fused=True, vocab_size=184622, pad_token_id=151643, bos_token_id=151849,
                       eos_token_id=151850)  # the image constraint needs the visual tokens
        step = GenerationStep(model, model.init_cache(2, 16), GenerationConfig(guidance_scale=3.0), True,
                              model.config.eos_token_id, model.config.pad_token_id)
        loop = (_t([0]), _t([True], ms.bool_), _t(np.full((1, 1), VISUAL)), _t(np.zeros((1, 1)), ms.float32))
        prefill = (np.ones((2, 8)), np.tile(np.arange(8), (2, 1)), np.arange(8))
        decode = (np.ones((2, 1)), np.full((2, 1), 8), [8])
        for (ids, positions, slots), kind in [(prefill, VISUAL_STEP), (decode, VISUAL_STEP), (decode, FORCED_STEP),
                                              (decode, TEXT)]:
            assert unsupported_on_cpu(step, _t(ids), _t(positions), _t(slots), _t(np.ones((2, 16))), *loop, 16,
                                      kind) == first_unsupported, kind


class _TrainingLoss(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, input_ids, attention_mask, labels):
        return self.model(input_ids, attention_mask, labels=labels)[0]


def test_the_training_forward_with_flash_attention_gets_through_inference():
    with ascend_switch():
        model = _model("fp16", fused=False, attention_dropout=0.0)
        model.set_train(True)
        ids = _t(np.ones((2, 8)))
        assert unsupported_on_cpu(_TrainingLoss(model), ids, ids, ids) == "RmsNorm"
