"""Emu3VisionVQImageProcessor against transformers' Emu3ImageProcessor with BAAI's settings."""

import numpy as np
import pytest
from PIL import Image

from emu3.tokenizer import Emu3VisionVQImageProcessor

SETTINGS = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], min_pixels=40 * 40, max_pixels=72 * 72)


@pytest.fixture(scope="module")
def reference_processor():
    from transformers import Emu3ImageProcessor

    return Emu3ImageProcessor(**SETTINGS)


@pytest.fixture(scope="module")
def processor():
    return Emu3VisionVQImageProcessor(**SETTINGS)


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _images():
    rgb = _rgb(45, 70)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 128, np.uint8)], -1)
    return {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "L": Image.fromarray(rgb[..., 0]),
        "P": Image.fromarray(rgb).convert("P"),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "large": Image.fromarray(_rgb(300, 200, 1)),
        "small": Image.fromarray(_rgb(9, 30, 2)),
    }


@pytest.mark.parametrize("kind", list(_images()))
def test_pil_images_match_reference(processor, reference_processor, kind):
    image = _images()[kind]
    ours = processor(image, return_tensors="np")["pixel_values"]
    ref = reference_processor(image, return_tensors="np")["pixel_values"]
    assert ours.dtype == np.float32 and ours.shape[:2] == (1, 3)
    assert ours.shape[2] % 8 == 0 and ours.shape[3] % 8 == 0
    np.testing.assert_array_equal(ours, ref)


def test_numpy_and_lists(processor, reference_processor):
    rgb = _rgb(48, 64, 3)
    ref = reference_processor(Image.fromarray(rgb), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(processor(rgb)["pixel_values"], ref)
    np.testing.assert_array_equal(processor(rgb.transpose(2, 0, 1))["pixel_values"], ref)
    batch = processor([rgb, Image.fromarray(rgb)])["pixel_values"]
    assert batch.shape == (2,) + ref.shape[1:]
    np.testing.assert_array_equal(batch[1], ref[0])
    gray = processor(rgb[..., 0])["pixel_values"]
    np.testing.assert_array_equal(gray, processor(Image.fromarray(rgb[..., 0]))["pixel_values"])


def test_smart_resize_matches_reference_where_both_apply(processor):
    from transformers.models.emu3.image_processing_emu3 import smart_resize

    rng = np.random.default_rng(0)
    for h, w in rng.integers(8, 400, (200, 2)):
        if max(h, w) / min(h, w) > 5:
            continue
        assert processor.smart_resize(int(h), int(w)) == smart_resize(
            int(h), int(w), factor=8, min_pixels=SETTINGS["min_pixels"], max_pixels=SETTINGS["max_pixels"])


@pytest.mark.parametrize("size, message", [
    ((7, 40), "too small: both sides must be at least 8"),
    ((20, 101), "aspect ratio 5.05; at most 5 is supported"),
])
def test_smart_resize_errors(processor, size, message):
    with pytest.raises(ValueError, match=message):
        processor.smart_resize(*size)
    with pytest.raises(ValueError, match=message):
        processor(Image.new("RGB", size[::-1]))


def test_bad_images(processor):
    with pytest.raises(ValueError, match="must be uint8"):
        processor(np.zeros((16, 16, 3), np.float32))
    with pytest.raises(TypeError, match="expected a PIL.Image or a uint8 numpy array, got str"):
        processor("cat.png")
    with pytest.raises(ValueError, match="resize to different sizes"):
        processor([_rgb(48, 64), _rgb(64, 48)])


def test_postprocess_matches_reference(processor, reference_processor):
    pixels = np.random.default_rng(4).uniform(-1.1, 1.1, (2, 3, 16, 24)).astype(np.float32)
    ours = processor.postprocess(pixels)["pixel_values"]
    ref = reference_processor.postprocess(list(pixels), return_tensors="PIL.Image.Image")["pixel_values"]
    assert len(ours) == 2 and all(isinstance(img, Image.Image) and img.size == (24, 16) for img in ours)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # postprocess inverts preprocessing to within one grey level (it truncates, as BAAI's does).
    rgb = _rgb(48, 64, 5)
    back = np.asarray(processor.postprocess(processor(rgb)["pixel_values"])["pixel_values"][0])
    assert np.abs(back.astype(int) - rgb).max() <= 1


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = Emu3VisionVQImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 64, "colour": 1}')
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        Emu3VisionVQImageProcessor.from_pretrained(tmp_path)
