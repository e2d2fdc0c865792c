"""Inputs the tokenizer cannot take get errors that say what to do."""

import numpy as np
import pytest

from emu3.tokenizer import Emu3VisionVQConfig, Emu3VisionVQModel


@pytest.fixture(scope="module")
def model():
    return Emu3VisionVQModel(Emu3VisionVQConfig(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, codebook_size=64))


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 30, 32), r"multiples of 8, got 30x32.*smart_resize"),
    ((1, 4, 32, 32), r"expected 3 colour channels"),
    ((3, 32, 32), r"\(B, 3, H, W\) images or \(B, T, 3, H, W\) videos"),
    ((1, 6, 3, 16, 16), r"multiple of 4 frames \(at least 4\), got 6; drop the last 2 frame\(s\) or repeat the last frame up to 8"),
    ((1, 2, 3, 16, 16), r"multiple of 4 frames \(at least 4\), got 2"),
])
def test_bad_pixels(model, shape, message):
    with pytest.raises(ValueError, match=message):
        model.encode(np.zeros(shape, np.float32))


@pytest.mark.parametrize("codes, message", [
    (np.full((1, 2, 2), 64, np.int32), r"codes must lie in \[0, 64\), got values in \[64, 64\]"),
    (np.full((1, 2, 2), -1, np.int32), r"codes must lie in \[0, 64\)"),
    (np.zeros((1, 2, 2), np.float32), r"codes must be integers"),
    (np.zeros((2, 2), np.int32), r"\(B, h, w\) image codes or \(B, t, h, w\) video codes"),
])
def test_bad_codes(model, codes, message):
    with pytest.raises(ValueError, match=message):
        model.decode(codes)


def test_bad_config_values():
    with pytest.raises(ValueError, match="multiples of 32"):
        Emu3VisionVQConfig(ch=48)
    with pytest.raises(ValueError, match="power of 2"):
        Emu3VisionVQConfig(temporal_downsample_factor=3)


def test_bf16_on_cpu_is_refused_clearly():
    with pytest.raises(ValueError, match="bf16 .* no CPU kernel"):
        Emu3VisionVQModel(Emu3VisionVQConfig(ch=32, ch_mult=[1, 1], num_res_blocks=1, codebook_size=8), dtype="bf16")
