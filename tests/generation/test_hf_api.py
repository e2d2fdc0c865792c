"""transformers-style Emu3ForCausalLM.generate against transformers' generate with the same weights and
the same arguments: BAAI's processors (ours and transformers' own classes), transformers' keyword
arguments, Python callables on the host path, and every refused argument's error."""

import mindspore as ms
import numpy as np
import pytest

from emu3.generation import GenerationConfig as Emu3GenerationConfig
from emu3.generation import build_prefix_constraint, generate, hf_api
from tests.generation.test_generate import (HEIGHT, WIDTH, assert_well_formed, image_prompts, models,  # noqa: F401
                                            text_prompts, unused_eos)

BANNED = np.arange(0, 184622, 7)  # a user processor's rule: every 7th id is banned


@pytest.fixture(scope="module")
def tf():
    import transformers
    from transformers import generation
    return transformers, generation


@pytest.fixture
def paths(monkeypatch):
    """Which path each generate() call took (a spy: both paths still run)."""
    taken = []
    fast, host = hf_api.emu3_generate, hf_api._host_loop
    monkeypatch.setattr(hf_api, "emu3_generate", lambda *a, **k: taken.append("fast") or fast(*a, **k))
    monkeypatch.setattr(hf_api, "_host_loop", lambda *a, **k: taken.append("host") or host(*a, **k))
    return taken


def cfg_prompts(model, rng):
    ids, mask = image_prompts(model.config, rng, [2, 5])
    negative, _ = image_prompts(model.config, rng, [3, 3])
    negative[1] = negative[0]
    return ids, mask, negative


def reference_baai(torch, tf, reference, ids, mask, negative, fn, max_new_tokens=40960, processors=()):
    """BAAI's image_generation.py call with transformers' classes on the PyTorch reference."""
    transformers, generation = tf
    config = transformers.GenerationConfig(use_cache=True, eos_token_id=reference.config.eos_token_id,
                                           pad_token_id=reference.config.pad_token_id,
                                           max_new_tokens=max_new_tokens, do_sample=False)
    chain = generation.LogitsProcessorList([
        generation.UnbatchedClassifierFreeGuidanceLogitsProcessor(
            3.0, reference, unconditional_ids=torch.from_numpy(negative).long()),
        generation.PrefixConstrainedLogitsProcessor(fn, num_beams=1), *processors])
    with torch.no_grad():
        return reference.generate(torch.from_numpy(ids).long(), config, logits_processor=chain,
                                  attention_mask=torch.from_numpy(mask).long()).numpy()


def test_baai_image_generation_call_matches_transformers_on_the_fast_path(models, torch_reference, tf, rng, paths):
    reference, model = models
    ids, mask, negative = cfg_prompts(model, rng)
    fn = build_prefix_constraint(HEIGHT, WIDTH, model.config)
    expected = reference_baai(torch_reference, tf, reference, ids, mask, negative, fn)
    assert expected.shape[1] - ids.shape[1] == (WIDTH + 1) * HEIGHT + 3

    config = hf_api.GenerationConfig(use_cache=True, eos_token_id=model.config.eos_token_id,
                                     pad_token_id=model.config.pad_token_id, max_new_tokens=40960, do_sample=False)
    ours = hf_api.LogitsProcessorList([
        hf_api.UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, model, unconditional_ids=ms.Tensor(negative)),
        hf_api.PrefixConstrainedLogitsProcessor(fn, num_beams=1)])
    got = model.generate(ms.Tensor(ids), config, logits_processor=ours, attention_mask=ms.Tensor(mask))
    assert isinstance(got, ms.Tensor)
    np.testing.assert_array_equal(got.asnumpy(), expected)

    # transformers' own config and processor classes (holding our model) are recognised too, without
    # torch at run time.
    transformers, generation = tf
    theirs = generation.LogitsProcessorList([
        generation.UnbatchedClassifierFreeGuidanceLogitsProcessor(
            3.0, model, unconditional_ids=torch_reference.from_numpy(negative)),
        generation.PrefixConstrainedLogitsProcessor(fn, num_beams=1)])
    their_config = transformers.GenerationConfig(use_cache=True, eos_token_id=model.config.eos_token_id,
                                                 pad_token_id=model.config.pad_token_id, max_new_tokens=40960,
                                                 do_sample=False)
    np.testing.assert_array_equal(model.generate(ids, their_config, logits_processor=theirs, attention_mask=mask),
                                  expected)
    assert paths == ["fast", "fast"]


def test_per_row_image_sizes_as_baai_passes_them(models, torch_reference, tf, rng, paths):
    """build_prefix_constrained_fn(image_size[:, 0], image_size[:, 1]): one size per row."""
    reference, model = models
    ids, mask, negative = cfg_prompts(model, rng)
    heights, widths = np.array([3, 2]), np.array([4, 5])
    fn = build_prefix_constraint(heights, widths, model.config)
    expected = reference_baai(torch_reference, tf, reference, ids, mask, negative, fn)
    got = model.generate(ids, hf_api.GenerationConfig(max_new_tokens=40960), attention_mask=mask,
                         logits_processor=[hf_api.UnbatchedClassifierFreeGuidanceLogitsProcessor(
                             3.0, model, unconditional_ids=negative), hf_api.PrefixConstrainedLogitsProcessor(fn)])
    np.testing.assert_array_equal(got, expected)
    for row, h, w in zip(got[:, ids.shape[1]:], heights, widths):
        assert_well_formed(row, model.config, h, w)
    assert paths == ["fast"]


def test_transformers_keyword_arguments_match_transformers(models, torch_reference, rng, paths):
    reference, model = models
    torch = torch_reference
    ids, mask, negative = cfg_prompts(model, rng)
    fn = build_prefix_constraint(HEIGHT, WIDTH, model.config)
    kwargs = dict(max_new_tokens=30, guidance_scale=3.0, prefix_allowed_tokens_fn=fn)
    with torch.no_grad():
        expected = reference.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                                      negative_prompt_ids=torch.from_numpy(negative).long(),
                                      negative_prompt_attention_mask=torch.ones(negative.shape, dtype=torch.long),
                                      **kwargs).numpy()
        # Without negative prompts transformers' unconditional branch is each prompt's last token.
        expected_last = reference.generate(torch.from_numpy(ids).long(),
                                           attention_mask=torch.from_numpy(mask).long(), **kwargs).numpy()
    got = model.generate(ids, attention_mask=mask, negative_prompt_ids=negative,
                         negative_prompt_attention_mask=np.ones_like(negative), **kwargs)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, **kwargs), expected_last)

    # transformers' max_length (prompt + new) and its default mask (pad tokens masked) for text.
    text, text_mask = text_prompts(rng, [3, 6])
    with torch.no_grad():
        expected = reference.generate(torch.from_numpy(text).long(), max_length=text.shape[1] + 5,
                                      pad_token_id=model.config.pad_token_id).numpy()
    np.testing.assert_array_equal(model.generate(text, max_length=text.shape[1] + 5), expected)
    assert paths == ["fast", "fast", "fast"]


class BanEverySeventh:
    """A user's logits processor in MindSpore: no id divisible by 7."""

    def __call__(self, input_ids, scores):
        assert isinstance(input_ids, ms.Tensor) and isinstance(scores, ms.Tensor)
        mask = np.zeros(scores.shape, np.float32)
        mask[:, BANNED] = -np.inf
        return scores + ms.Tensor(mask)


def test_a_python_processor_takes_the_host_path_and_matches_transformers(models, torch_reference, tf, rng, paths):
    reference, model = models
    torch = torch_reference
    ids, mask, negative = cfg_prompts(model, rng)
    fn = build_prefix_constraint(HEIGHT, WIDTH, model.config)

    class TorchBan:
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, torch.from_numpy(BANNED)] = -float("inf")
            return scores

    expected = reference_baai(torch, tf, reference, ids, mask, negative, fn, processors=[TorchBan()])
    chain = [hf_api.UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, model, unconditional_ids=negative),
             hf_api.PrefixConstrainedLogitsProcessor(fn), BanEverySeventh()]
    got = model.generate(ids, hf_api.GenerationConfig(max_new_tokens=40960), logits_processor=chain,
                         attention_mask=mask)
    np.testing.assert_array_equal(got, expected)
    assert not np.isin(got[:, ids.shape[1]:], BANNED[BANNED > 0]).any()

    # A prefix function that is not emu3's constraint runs on the host too, as transformers' does.
    def only_the_first_visual_rows(batch_id, sequence):
        return fn(batch_id, sequence)[:100]

    with torch.no_grad():
        expected = reference.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                                      max_new_tokens=20, prefix_allowed_tokens_fn=only_the_first_visual_rows).numpy()
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20,
                         prefix_allowed_tokens_fn=only_the_first_visual_rows)
    np.testing.assert_array_equal(got, expected)
    assert paths == ["host", "host"]


def test_host_path_equals_fast_path(models, rng, paths):
    """With an identity processor the host path picks the fast path's tokens. Sampled, it uses the
    same seeded uniforms over the same distribution; the fast path samples only the 32768 visual
    columns where a visual token is due, so a float tie or rounding may change a rare token."""
    _, model = models
    ids, mask, negative = cfg_prompts(model, rng)
    fn = build_prefix_constraint(HEIGHT, WIDTH, model.config)
    for settings in (dict(do_sample=False), dict(do_sample=True, top_k=2048, top_p=0.9, temperature=1.3, seed=5)):
        chain = [hf_api.UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, model, unconditional_ids=negative),
                 hf_api.PrefixConstrainedLogitsProcessor(fn)]
        fast = model.generate(ids, attention_mask=mask, max_new_tokens=40960, logits_processor=chain, **settings)
        host = model.generate(ids, attention_mask=mask, max_new_tokens=40960,
                              logits_processor=[*chain, lambda input_ids, scores: scores], **settings)
        for row in host[:, ids.shape[1]:]:
            assert_well_formed(row, model.config, HEIGHT, WIDTH)
        if settings["do_sample"]:
            assert (host == fast).mean() > 0.9
            # The sampling settings reach emu3.generation.generate as they are.
            direct = generate(model, ids, mask, Emu3GenerationConfig(max_new_tokens=(WIDTH + 1) * HEIGHT + 3,
                                                                     guidance_scale=3.0, **settings),
                              negative_input_ids=negative, image_size=(HEIGHT, WIDTH), progress=False)
            np.testing.assert_array_equal(fast, direct)
        else:
            np.testing.assert_array_equal(host, fast)
    assert paths == ["fast", "host", "fast", "host"]


def test_padded_unconditional_prompts_are_masked(models, rng):
    """BAAI's batch passes left-padded negative prompts without a mask; transformers attends to the
    padding there, we mask it (as transformers does for the prompts): equal to an explicit mask."""
    _, model = models
    ids, mask = image_prompts(model.config, rng, [2, 5])
    negative, negative_mask = image_prompts(model.config, rng, [1, 4])
    assert (negative_mask == 0).any()
    fn = build_prefix_constraint(HEIGHT, WIDTH, model.config)
    implicit = model.generate(ids, attention_mask=mask, max_new_tokens=40960, logits_processor=[
        hf_api.UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, model, unconditional_ids=negative),
        hf_api.PrefixConstrainedLogitsProcessor(fn)])
    explicit = model.generate(ids, attention_mask=mask, max_new_tokens=40960, guidance_scale=3.0,
                              negative_prompt_ids=negative, negative_prompt_attention_mask=negative_mask,
                              prefix_allowed_tokens_fn=fn)
    np.testing.assert_array_equal(implicit, explicit)


def test_refused_arguments_have_clear_errors(models, tf):
    _, model = models
    ids = np.array([[5, 6, 7]])
    with pytest.raises(TypeError, match=r"unsupported keyword argument\(s\) \['foo'\]"):
        model.generate(ids, max_new_tokens=2, foo=1)
    with pytest.raises(TypeError, match="second positional argument is generation_config"):
        model.generate(ids, np.ones((1, 3)))
    with pytest.raises(TypeError, match=r"unsupported field\(s\) \['repetition_penalty'\]"):
        hf_api.GenerationConfig(repetition_penalty=1.2)
    transformers, _ = tf
    with pytest.raises(ValueError, match=r"sets \['repetition_penalty'\]"):
        model.generate(ids, transformers.GenerationConfig(repetition_penalty=1.2, max_new_tokens=2))
    with pytest.raises(ValueError, match="beam search"):
        model.generate(ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="one eos_token_id"):
        model.generate(ids, max_new_tokens=2, eos_token_id=[1, 2])
    with pytest.raises(ValueError, match="leaves no room after the 3-token prompt"):
        model.generate(ids, max_length=3)
    with pytest.raises(ValueError, match="another model"):
        model.generate(ids, max_new_tokens=2, logits_processor=[
            hf_api.UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, object())])
    with pytest.raises(ValueError, match="given twice"):
        model.generate(ids, max_new_tokens=2, logits_processor=[
            hf_api.UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, model),
            hf_api.UnbatchedClassifierFreeGuidanceLogitsProcessor(2.0, model)])
    with pytest.raises(TypeError, match="not callable"):
        model.generate(ids, max_new_tokens=2, logits_processor=[42])
    with pytest.raises(ValueError, match="no image token"):
        model.generate(ids, max_new_tokens=2, prefix_allowed_tokens_fn=build_prefix_constraint(2, 2, model.config))


def test_max_new_tokens_past_the_context_window_is_capped(models, rng, caplog):
    _, model = models
    context = model.config.max_position_embeddings
    ids, _ = text_prompts(rng, [context - 6])
    got = model.generate(ids, max_new_tokens=context, eos_token_id=unused_eos(model, ids, None, 6))
    assert got.shape[1] == context and "capped at 6" in caplog.text
