"""python -m emu3.cli.reconstruct on an image and a GIF, checked against the PyTorch reference."""

import math

import numpy as np
import pytest
from PIL import Image

from emu3.cli import reconstruct


def _picture(h, w, shift=0):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 9 + shift) % 256, (y * 13) % 256, (x + y + shift) % 256], -1).astype(np.uint8)


def test_image_reconstruction_matches_reference(vq_dirs, reference_vq, torch_reference, tmp_path, capsys):
    torch = torch_reference
    from transformers import Emu3ImageProcessor

    Image.fromarray(_picture(20, 30)).save(tmp_path / "photo.png")
    score = reconstruct.main([str(tmp_path / "photo.png"), "--weights", str(vq_dirs["hf"]),
                              "--output-dir", str(tmp_path / "out"), "--image-area", str(16 * 24)])
    printed = capsys.readouterr().out
    recon = np.asarray(Image.open(tmp_path / "out" / "photo_recon.png"))
    seen = np.asarray(Image.open(tmp_path / "out" / "photo_input.png"))

    ref_proc = Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=384, max_pixels=384)
    pixels = ref_proc(Image.fromarray(_picture(20, 30)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        codes = torch.stack(reference_vq.encode(pixels, torch.tensor([[16, 24]])))
        ref_pixels = reference_vq.decode(codes)
    ref_recon = np.asarray(ref_proc.postprocess(list(ref_pixels), return_tensors="PIL.Image.Image")["pixel_values"][0])
    assert recon.shape == seen.shape == (16, 24, 3)
    # 1e-5 float differences can move a value across an integer when truncating to uint8.
    assert np.abs(recon.astype(int) - ref_recon).max() <= 1
    mse = np.mean((seen.astype(float) - recon) ** 2)
    assert score == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-9)
    assert f"PSNR: {score:.2f} dB" in printed


def test_gif_is_padded_to_whole_clips_and_trimmed_back(vq_dirs, tmp_path, capsys):
    frames = [Image.fromarray(_picture(16, 16, 3 * i)) for i in range(5)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    reconstruct.main([str(tmp_path / "clip.gif"), "--weights", str(vq_dirs["original"]),
                      "--output-dir", str(tmp_path / "out"), "--image-area", "256", "--dtype", "fp16"])
    captured = capsys.readouterr()
    assert "5 frames padded to 8" in captured.err
    assert "codes: (1, 2, 2, 2)" in captured.out
    with Image.open(tmp_path / "out" / "clip_recon.gif") as gif:
        assert gif.n_frames == 5
    assert sorted(p.name for p in (tmp_path / "out").glob("clip_recon_*.png")) == [
        f"clip_recon_{i:04d}.png" for i in range(5)]


def test_random_weights_are_announced(tmp_path, capsys):
    Image.fromarray(_picture(16, 16)).save(tmp_path / "x.png")
    reconstruct.main([str(tmp_path / "x.png"), "--random-weights", "--output-dir", str(tmp_path), "--image-area", "256"])
    assert "RANDOMLY INITIALISED" in capsys.readouterr().err


def test_missing_input_and_weights_choice(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        reconstruct.main([str(tmp_path / "none.png"), "--random-weights"])
    with pytest.raises(SystemExit):
        reconstruct.main([str(tmp_path / "none.png")])  # neither --weights nor --random-weights
