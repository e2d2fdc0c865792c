"""Emu3VisionVQModel against transformers' Emu3VQVAE (PyTorch, CPU) with the same random weights."""

import numpy as np
import pytest

from emu3 import backend
from emu3.tokenizer import Emu3VisionVQModel


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(-1, 1, (2, 3, 32, 48)).astype(np.float32)


@pytest.fixture(scope="module")
def video():
    return np.random.default_rng(2).uniform(-1, 1, (1, 8, 3, 16, 24)).astype(np.float32)


def test_image_codes_and_pixels_match_reference(run_mode, vq_dirs, reference_vq, torch_reference, images):
    torch = torch_reference
    model = Emu3VisionVQModel.from_pretrained(vq_dirs["original"])
    codes = model.encode(images).asnumpy()
    pixels = model.decode(codes).asnumpy()
    with torch.no_grad():
        x = torch.from_numpy(images)
        ref_codes = torch.stack(reference_vq.encode(x, torch.tensor([[32, 48]] * 2)))
        ref_pixels = reference_vq.decode(ref_codes).numpy()
    assert codes.dtype == np.int32 and codes.shape == (2, 4, 6)
    np.testing.assert_array_equal(codes, ref_codes.numpy())
    assert len(np.unique(codes)) > 10  # the codebook search is exercised, not one constant code
    assert pixels.shape == (2, 3, 32, 48)
    np.testing.assert_allclose(pixels, ref_pixels, atol=1e-4, rtol=0)
    if run_mode == "graph":
        backend.set_run_mode("pynative", "CPU")
        np.testing.assert_array_equal(model.encode(images).asnumpy(), codes)
        np.testing.assert_allclose(model.decode(codes).asnumpy(), pixels, atol=1e-5, rtol=0)


def test_video_codes_and_pixels_match_reference_internals(run_mode, vq_dirs, reference_vq, torch_reference, video):
    # transformers' Emu3VQVAE.encode keeps only the first (t, h) slice of video codes, so the
    # reference codes come from its encoder, quant_conv and quantizer directly.
    torch = torch_reference
    model = Emu3VisionVQModel.from_pretrained(vq_dirs["original"])
    codes = model.encode(video).asnumpy()
    pixels = model.decode(codes).asnumpy()
    with torch.no_grad():
        h = reference_vq.encoder(torch.from_numpy(video))
        h = reference_vq.quant_conv(h.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
        ref_codes = reference_vq.quantize(h)
        ref_pixels = reference_vq.decode(ref_codes).numpy()
    assert codes.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(codes, ref_codes.numpy())
    assert pixels.shape == (1, 8, 3, 16, 24)
    np.testing.assert_allclose(pixels, ref_pixels, atol=1e-4, rtol=0)


def test_fp16_tracks_fp32(vq_dirs, images):
    import mindspore as ms

    fp32 = Emu3VisionVQModel.from_pretrained(vq_dirs["original"])
    fp16 = Emu3VisionVQModel.from_pretrained(vq_dirs["original"], dtype="fp16")
    dtypes = {name: p.dtype for name, p in fp16.parameters_and_names()}
    assert dtypes["encoder.conv_in.weight"] == ms.float16
    assert dtypes["encoder.mid.attn_1.q.weight"] == ms.float16
    assert dtypes["encoder.time_res_stack.0.norm1.bn2d.moving_variance"] == ms.float32
    assert dtypes["decoder.mid.block_1.norm1.norm_layer.gamma"] == ms.float32
    assert dtypes["quantize.embedding.embedding_table"] == ms.float32

    codes32 = fp32.encode(images).asnumpy()
    codes16 = fp16.encode(images).asnumpy()
    # fp16 rounding may flip a near-tie in the codebook search, rarely.
    assert (codes16 == codes32).mean() >= 0.9
    pixels32 = fp32.decode(codes32).asnumpy()
    pixels16 = fp16.decode(codes32).asnumpy()
    assert pixels16.dtype == np.float32
    scale = np.abs(pixels32).max()
    assert np.abs(pixels16 - pixels32).max() <= 2e-2 * scale
