"""Emu3VisionVQImageProcessor against transformers' Emu3ImageProcessor with BAAI's settings."""

import numpy as np
import pytest
from PIL import Image

from emu3.tokenizer import Emu3VisionVQImageProcessor
from emu3.tokenizer.image_processor import open_image

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
    path = tmp_path / "preprocessor_config.json"
    for text, message in (('{"min_pixels": "4096"}', r"min_pixels must be an integer >= 1, got '4096'"),
                          ('{"max_pixels": 100}', r"max_pixels must be an integer >= 262144, got 100"),
                          ('{"image_std": [0.5, 0.0, 0.5]}', r"every entry of image_std must be a finite number > 0"),
                          ('{"do_normalize": "no"}', r"do_normalize must be true or false, got 'no'"),
                          ('{"min_pixels": 64', r"is not valid JSON")):
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"{path}:? {message}"):
            Emu3VisionVQImageProcessor.from_pretrained(tmp_path)


def test_sixteen_bit_images_are_scaled_not_clipped(processor, reference_processor, tmp_path):
    grey8 = _rgb(48, 64, 6)[..., 0]
    # Each 8-bit level v as 16 bits is v * 257; noise below half a level must round back to v.
    noise = np.random.default_rng(7).integers(-128, 128, grey8.shape)
    grey16 = np.clip(grey8.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    image = open_image(tmp_path / "deep.png")
    assert image.mode == "RGB"
    expected = np.rint(grey16 * (255 / 65535)).astype(np.uint8)
    np.testing.assert_array_equal(expected, grey8)
    np.testing.assert_array_equal(np.asarray(image), np.repeat(grey8[..., None], 3, -1))
    # Through the processor, a 16-bit image gives what the 8-bit one gives transformers.
    with Image.open(tmp_path / "deep.png") as deep:
        assert deep.mode == "I;16"
        ours = processor(deep)["pixel_values"]
    np.testing.assert_array_equal(ours, reference_processor(Image.fromarray(grey8).convert("RGB"),
                                                            return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("array, message", [
    (np.full((16, 16), 70000, np.int32), r"32-bit integer pixels \(PIL mode I\)"),
    (np.full((16, 16), 0.5, np.float32), r"32-bit floating-point pixels \(PIL mode F\)"),
])
def test_images_without_a_known_range_are_refused(processor, tmp_path, array, message):
    with pytest.raises(ValueError, match=rf"image 0 has {message}"):
        processor(Image.fromarray(array))
    Image.fromarray(array).save(tmp_path / "deep.tiff")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'deep.tiff'} has {message}"):
        open_image(tmp_path / "deep.tiff")


def test_see_through_pixels_are_dropped_like_baai_with_a_warning(processor, reference_processor, caplog):
    rgba = np.concatenate([_rgb(45, 70, 8), np.full((45, 70, 1), 255, np.uint8)], -1)
    with caplog.at_level("WARNING"):
        processor(Image.fromarray(rgba, "RGBA"))
    assert caplog.records == []  # fully opaque: nothing is lost
    rgba[:10, :10, 3] = 0
    palette = Image.fromarray(_rgb(45, 70, 9)).convert("P")
    palette.info["transparency"] = 0
    for image in (Image.fromarray(rgba, "RGBA"), palette):
        caplog.clear()
        with caplog.at_level("WARNING"):
            ours = processor(image)["pixel_values"]
        assert "see-through pixels" in caplog.text
        np.testing.assert_array_equal(ours, reference_processor(image, return_tensors="np")["pixel_values"])


def test_unreadable_files_are_named(tmp_path):
    Image.fromarray(_rgb(64, 64, 10)).save(tmp_path / "photo.png")
    data = (tmp_path / "photo.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'cut.png'} cannot be read as an image: image file is truncated"):
        open_image(tmp_path / "cut.png")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'notes.png'} cannot be read as an image"):
        open_image(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError, match=rf"image file {tmp_path / 'none.png'} does not exist"):
        open_image(tmp_path / "none.png")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "photo.png")), _rgb(64, 64, 10))
