"""Emu3VisionVQImageProcessor: images to the tokenizer's input pixels and back.

Preprocessing follows BAAI's Emu3VisionVQImageProcessor: convert to RGB, resize (bicubic) to the
`smart_resize` size, scale to [0, 1], normalise with mean = std = 0.5, channels first. The
arithmetic mirrors transformers' (float64 rescale, float32 normalise; truncation back to uint8),
so both produce the same arrays.
"""

import json
import logging
import math
from pathlib import Path

import mindspore as ms
import numpy as np
from PIL import Image

from emu3 import checks
from emu3.weights import read_json

logger = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"
# Keys a preprocessor_config.json may carry that do not change the result.
_METADATA_KEYS = frozenset({"image_processor_type", "auto_map", "processor_class", "size", "do_pad"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """`image` as 8-bit RGB, the way BAAI's processor converts it, except where that loses the picture.

    PIL's own conversion clips 16-bit greys to 255 (an almost white image): they are scaled to
    8 bits instead. 32-bit integer and float images have no known range and are refused. Alpha is
    dropped as BAAI's processor drops it (the colours under see-through pixels show), with a
    warning when some pixel is see-through. `name` says which image in messages.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.rint(np.asarray(image, dtype=np.float64) * (255 / 65535)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("I", "F"):
        kind = "integer" if image.mode == "I" else "floating-point"
        raise ValueError(f"{name} has 32-bit {kind} pixels (PIL mode {image.mode}), whose range is not known: "
                         "save it as an 8- or 16-bit image first")
    if image.has_transparency_data and image.convert("RGBA").getextrema()[3][0] < 255:
        logger.warning("%s has see-through pixels: like BAAI's processor, the alpha channel is dropped and the "
                       "colours stored under them show; flatten it onto a background first if that is not wanted",
                       name)
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"{name} (PIL mode {image.mode}) cannot be converted to RGB: {err}") from None


def open_image(path) -> Image.Image:
    """The image file at `path`, decoded in full now (a truncated or unreadable file fails here,
    naming the file, not later inside the model) and converted with `to_rgb`."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image, str(path)).copy()
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path} is too large to be read safely: {err}") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except OSError as err:  # unidentified format, truncated data, a directory, no permission
        raise ValueError(f"{path} cannot be read as an image: {err}") from None


class Emu3VisionVQImageProcessor:
    def __init__(self, do_resize=True, resample=Image.Resampling.BICUBIC, do_rescale=True,
                 rescale_factor=1 / 255, do_normalize=True, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5), do_convert_rgb=True, min_pixels=512 * 512,
                 max_pixels=1024 * 1024, spatial_factor=8):
        for name, flag in (("do_resize", do_resize), ("do_rescale", do_rescale), ("do_normalize", do_normalize),
                           ("do_convert_rgb", do_convert_rgb)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        for name, values, low in (("image_mean", image_mean, None), ("image_std", image_std, 0.0)):
            if not isinstance(values, (list, tuple)) or len(values) != 3:
                raise ValueError(f"{name} must be 3 numbers (one per colour channel), got {values!r}")
            for value in values:
                checks.real(f"every entry of {name}", value, low=low, low_open=True)
        self.do_resize = do_resize
        self.resample = checks.integer("resample", resample, low=0)
        self.do_rescale = do_rescale
        self.rescale_factor = checks.real("rescale_factor", rescale_factor, low=0.0, low_open=True)
        self.do_normalize = do_normalize
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.do_convert_rgb = do_convert_rgb
        self.spatial_factor = checks.integer("spatial_factor", spatial_factor, low=1)
        self.min_pixels = checks.integer("min_pixels", min_pixels, low=1)
        self.max_pixels = checks.integer("max_pixels", max_pixels, low=min_pixels)

    # ---------------------------------------------------------------- config
    def to_dict(self) -> dict:
        return {
            "do_resize": self.do_resize, "resample": self.resample, "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
            "image_mean": self.image_mean, "image_std": self.image_std, "do_convert_rgb": self.do_convert_rgb,
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "spatial_factor": self.spatial_factor,
            "image_processor_type": type(self).__name__,
        }

    @classmethod
    def from_pretrained(cls, directory) -> "Emu3VisionVQImageProcessor":
        path = Path(directory) / PREPROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the tokenizer directory needs a {PREPROCESSOR_FILE}")
        values = read_json(path, "the image processor's settings")
        known = set(cls().to_dict()) - {"image_processor_type"}
        unknown = sorted(set(values) - known - _METADATA_KEYS)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**{k: v for k, v in values.items() if k in known})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PREPROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    # ---------------------------------------------------------------- preprocessing
    def smart_resize(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) nearest the input that are multiples of `spatial_factor` and hold
        between min_pixels and max_pixels pixels, keeping the aspect ratio."""
        f = self.spatial_factor
        if height < f or width < f:
            raise ValueError(f"image of {height}x{width} pixels is too small: both sides must be at least {f}")
        ratio = max(height, width) / min(height, width)
        if ratio > 5:
            raise ValueError(
                f"image of {height}x{width} pixels has aspect ratio {ratio:.2f}; at most 5 is supported, "
                "crop it first"
            )
        h_bar, w_bar = round(height / f) * f, round(width / f) * f
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h_bar = max(f, math.floor(height / beta / f) * f)
            w_bar = max(f, math.floor(width / beta / f) * f)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / f) * f
            w_bar = math.ceil(width * beta / f) * f
        return h_bar, w_bar

    def __call__(self, images, return_tensors="np") -> dict:
        """One image or a list (PIL of any mode, or uint8 numpy HW / HWC / CHW) -> {"pixel_values":
        float32 (B, 3, H, W)}, as numpy ("np") or a MindSpore tensor ("ms")."""
        if return_tensors not in ("np", "ms"):
            raise ValueError(f"return_tensors must be 'np' or 'ms', got {return_tensors!r}")
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("got an empty list of images")
            arrays = [self._preprocess(img, i) for i, img in enumerate(images)]
        else:
            arrays = [self._preprocess(images, 0)]
        sizes = {a.shape[1:] for a in arrays}
        if len(sizes) > 1:
            raise ValueError(
                f"the images resize to different sizes {sorted(sizes)} and cannot form one batch; "
                "process them one at a time or give them the same size"
            )
        pixels = np.stack(arrays)
        return {"pixel_values": ms.Tensor(pixels) if return_tensors == "ms" else pixels}

    preprocess = __call__

    def resize(self, image, index=0) -> Image.Image:
        """The image as the model sees it before scaling: RGB, at its smart_resize size."""
        image = self._to_pil(image, index)
        if self.do_resize:
            height, width = self.smart_resize(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        return image

    def _preprocess(self, image, index) -> np.ndarray:
        pixels = np.asarray(self.resize(image, index))
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.do_normalize:
            pixels = (pixels - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def _to_pil(self, image, index) -> Image.Image:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(self._to_hwc_uint8(image, index))
        elif not isinstance(image, Image.Image):
            raise TypeError(
                f"image {index}: expected a PIL.Image or a uint8 numpy array, got {type(image).__name__}"
            )
        if image.mode != "RGB":
            if not self.do_convert_rgb:
                raise ValueError(f"image {index} has mode {image.mode}; set do_convert_rgb=True to convert it")
            image = to_rgb(image, f"image {index}")
        return image

    @staticmethod
    def _to_hwc_uint8(array, index) -> np.ndarray:
        if array.dtype != np.uint8:
            raise ValueError(
                f"image {index}: numpy images must be uint8 in [0, 255], got {array.dtype}; "
                "for floats in [0, 1] use (x * 255).round().astype(np.uint8)"
            )
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # channels first
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim == 2:
            return np.repeat(array[..., None], 3, axis=-1)
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            return np.ascontiguousarray(array[..., :3])
        raise ValueError(f"image {index}: expected an (H, W), (H, W, C) or (C, H, W) array, got shape {array.shape}")

    # ---------------------------------------------------------------- postprocessing
    def postprocess(self, pixels) -> dict:
        """(B, 3, H, W) or (3, H, W) pixels (numpy or MindSpore, ~[-1, 1]) -> {"pixel_values": [PIL.Image]}."""
        if isinstance(pixels, ms.Tensor):
            pixels = pixels.astype(ms.float32).asnumpy()
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"postprocess expects (B, 3, H, W) or (3, H, W) pixels, got shape {pixels.shape}")
        if self.do_normalize:
            mean, std = np.array(self.image_mean), np.array(self.image_std)
            rev_mean = (-mean / std).astype(np.float32)[:, None, None]
            rev_std = (1 / std).astype(np.float32)[:, None, None]
            pixels = (pixels - rev_mean) / rev_std
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * (1.0 / self.rescale_factor)).astype(np.float32)
        images = pixels.clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return {"pixel_values": [Image.fromarray(np.ascontiguousarray(img)) for img in images]}
