"""generate()'s callback: the new ids so far after every fetched chunk, and a stop that ends the
generation at that chunk with the ids so far."""

import importlib

import numpy as np

from emu3.generation import GenerationConfig, generate
from tests.generation.test_generate import image_prompts, models, text_prompts, unused_eos  # noqa: F401

generate_module = importlib.import_module("emu3.generation.generate")


def test_callback_sees_every_chunk_and_can_stop(models, rng):
    _, model = models
    ids, mask = text_prompts(rng, [3, 5])
    config = GenerationConfig(max_new_tokens=34, eos_token_id=unused_eos(model, ids, mask, 34))
    full = generate(model, ids, mask, config, progress=False)
    chunks = []
    assert np.array_equal(generate(model, ids, mask, config, progress=False,
                                   callback=lambda new: chunks.append(new.copy())), full)
    every = generate_module._FETCH_EVERY
    assert [c.shape[1] for c in chunks] == [*range(every, 34, every), 34]
    for chunk in chunks:
        np.testing.assert_array_equal(chunk, full[:, ids.shape[1]:ids.shape[1] + chunk.shape[1]])

    calls = []
    stopped = generate(model, ids, mask, config, progress=False, callback=lambda new: calls.append(1) or len(calls) == 2)
    np.testing.assert_array_equal(stopped, full[:, :ids.shape[1] + 2 * every])


def test_parallel_rows_callback_sees_the_image_without_gaps_and_can_stop(models, rng):
    """With parallel_window, later rows run ahead: the callback gets the prefix known without a gap."""
    _, model = models
    ids, mask = image_prompts(model.config, rng, [3])
    config = GenerationConfig(max_new_tokens=(8 + 1) * 10 + 3, parallel_window=2)  # 26 passes
    full = generate(model, ids, mask, config, image_size=(10, 8), progress=False)
    seen = []
    assert np.array_equal(generate(model, ids, mask, config, image_size=(10, 8), progress=False,
                                   callback=lambda new: seen.append(new.copy())), full)
    assert len(seen) == 2 and 0 < seen[0].shape[1] < seen[1].shape[1] == config.max_new_tokens
    for chunk in seen:
        np.testing.assert_array_equal(chunk, full[:, ids.shape[1]:ids.shape[1] + chunk.shape[1]])
    stopped = generate(model, ids, mask, config, image_size=(10, 8), progress=False, callback=lambda new: True)
    np.testing.assert_array_equal(stopped, full[:, :ids.shape[1] + seen[0].shape[1]])
