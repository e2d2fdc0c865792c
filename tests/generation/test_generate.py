"""Generation against transformers' generate with the same random weights (greedy, CFG, the image
constraint), seeded sampling, graph mode == pynative, and compilations that don't grow with length."""

import importlib

import numpy as np
import pytest

from emu3 import backend, weights
from emu3.generation import GenerationConfig, build_prefix_constraint, generate
from emu3.generation.constraints import visual_token_ids

# The module, not the function of the same name that emu3.generation exports.
generate_module = importlib.import_module("emu3.generation.generate")

# Full vocabulary (visual tokens must exist), tiny everything else.
TINY = dict(vocab_size=184622, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)
HEIGHT, WIDTH = 3, 4  # a 3x4 token image: 3 * 5 + 3 = 18 new tokens
EMU3_CONFIG = None  # set by the models fixture


@pytest.fixture(scope="module")
def models(torch_reference, tmp_path_factory):
    from transformers import Emu3ForCausalLM as TorchEmu3ForCausalLM, Emu3TextConfig
    from emu3.mllm.config import Emu3Config
    from emu3.mllm.model import Emu3ForCausalLM

    config = Emu3Config(**TINY)
    torch_reference.manual_seed(0)
    global EMU3_CONFIG
    EMU3_CONFIG = config
    reference = TorchEmu3ForCausalLM(Emu3TextConfig(
        **TINY, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)).eval()
    directory = tmp_path_factory.mktemp("tiny_emu3")
    weights.write_checkpoint({k: v.numpy() for k, v in reference.state_dict().items()}, directory, config.to_dict())
    return reference, Emu3ForCausalLM.from_pretrained(directory)


def reference_generate(torch, reference, ids, mask, max_new_tokens, eos, negative_ids=None, image_size=None):
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                  pad_token_id=reference.config.pad_token_id)
    if negative_ids is not None:
        kwargs.update(negative_prompt_ids=torch.from_numpy(negative_ids).long(),
                      negative_prompt_attention_mask=torch.ones(negative_ids.shape, dtype=torch.long),
                      guidance_scale=3.0)
    if image_size is not None:
        kwargs["prefix_allowed_tokens_fn"] = build_prefix_constraint(*image_size, EMU3_CONFIG)
    with torch.no_grad():
        return reference.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                                  **kwargs).numpy()


def text_prompts(rng, lengths):
    """Left-padded random text prompts of the given lengths."""
    width = max(lengths)
    ids = np.full((len(lengths), width), 151643, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.integers(0, 151643, n)
        mask[row, width - n:] = 1
    return ids, mask


def image_prompts(config, rng, text_lengths):
    """Mode-G shaped prompts: bos, text, boi, 'H*W' (any text ids), img; left padded."""
    ids, mask = text_prompts(rng, [n + 4 for n in text_lengths])
    for row, n in enumerate(text_lengths):
        start = ids.shape[1] - n - 4
        ids[row, start] = config.bos_token_id
        ids[row, -4:] = [config.boi_token_id, 18, 9, config.img_token_id]
    return ids, mask


def test_greedy_left_padded_batch_matches_transformers(models, torch_reference, rng):
    reference, model = models
    ids, mask = text_prompts(rng, [3, 7])
    expected = reference_generate(torch_reference, reference, ids, mask, 8, model.config.eos_token_id)
    got = generate(model, ids, mask, GenerationConfig(max_new_tokens=8), progress=False)
    np.testing.assert_array_equal(got, expected)

    # eos stopping per row: make row 0's 3rd token the eos; row 0 then emits pad, row 1 continues.
    eos = int(expected[0, ids.shape[1] + 2])
    expected = reference_generate(torch_reference, reference, ids, mask, 8, eos)
    got = generate(model, ids, mask, GenerationConfig(max_new_tokens=8, eos_token_id=eos), progress=False)
    np.testing.assert_array_equal(got, expected)
    assert got[0, ids.shape[1] + 3:].tolist() == [model.config.pad_token_id] * (got.shape[1] - ids.shape[1] - 3)


def test_cfg_image_matches_transformers(run_mode, models, torch_reference, rng):
    """Greedy text-to-image with guidance 3.0 and the prefix constraint, batch of two prompt lengths."""
    reference, model = models
    config = model.config
    ids, mask = image_prompts(config, rng, [2, 5])
    negative, _ = image_prompts(config, rng, [3, 3])
    negative[1] = negative[0]
    expected = reference_generate(torch_reference, reference, ids, mask, 24, config.eos_token_id, negative,
                                  (HEIGHT, WIDTH))
    got = generate(model, ids, mask, GenerationConfig(max_new_tokens=24, guidance_scale=3.0),
                   negative_input_ids=negative, image_size=(HEIGHT, WIDTH), progress=False)
    np.testing.assert_array_equal(got, expected)
    assert got.shape[1] - ids.shape[1] == (WIDTH + 1) * HEIGHT + 3
    for row in got[:, ids.shape[1]:]:
        assert_well_formed(row, config, HEIGHT, WIDTH)


def assert_well_formed(row, config, height, width):
    visual = visual_token_ids(config)
    grid = row[:(width + 1) * height].reshape(height, width + 1)
    assert ((grid[:, :width] >= visual[0]) & (grid[:, :width] <= visual[-1])).all()
    assert (grid[:, width] == config.eol_token_id).all()
    assert row[(width + 1) * height:(width + 1) * height + 3].tolist() == [
        config.eof_token_id, config.eoi_token_id, config.eos_token_id]


def test_sampling_is_seeded_well_formed_and_mode_independent(models, rng):
    _, model = models
    config = model.config
    ids, mask = image_prompts(config, rng, [2, 4])
    negative, _ = image_prompts(config, rng, [3, 3])
    negative[1] = negative[0]

    def sampled(seed, mode):
        settings = GenerationConfig(max_new_tokens=16, do_sample=True, top_k=2048, top_p=0.95, temperature=1.2,
                                    seed=seed, guidance_scale=3.0, mode=mode)
        return generate(model, ids, mask, settings, negative_input_ids=negative, image_size=(2, 3), progress=False)

    first = sampled(7, "pynative")
    for row in first[:, ids.shape[1]:]:
        assert_well_formed(row, config, 2, 3)
    assert np.array_equal(first, sampled(7, "pynative"))
    assert not np.array_equal(first, sampled(8, "pynative"))
    assert np.array_equal(first, sampled(7, "graph"))
    assert backend.run_mode() == "pynative"  # a per-call mode is restored afterwards


def test_graph_greedy_matches_transformers_and_compilations_do_not_grow(models, torch_reference, rng, monkeypatch,
                                                                      compilations):
    """Graph mode: the decode step compiles once per shape, however many tokens it produces."""
    reference, model = models
    backend.set_run_mode("graph", "CPU")
    monkeypatch.setattr(generate_module, "_CACHE_BUCKET", 16)  # 3 and 40 new tokens: two cache sizes
    ids, mask = text_prompts(rng, [4, 6])
    counts = []
    for new in (3, 40):
        compilations.clear()
        got = generate(model, ids, mask, GenerationConfig(max_new_tokens=new), progress=False)
        counts.append(sum(compilations))
        expected = reference_generate(torch_reference, reference, ids, mask, new, model.config.eos_token_id)
        np.testing.assert_array_equal(got, expected)
    # Each call: one graph for the prefill, one for the decode step; 40 tokens compile no more than 3.
    assert counts == [2, 2], counts


def test_graph_attention_windows_change_no_token(models, torch_reference, rng, monkeypatch):
    """Decode steps read growing windows of the cache (4, 8, 16 slots, then all 48 here): the
    tokens stay transformers', and each window is one graph, not one per token."""
    reference, model = models
    backend.set_run_mode("graph", "CPU")
    monkeypatch.setattr(backend, "_FIRST_WINDOW", 4)
    monkeypatch.setattr(generate_module, "_PROMPT_BUCKET", 1)
    monkeypatch.setattr(generate_module, "_CACHE_BUCKET", 16)
    assert backend.cache_windows(48) == (4, 8, 16, 48)
    ids, mask = text_prompts(rng, [4, 6])
    got = generate(model, ids, mask, GenerationConfig(max_new_tokens=40), progress=False)
    expected = reference_generate(torch_reference, reference, ids, mask, 40, model.config.eos_token_id)
    np.testing.assert_array_equal(got, expected)
    step = next(iter(generate_module._LAST_STEP.values()))
    # The prefill (slots 0-5, window 8) and the decode step in windows 8, 16 and 48.
    assert len(step.compile_cache) == 4


def test_bad_inputs_have_clear_errors(models):
    _, model = models
    ids = np.array([[5, 6, 7]])
    with pytest.raises(ValueError, match="needs negative_input_ids"):
        generate(model, ids, config=GenerationConfig(guidance_scale=3.0), progress=False)
    with pytest.raises(ValueError, match="guidance_scale is not set"):
        generate(model, ids, negative_input_ids=ids, progress=False)
    with pytest.raises(ValueError, match="LEFT padded"):
        generate(model, ids, np.array([[1, 1, 0]]), progress=False)
    with pytest.raises(ValueError, match="no image token"):
        generate(model, ids, image_size=(2, 2), progress=False)
    with pytest.raises(ValueError, match="context window"):
        generate(model, ids, config=GenerationConfig(max_new_tokens=1100), progress=False)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, config=GenerationConfig(top_p=0.0), progress=False)
    with pytest.raises(ValueError, match="one negative prompt per prompt"):
        generate(model, ids, config=GenerationConfig(guidance_scale=3.0), negative_input_ids=np.ones((2, 3), int),
                 progress=False)
