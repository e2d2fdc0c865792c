"""The vision tokenizer's Ascend branch: Conv3d computes in fp16 whatever the model dtype, the norms in fp32.

Ascend's Conv3d takes fp16 only, but Conv3D's type inference accepts any float, so these checks also
read the dtypes inference gave every Conv3D, GroupNorm and BatchNorm node (`inferred_types`). An fp16
Conv3D has a CPU path (through fp32), so the fp32 model's Ascend branch even runs on the CPU.
"""

import mindspore as ms
import numpy as np
import pytest

from emu3 import backend
from emu3.tokenizer import Emu3VisionVQConfig, Emu3VisionVQModel
from emu3.tokenizer.model import Emu3VisionVQCausalConv3d, Emu3VisionVQConv3d
from tests.ascend.compile_check import ascend_switch, unsupported_on_cpu
from tests.ascend.inferred_types import inferred_types

# Two levels keep the compilations short; every kind of layer is still there.
CONFIG = Emu3VisionVQConfig(ch=32, ch_mult=[1, 1], num_res_blocks=1, codebook_size=64)
FP16_CONV3D = (("Float16", "Float16"), ("Float16",))


def _conv3d_count(model):
    return sum(isinstance(cell, Emu3VisionVQConv3d) for _, cell in model.cells_and_names())


def _assert_fp16_conv3d_fp32_norms(types, conv3d_count):
    conv3d = types.of("Conv3D")
    assert len(conv3d) == conv3d_count, "every Conv3d layer of the model was compiled"
    assert all(signature == FP16_CONV3D for signature in conv3d), conv3d
    norms = types.of("GroupNorm") + types.of("BatchNorm")
    assert types.of("GroupNorm") and types.of("BatchNorm")
    assert all(set(inputs) == {"Float32"} for inputs, _ in norms), norms


def test_the_backend_chooses_fp16_on_ascend_and_the_model_dtype_on_cpu():
    for dtype in (ms.float32, ms.float16, ms.bfloat16):
        assert backend.conv3d_compute_dtype(dtype) == dtype
    with ascend_switch():
        for dtype in (ms.float32, ms.float16, ms.bfloat16):
            assert backend.conv3d_compute_dtype(dtype) == ms.float16
        assert Emu3VisionVQModel(CONFIG).conv3d_dtype == ms.float16
    assert Emu3VisionVQModel(CONFIG).conv3d_dtype == ms.float32


def test_fp32_tokenizer_on_ascend_convolves_3d_in_fp16():
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    with ascend_switch(), inferred_types() as types:
        model = Emu3VisionVQModel(CONFIG)
        codes = model.encode(pixels).asnumpy()
        frames = model.decode(codes).asnumpy()
    _assert_fp16_conv3d_fp32_norms(types, _conv3d_count(model))
    assert {p.dtype for p in model.get_parameters()} == {ms.float32}, "the weights keep the model dtype"

    # The CPU computes the same with conv3d_dtype="fp16" (pynative here, graph above).
    cpu = Emu3VisionVQModel(CONFIG, conv3d_dtype="fp16")
    ms.load_param_into_net(cpu, model.parameters_dict(), strict_load=True)
    np.testing.assert_array_equal(cpu.encode(pixels).asnumpy(), codes)
    np.testing.assert_allclose(cpu.decode(codes).asnumpy(), frames, atol=1e-5 * np.abs(frames).max(), rtol=0)


def test_bf16_tokenizer_on_ascend_gets_through_inference_with_fp16_conv3d():
    # bf16 has no CPU kernels: each compiled cell stops at kernel selection, after inference.
    frames = ms.Tensor(np.zeros((1, 1, 3, 16, 16), np.float32)).astype(ms.bfloat16)
    latents = ms.Tensor(np.zeros((1, 4, 1, 8, 8), np.float32)).astype(ms.bfloat16)
    with ascend_switch(), inferred_types() as types:
        model = Emu3VisionVQModel(CONFIG, dtype="bf16")
        for cell, inputs in ((model.encoder, (frames,)), (model.quant_conv, (latents,)), (model.quantize, (latents,)),
                             (model.post_quant_conv, (latents,)), (model.decoder, (latents, latents, True))):
            unsupported_on_cpu(cell, *inputs)
    _assert_fp16_conv3d_fp32_norms(types, _conv3d_count(model))


def test_the_check_catches_a_conv3d_in_the_model_dtype():
    # What the tokenizer did before: Conv3d in the model's bf16. Inference accepts it, the dtype check does not.
    x = ms.Tensor(np.zeros((1, 4, 4, 8, 8), np.float32)).astype(ms.bfloat16)
    with ascend_switch(), inferred_types() as types:
        conv = Emu3VisionVQCausalConv3d(4, 4, (3, 3, 3), (1, 1, 1), ms.bfloat16, ms.bfloat16)
        unsupported_on_cpu(conv, x)
    assert types.of("Conv3D") == [(("BFloat16", "BFloat16"), ("BFloat16",))]
    with pytest.raises(AssertionError):
        _assert_fp16_conv3d_fp32_norms(types, 1)
