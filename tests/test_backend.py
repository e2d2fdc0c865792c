"""The CPU implementations of the device-dependent ops against PyTorch."""

import mindspore as ms
import numpy as np
import pytest

from emu3 import backend


def _masked(rng, q_len, k_len, batch=2):
    """(B, 1, L, S) boolean map, True = not allowed: causal (queries are the last q_len of the
    k_len positions) with random extra keys masked, never a query's own position."""
    allowed = np.tril(np.ones((q_len, k_len), bool), k=k_len - q_len)
    allowed = allowed & (rng.random((batch, 1, q_len, k_len)) > 0.3)
    allowed[..., np.arange(q_len), np.arange(k_len - q_len, k_len)] = True
    return ~allowed


def _sdpa(torch, q, k, v, masked):
    rep = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k).repeat_interleave(rep, 1),
        torch.from_numpy(v).repeat_interleave(rep, 1), attn_mask=torch.from_numpy(~masked)).numpy()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("q_len", [5, 1])
def test_attention_matches_torch_sdpa_with_gqa(torch_reference, rng, kv_heads, q_len):
    q = rng.standard_normal((2, 4, q_len, 8)).astype(np.float32)
    k = rng.standard_normal((2, kv_heads, 7, 8)).astype(np.float32)
    v = rng.standard_normal((2, kv_heads, 7, 8)).astype(np.float32)
    masked = _masked(rng, q_len, 7)
    for mask in (masked, masked[0, 0]):  # the two shapes the model passes: (B, 1, L, S) and (L, S)
        ours = backend.attention(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v), ms.Tensor(mask)).asnumpy()
        np.testing.assert_allclose(ours, _sdpa(torch_reference, q, k, v, mask), atol=1e-5, rtol=1e-5)


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
