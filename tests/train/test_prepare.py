"""Data preparation: BAAI's two-step resize (grids and pixels), token grids equal the vision
tokenizer's codes; bad images are reported by name and skipped; re-running resumes, redoes what
changed and refuses other settings; one writer per directory; no half-written files."""

import json
import logging
import math
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from emu3.tokenizer import Emu3VisionVQConfig, Emu3VisionVQImageProcessor, Emu3VisionVQModel
from train import prepare_vision_data, prepare_vqa_data
from train.dataset import feature_files, read_feature, read_listing
from emu3.cli.outputs import locked
from train.prepare_common import Tokenizing, area_size

AREA = 32 * 32  # 4x4 token grids
PIXELS = dict(min_pixels=16 * 16, max_pixels=64 * 64)  # the processor's range around AREA


def baai_grid(width, height, area, min_pixels, max_pixels, factor=8):
    """BAAI's emu3/train/prepare_data.py as its description reads, written out independently:
    scale both sides by sqrt(area / (w*h)) and round, then the image processor's smart_resize
    (each side rounded to a multiple of the factor; if that leaves the pixel range, both sides
    scaled into it, floored above the maximum, ceiled below the minimum). Returns token rows, cols."""
    scale = math.sqrt(area / (width * height))
    w, h = int(round(width * scale)), int(round(height * scale))
    rows, cols = round(h / factor), round(w / factor)
    if rows * cols * factor * factor > max_pixels:
        shrink = math.sqrt(h * w / max_pixels)
        rows, cols = max(1, math.floor(h / shrink / factor)), max(1, math.floor(w / shrink / factor))
    elif rows * cols * factor * factor < min_pixels:
        grow = math.sqrt(min_pixels / (h * w))
        rows, cols = math.ceil(h * grow / factor), math.ceil(w * grow / factor)
    return rows, cols


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vq")
    ms.set_seed(0)
    config = Emu3VisionVQConfig(codebook_size=512, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
    Emu3VisionVQModel(config).save_pretrained(directory)
    Emu3VisionVQImageProcessor(**PIXELS).save_pretrained(directory)
    return directory


def tokenizing(vq_dir, area, **pixels):
    directory = vq_dir.parent / f"processor_{area}"
    Emu3VisionVQImageProcessor(**(pixels or PIXELS)).save_pretrained(directory)
    return Tokenizing(SimpleNamespace(vq_path=str(directory), image_area=area, mode="pynative", dtype="fp32"))


def noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_baai_grids_of_the_issue_table(vq_dir):
    """Emu3's defaults: area 720*720, processor 512*512..1024*1024 pixels."""
    tok = tokenizing(vq_dir, 720 * 720, min_pixels=512 * 512, max_pixels=1024 * 1024)
    for (width, height), grid in {(1280, 720): (68, 120), (1000, 750): (78, 104), (512, 768): (110, 74),
                                  (1080, 1350): (101, 80)}.items():
        pixels = tok.pixels(noise(width, height))
        assert pixels.shape[2:] == (grid[0] * 8, grid[1] * 8), (width, height)
        assert baai_grid(width, height, 720 * 720, 512 * 512, 1024 * 1024) == grid


def test_grids_equal_the_restated_rule_over_many_sizes(vq_dir):
    rng = np.random.default_rng(0)
    for area, low, high in ((AREA, 16 * 16, 64 * 64), (AREA, AREA, AREA), (48 * 48, 24 * 24, 48 * 48)):
        tok = tokenizing(vq_dir, area, min_pixels=low, max_pixels=high)
        for _ in range(100):
            width = int(rng.integers(12, 300))
            height = int(np.clip(width * rng.uniform(0.25, 4.0), 12, 500))
            rows, cols = baai_grid(width, height, area, low, high)
            try:
                shape = tok.pixels(Image.new("RGB", (width, height))).shape[2:]
            except ValueError:  # the processor refuses an aspect ratio above 5 after rounding
                w, h = area_size(width, height, area)
                assert max(w, h) / min(w, h) > 5 or min(w, h) < 8, (width, height)
                continue
            assert shape == (rows * 8, cols * 8), (area, low, high, width, height)


def test_pixels_equal_baai_pipeline(vq_dir):
    """Step 1 in PIL (its default filter for RGB is bicubic), step 2 transformers' Emu3 processor."""
    from transformers import Emu3ImageProcessor

    area, pixels = 72 * 72, dict(min_pixels=48 * 48, max_pixels=96 * 96)
    reference = Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, spatial_factor=8, **pixels)
    tok = tokenizing(vq_dir, area, **pixels)
    for (width, height), mode in (((128, 72), "RGB"), ((64, 96), "RGBA"), ((100, 75), "L"), ((108, 135), "P")):
        image = noise(width, height, 2).convert(mode)
        scale = math.sqrt(area / (width * height))
        step1 = image.convert("RGB").resize((int(round(width * scale)), int(round(height * scale))),
                                            Image.Resampling.BICUBIC)
        expected = reference(step1, return_tensors="np")["pixel_values"]
        assert expected.shape[2:] == tuple(8 * n for n in baai_grid(width, height, area, **pixels))
        np.testing.assert_array_equal(tok.pixels(image), expected)


def write_images(root):
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 40)), ("b.jpg", (48, 32))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def expected_codes(vq_dir, path):
    image = Image.open(path).convert("RGB")
    scale = math.sqrt(AREA / (image.width * image.height))
    image = image.resize((int(round(image.width * scale)), int(round(image.height * scale))), Image.Resampling.BICUBIC)
    pixels = Emu3VisionVQImageProcessor.from_pretrained(vq_dir)(image, return_tensors="np")["pixel_values"]
    return Emu3VisionVQModel.from_pretrained(vq_dir).encode(ms.Tensor(pixels)).asnumpy()[0]


def prepare_t2i(tmp_path, vq_dir, pairs, out, area=AREA):
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    prepare_vision_data.main(["--input", str(tmp_path / "pairs.json"), "--vq_path", str(vq_dir),
                              "--output", str(out), "--image_area", str(area)])


def test_vision_data_codes_errors_and_resume(tmp_path, vq_dir, caplog):
    write_images(tmp_path)
    pairs = [{"name": "a", "text": "noise A", "image": "a.png"},
             {"name": "b", "text": "noise B", "image": "b.jpg"},
             {"name": "broken", "text": "x", "image": "broken.png"},
             {"name": "gone", "text": "y", "image": "missing.png"}]
    out = tmp_path / "data"
    with caplog.at_level(logging.WARNING):
        prepare_t2i(tmp_path, vq_dir, pairs, out)
    assert "'broken'" in caplog.text and "'gone'" in caplog.text and "missing.png" in caplog.text
    failed = json.loads((out / "failed.json").read_text())
    assert [f["name"] for f in failed] == ["broken", "gone"]
    assert failed[1]["image"] == str(tmp_path / "missing.png") and "No such file" in failed[1]["error"]
    assert [f.name for f in feature_files(out)] == ["a.npz", "b.npz"]
    assert not list(out.rglob("*.tmp"))
    for name in ("a", "b"):
        sample = read_feature(out / "feature" / f"{name}.npz")
        assert sample["texts"] == f"noise {name.upper()}" and sample["name"] == name
        image = tmp_path / ("a.png" if name == "a" else "b.jpg")
        np.testing.assert_array_equal(sample["images"], expected_codes(vq_dir, image))
    # 32x48 px (w x h) -> 26x39 at area 1024 -> sides rounded to multiples of 8: 24x40 px -> 5 rows x 3 tokens
    assert read_feature(out / "feature" / "b.npz")["images"].shape == (5, 3)
    assert read_listing(out)[1]["image_area"] == AREA and read_listing(out)[1]["task"] == "t2i"

    # the broken image is fixed, a caption changes: only those two samples are prepared again,
    # and failed.json now describes this run (nothing failed but the missing file)
    stamps = {n: (out / "feature" / f"{n}.npz").stat().st_mtime_ns for n in ("a", "b")}
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "broken.png")
    pairs[1]["text"] = "noise B, recaptioned"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        prepare_t2i(tmp_path, vq_dir, pairs, out)
    assert "1 of 4 samples up to date; 1 changed" in caplog.text
    assert (out / "feature" / "a.npz").stat().st_mtime_ns == stamps["a"]
    assert (out / "feature" / "b.npz").stat().st_mtime_ns != stamps["b"]
    assert read_feature(out / "feature" / "b.npz")["texts"] == "noise B, recaptioned"
    assert [f["name"] for f in json.loads((out / "failed.json").read_text())] == ["gone"]
    assert [f.name for f in feature_files(out)] == ["a.npz", "b.npz", "broken.npz"]

    # a changed image file is prepared again too; one that became unreadable is dropped from the listing
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"truncated")
    prepare_t2i(tmp_path, vq_dir, pairs, out)
    np.testing.assert_array_equal(read_feature(out / "feature" / "a.npz")["images"],
                                  expected_codes(vq_dir, tmp_path / "a.png"))
    assert [f.name for f in feature_files(out)] == ["a.npz", "broken.npz"]
    assert [f["name"] for f in json.loads((out / "failed.json").read_text())] == ["b", "gone"]


def test_other_settings_are_refused_and_nothing_is_written(tmp_path, vq_dir, capsys):
    write_images(tmp_path)
    pairs = [{"name": "a", "text": "noise A", "image": "a.png"}]
    out = tmp_path / "data"
    prepare_t2i(tmp_path, vq_dir, pairs, out)
    capsys.readouterr()
    def stamps():
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    before = stamps()
    with pytest.raises(SystemExit) as exit_info:
        prepare_t2i(tmp_path, vq_dir, pairs, out, area=48 * 48)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "image_area=1024 there, 2304 now" in err
    assert stamps() == before
    # VQA preparation into a T2I directory: another task
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Noise."}]}]))
    with pytest.raises(SystemExit):
        prepare_vqa_data.main(["--input", str(tmp_path / "llava.json"), "--vq_path", str(vq_dir),
                               "--output", str(out), "--image_area", str(AREA)])
    assert "task='t2i' there, 'vqa' now" in capsys.readouterr().err


@pytest.mark.parametrize("area, message", [("0", "--image_area must be an integer >= 1"),
                                           ("8192", "lies outside [256, 4096]")])
def test_image_area_is_checked_before_any_image(tmp_path, vq_dir, capsys, area, message):
    write_images(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        prepare_t2i(tmp_path, vq_dir, [{"name": "a", "text": "t", "image": "a.png"}], tmp_path / "d", area)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "d" / "feature").exists()


def test_a_directory_in_use_is_refused(tmp_path, vq_dir, capsys):
    write_images(tmp_path)
    (tmp_path / "d").mkdir()
    with locked(tmp_path / "d", "--output", "data preparation (test)"), pytest.raises(SystemExit):
        prepare_t2i(tmp_path, vq_dir, [{"name": "a", "text": "t", "image": "a.png"}], tmp_path / "d")
    assert "is in use by another run (data preparation (test), pid" in capsys.readouterr().err
    prepare_t2i(tmp_path, vq_dir, [{"name": "a", "text": "t", "image": "a.png"}], tmp_path / "d")
    assert [f.name for f in feature_files(tmp_path / "d")] == ["a.npz"]


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
    assert read_listing(out)[1]["task"] == "vqa"


def test_bad_input_json_is_one_line_naming_the_file(tmp_path, vq_dir, capsys):
    (tmp_path / "pairs.json").write_text('[{"name": "a", "text": 5, "image": "a.png"}]')
    with pytest.raises(SystemExit) as exit_info:
        prepare_vision_data.main(["--input", str(tmp_path / "pairs.json"), "--vq_path", str(vq_dir),
                                  "--output", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "pairs.json: entry 0: text must be a string" in err
    (tmp_path / "pairs.json").write_text('[{"name": "a",')
    with pytest.raises(SystemExit):
        prepare_vision_data.main(["--input", str(tmp_path / "pairs.json"), "--vq_path", str(vq_dir),
                                  "--output", str(tmp_path / "d")])
    assert "pairs.json is not valid JSON" in capsys.readouterr().err
