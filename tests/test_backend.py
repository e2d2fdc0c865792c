"""The CPU implementations of the device-dependent ops against PyTorch."""

import mindspore as ms
import numpy as np
import pytest

from emu3 import backend


def _causal_mask(q_len, k_len):
    # Queries are the last q_len positions of the k_len keys.
    allowed = np.tril(np.ones((q_len, k_len), bool), k=k_len - q_len)
    return np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_torch_sdpa_with_gqa(torch_reference, rng, kv_heads):
    torch = torch_reference
    q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, kv_heads, 7, 8)).astype(np.float32)
    v = rng.standard_normal((2, kv_heads, 7, 8)).astype(np.float32)
    mask = _causal_mask(5, 7)
    ours = backend.attention(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v), ms.Tensor(mask)).asnumpy()
    rep = 4 // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k).repeat_interleave(rep, 1),
        torch.from_numpy(v).repeat_interleave(rep, 1), attn_mask=torch.from_numpy(mask),
    ).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_rms_norm_matches_torch(torch_reference, rng):
    torch = torch_reference
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    ours = backend.rms_norm(ms.Tensor(x), ms.Tensor(w), 1e-5).asnumpy()
    ref = torch.nn.functional.rms_norm(torch.from_numpy(x), (16,), torch.from_numpy(w), 1e-5).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_rms_norm_fp16_normalises_in_fp32(rng):
    # Values whose squares overflow fp16 must still normalise correctly.
    x = (rng.standard_normal((1, 64)) * 300).astype(np.float16)
    out = backend.rms_norm(ms.Tensor(x), ms.Tensor(np.ones(64, np.float16)), 1e-5).asnumpy()
    x32 = x.astype(np.float32)
    ref = x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-5)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=2e-3, rtol=2e-3)


def test_device_dependent_choices_are_clear_on_cpu():
    assert not backend.on_ascend()
    assert backend.resolve_attn_implementation("flash_attention_2") == "eager"
    with pytest.raises(ValueError, match="attn_implementation"):
        backend.resolve_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="bf16.*CPU"):
        backend.parse_dtype("bf16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        backend.parse_dtype("float8")
    assert backend.parse_dtype("fp16") == ms.float16
    with pytest.raises(ValueError, match="mode must be one of"):
        backend.set_run_mode("eager")
