"""Data preparation: token grids equal the vision tokenizer's codes; bad images are reported by
name and skipped; re-running resumes; no half-written feature files."""

import json
import logging

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from emu3.tokenizer import Emu3VisionVQConfig, Emu3VisionVQImageProcessor, Emu3VisionVQModel
from train import prepare_vision_data, prepare_vqa_data
from train.dataset import feature_files, read_feature

AREA = 32 * 32  # 4x4 token grids


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vq")
    ms.set_seed(0)
    config = Emu3VisionVQConfig(codebook_size=512, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
    Emu3VisionVQModel(config).save_pretrained(directory)
    Emu3VisionVQImageProcessor().save_pretrained(directory)
    return directory


def write_images(root):
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 40)), ("b.jpg", (48, 32))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def expected_codes(vq_dir, path):
    proc = Emu3VisionVQImageProcessor.from_pretrained(vq_dir)
    proc.min_pixels = proc.max_pixels = AREA
    pixels = proc(Image.open(path).convert("RGB"), return_tensors="np")["pixel_values"]
    return Emu3VisionVQModel.from_pretrained(vq_dir).encode(ms.Tensor(pixels)).asnumpy()[0]


def test_vision_data_codes_errors_and_resume(tmp_path, vq_dir, caplog):
    write_images(tmp_path)
    pairs = [{"name": "a", "text": "noise A", "image": "a.png"},
             {"name": "b", "text": "noise B", "image": "b.jpg"},
             {"name": "broken", "text": "x", "image": "broken.png"},
             {"name": "gone", "text": "y", "image": "missing.png"}]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    out = tmp_path / "data"
    argv = ["--input", str(tmp_path / "pairs.json"), "--vq_path", str(vq_dir), "--output", str(out),
            "--image_area", str(AREA)]
    with caplog.at_level(logging.WARNING):
        prepare_vision_data.main(argv)
    assert "'broken'" in caplog.text and "'gone'" in caplog.text and "missing.png" in caplog.text
    assert json.loads((out / "failed.json").read_text()) == ["broken", "gone"]
    assert [f.name for f in feature_files(out)] == ["a.npz", "b.npz"]
    assert not list(out.rglob("*.tmp"))
    for name in ("a", "b"):
        sample = read_feature(out / "feature" / f"{name}.npz")
        assert sample["texts"] == f"noise {name.upper()}" and sample["name"] == name
        image = tmp_path / ("a.png" if name == "a" else "b.jpg")
        np.testing.assert_array_equal(sample["images"], expected_codes(vq_dir, image))
    # 48x32 px above 1024 px: scaled by sqrt(1536/1024), floored to multiples of 8 -> 32x24 px -> 4x3 tokens
    assert read_feature(out / "feature" / "b.npz")["images"].shape == (4, 3)

    stamp = (out / "feature" / "a.npz").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        prepare_vision_data.main(argv)
    assert "2 of 4 samples already prepared" in caplog.text
    assert (out / "feature" / "a.npz").stat().st_mtime_ns == stamp


def test_vqa_data_from_llava_conversations(tmp_path, vq_dir):
    write_images(tmp_path)
    records = [{"id": "r1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Noise."},
        {"from": "human", "value": "Any colour?"}, {"from": "gpt", "value": "All of them."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    out = tmp_path / "vqa"
    prepare_vqa_data.main(["--input", str(tmp_path / "llava.json"), "--vq_path", str(vq_dir),
                           "--output", str(out), "--image_area", str(AREA)])
    first, second = (read_feature(out / "feature" / f"{n}.npz") for n in ("r1", "r1_1"))
    assert (first["texts"], first["response"]) == ("What is this?", "Noise.")
    assert (second["texts"], second["response"]) == ("Any colour?", "All of them.")
    np.testing.assert_array_equal(first["images"], second["images"])
    np.testing.assert_array_equal(first["images"], expected_codes(vq_dir, tmp_path / "a.png"))
