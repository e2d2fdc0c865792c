"""python -m emu3.cli.reconstruct on an image and a GIF, checked against the PyTorch reference."""

import math
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emu3.cli import outputs, reconstruct

ROOT = Path(__file__).resolve().parents[2]


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


def _refused(args, directory, capsys) -> str:
    """Run the command; return its one error line, after checking that it wrote nothing."""
    before = sorted(directory.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        reconstruct.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "RANDOMLY INITIALISED" not in err
    assert sorted(directory.rglob("*")) == before
    return lines[0]


def test_bad_inputs_and_options_are_refused_before_the_model(vq_dirs, tmp_path, capsys):
    Image.fromarray(_picture(16, 16)).save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    out = ["--output-dir", str(tmp_path / "out")]
    cases = [
        ([str(tmp_path / "none.png"), "--random-weights"], f"error: {tmp_path / 'none.png'} does not exist"),
        ([str(tmp_path / "x.png")], "error: one of the arguments --weights --random-weights is required"),
        ([str(tmp_path / "x.png"), "--random-weights", "--image-area", "nan"],
         "error: argument --image-area: must be an integer in [64, 16777216], got 'nan'"),
        ([str(tmp_path / "x.png"), "--random-weights", "--image-area", str(10 ** 12)],
         "error: argument --image-area: must be an integer in [64, 16777216], got 1000000000000"),
        ([str(tmp_path / "cut.png"), "--random-weights"],
         f"error: {tmp_path / 'cut.png'} cannot be read as an image: image file is truncated"),
        ([str(tmp_path / "x.png"), "--weights", str(tmp_path)], f"error: {tmp_path}/config.json is missing"),
        ([str(tmp_path / "x.png"), "--random-weights", "--output-dir", str(tmp_path / "x.png")],
         f"error: --output-dir {tmp_path / 'x.png'} exists and is not a directory"),
    ]
    for args, message in cases:
        line = _refused(args + (out if "--output-dir" not in args else []), tmp_path, capsys)
        assert line.startswith(message), line


def _run(args, cwd, file_size_limit=None):
    """The command in a fresh process, optionally with the OS refusing files past `file_size_limit`
    bytes (RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk, with no root needed)."""
    def limit():
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "emu3.cli.reconstruct", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit, env={**os.environ, "GLOG_v": "3"})


def test_a_failed_write_keeps_the_previous_outputs_whole(tmp_path):
    Image.fromarray(_picture(16, 16)).save(tmp_path / "x.png")
    args = [str(tmp_path / "x.png"), "--random-weights", "--image-area", "256", "--output-dir", str(tmp_path / "out")]
    first = _run(args, ROOT)
    assert first.returncode == 0, first.stderr
    previous = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert sorted(previous) == ["x_input.png", "x_recon.png"]

    # Another picture under the same name; the OS refuses files past 100 bytes: the small input
    # copy still fits, the reconstruction does not.
    Image.fromarray(_picture(16, 16, shift=77)).save(tmp_path / "x.png")
    second = _run(args, ROOT, file_size_limit=100)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == "error: [Errno 27] File too large"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_input.png", "x_recon.png"]  # no temporary
    assert (tmp_path / "out" / "x_recon.png").read_bytes() == previous["x_recon.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "x_input.png")), _picture(16, 16, 77))


def test_an_output_directory_in_use_is_refused(tmp_path, capsys):
    Image.fromarray(_picture(16, 16)).save(tmp_path / "x.png")
    (tmp_path / "out").mkdir()
    with outputs.locked(tmp_path / "out", "--output-dir"):
        line = _refused([str(tmp_path / "x.png"), "--random-weights", "--output-dir", str(tmp_path / "out")],
                        tmp_path, capsys)
    assert line.startswith(f"error: --output-dir {tmp_path / 'out'} is in use by another run (pid {os.getpid()}")
