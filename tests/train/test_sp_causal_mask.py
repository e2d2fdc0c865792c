"""Sequence parallelism's causal mask: emu3.backend.attention's format, built once per length."""

import numpy as np

from train.parallel import UlyssesAttention


def test_the_causal_mask_is_built_once_per_length_in_the_kernels_format():
    mask = UlyssesAttention._causal_mask(6)
    assert UlyssesAttention._causal_mask(6) is mask  # every layer and step shares one tensor
    # True (not allowed) exactly above the diagonal: each position sees itself and the past.
    np.testing.assert_array_equal(mask.asnumpy(), ~np.tri(6, dtype=bool))
