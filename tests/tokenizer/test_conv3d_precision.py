"""fp16 Conv3d (what Ascend computes, whatever the model dtype) on the CPU: against the reference
with the same rounding, and its drift from all-fp32.

The full-size drift figures come from `python -m emu3.cli.vq_conv3d_drift` (docs/vq.md); here the
tiny reference model on photo-like images.
"""

import copy
import math

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from emu3.cli import vq_conv3d_drift
from emu3.cli.vq_conv3d_drift import synthetic_photos
from emu3.tokenizer import Emu3VisionVQModel


@pytest.fixture(scope="module")
def photos():
    return synthetic_photos(4, 32, 48, seed=0)


@pytest.fixture(scope="module")
def fp16_conv3d(vq_dirs):
    return Emu3VisionVQModel.from_pretrained(vq_dirs["original"], conv3d_dtype="fp16")


def _psnr(reference, other):
    mse = np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2)
    return 10 * math.log10(np.ptp(reference) ** 2 / mse)


def test_fp16_conv3d_matches_the_reference_rounding_its_conv3d_to_fp16(fp16_conv3d, reference_vq, torch_reference,
                                                                        photos):
    # The reference, restated: every Conv3d rounds its input and weights to fp16, convolves, rounds
    # the result to fp16 and adds the bias; everything else stays fp32.
    torch = torch_reference
    reference = copy.deepcopy(reference_vq)
    for module in reference.modules():
        if isinstance(module, torch.nn.Conv3d):
            def forward(x, conv=module):
                out = torch.nn.functional.conv3d(x.half().float(), conv.weight.half().float(), None, conv.stride,
                                                 conv.padding, conv.dilation, conv.groups)
                return out.half().float() + conv.bias.view(1, -1, 1, 1, 1)
            module.forward = forward
    with torch.no_grad():
        ref_codes = torch.stack(reference.encode(torch.from_numpy(photos), torch.tensor([[32, 48]] * len(photos))))
        ref_pixels = reference.decode(ref_codes).numpy()
        fp32_pixels = reference_vq.decode(ref_codes).numpy()

    codes = fp16_conv3d.encode(photos).asnumpy()
    np.testing.assert_array_equal(codes, ref_codes.numpy())
    pixels = fp16_conv3d.decode(codes).asnumpy()
    # Measured max abs diff 2.7e-4 (pixel range +-4.9): the summation order differs, so a result can
    # round to the neighbouring fp16 value. The fp32 reference is 3.2e-3 away.
    np.testing.assert_allclose(pixels, ref_pixels, atol=5e-4, rtol=0)
    assert np.abs(pixels - fp32_pixels).max() > 4 * np.abs(pixels - ref_pixels).max()


def test_fp16_conv3d_drifts_little_from_fp32(vq_dirs, fp16_conv3d, photos):
    fp32 = Emu3VisionVQModel.from_pretrained(vq_dirs["original"])
    assert fp16_conv3d.conv3d_dtype == ms.float16 and fp16_conv3d.dtype == ms.float32
    assert fp16_conv3d.encoder.time_conv[0].conv.conv.weight.dtype == ms.float32, "the weights keep the model dtype"

    codes32 = fp32.encode(photos).asnumpy()
    codes16 = fp16_conv3d.encode(photos).asnumpy()
    assert len(np.unique(codes32)) > 20
    # Measured: all identical. A flipped near-tie is possible; more than a few flips are not.
    assert (codes16 == codes32).mean() >= 0.97

    pixels32 = fp32.decode(codes32).asnumpy()
    same_codes = fp16_conv3d.decode(codes32).asnumpy()
    own_codes = fp16_conv3d.decode(codes16).asnumpy()
    assert not np.array_equal(same_codes, pixels32), "the Conv3d layers did compute in fp16"
    for i in range(len(photos)):
        # Measured 80.6 to 83.1 dB (peak: the fp32 reconstruction's range, about 7).
        assert _psnr(pixels32[i], same_codes[i]) >= 70
        assert _psnr(pixels32[i], own_codes[i]) >= 40  # room for one flipped code


def test_drift_command_reports_the_figures_of_its_models(vq_dirs, fp16_conv3d, tmp_path, capsys):
    photo = synthetic_photos(1, 16, 24, seed=5)[0]
    Image.fromarray(np.round((photo.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)).save(tmp_path / "photo.png")
    rows = vq_conv3d_drift.main(["--weights", str(vq_dirs["original"]), "--resolution", "16x24", "--synthetic", "1",
                                 "--images", str(tmp_path / "photo.png"), "--mode", "pynative"])
    printed = capsys.readouterr().out
    assert [r["image"] for r in rows] == ["synthetic 0", str(tmp_path / "photo.png")]
    assert "| synthetic 0 |" in printed

    # The first row, restated: the same synthetic image through both models.
    fp32 = Emu3VisionVQModel.from_pretrained(vq_dirs["original"])
    image = synthetic_photos(1, 16, 24, seed=0)
    codes32, codes16 = fp32.encode(image).asnumpy(), fp16_conv3d.encode(image).asnumpy()
    pixels32 = fp32.decode(codes32).asnumpy()
    assert rows[0]["codes_identical"] == (codes32 == codes16).mean()
    assert rows[0]["psnr_same_codes"] == pytest.approx(_psnr(pixels32, fp16_conv3d.decode(codes32).asnumpy()), abs=1e-6)
    assert rows[0]["psnr_own_codes"] == pytest.approx(_psnr(pixels32, fp16_conv3d.decode(codes16).asnumpy()), abs=1e-6)


def test_drift_command_with_random_weights_and_bad_input():
    rows = vq_conv3d_drift.main(["--random", "tiny", "--resolution", "16x16", "--synthetic", "1", "--mode", "pynative"])
    # Four latents are too few to fit a codebook to, so no bound on the codes here (docs/vq.md has the figures).
    assert 0 <= rows[0]["codes_identical"] <= 1 and rows[0]["psnr_same_codes"] > 40
    for argv in (["--resolution", "20x20"], ["--resolution", "big"], ["--synthetic", "0"]):
        with pytest.raises(SystemExit) as exit_:
            vq_conv3d_drift.main(["--random", "tiny", "--mode", "pynative"] + argv)
        assert exit_.value.code == 2
