"""Parallel row decoding (GenerationConfig.parallel_window): sequential decoding's tokens for a
window of a whole row, an independent PyTorch oracle of the schedule for smaller windows, the pass
count, well-formed images, seeded sampling, and a fixed number of GRAPH-mode compilations."""

import importlib

import numpy as np
import pytest

from emu3 import backend
from emu3.generation import GenerationConfig, generate
from emu3.generation.constraints import visual_token_ids
from emu3.generation.parallel_rows import ParallelRowStep, RowSchedule, image_passes
from emu3.generation.generate import GenerationStep
from tests.generation.test_generate import assert_well_formed, image_prompts, models  # noqa: F401 (fixture)

generate_module = importlib.import_module("emu3.generation.generate")


def image_length(height, width):
    return (width + 1) * height + 3


def negative_prompts(config, rng, batch):
    negative, _ = image_prompts(config, rng, [3] * batch)
    negative[1:] = negative[0]
    return negative


# ---------------------------------------------------------------- the oracle

def oracle(torch, reference, config, prompts, negatives, height, width, window, scale):
    """Greedy image tokens (batch, H, W) of the parallel row schedule, recomputed from scratch at
    every pass with transformers' Emu3, explicit position ids and an explicit 4-D mask.

    Written from the issue's rules, not from the implementation: token (r, c) is decided at pass
    r*lag + c (lag = min(window, W)) from the logits of the token just before it in raster order;
    a visual token enters the model one pass after it is decided, the eol of row r when row r+1
    starts (pass (r+1)*lag); token i sees token j iff pos_j <= pos_i and j entered no later than i.
    prompts/negatives: lists of unpadded 1-D prompts ending in the image token.
    """
    lag = min(window, width)
    row = width + 1  # raster offsets from the image token: (r, c) at r*row + c + 1, eol of row r at (r+1)*row
    visual = torch.from_numpy(visual_token_ids(config))

    def entered(q):
        r, c = divmod(q - 1, row)
        return (r + 1) * lag if c == width else r * lag + c + 1

    images = []
    for b, prompt in enumerate(prompts):
        tokens = {(r + 1) * row: config.eol_token_id for r in range(height - 1)}
        for t in range((height - 1) * lag + width):
            due = [(r, t - r * lag) for r in range(height) if 0 <= t - r * lag < width]
            scores = []
            for branch in [prompt] + ([negatives[b]] if negatives is not None else []):
                present = sorted(q for q in tokens if entered(q) <= t)
                n = len(branch)
                ids = np.concatenate([branch, [tokens[q] for q in present]]).astype(np.int64)
                pos = np.concatenate([np.arange(n), [n - 1 + q for q in present]]).astype(np.int64)
                when = np.array([0] * n + [entered(q) for q in present])
                seen = (pos[None, :] <= pos[:, None]) & (when[None, :] <= when[:, None])
                mask = torch.where(torch.from_numpy(seen), 0.0, torch.finfo(torch.float32).min)[None, None]
                with torch.no_grad():
                    hidden = reference.model(input_ids=torch.from_numpy(ids)[None], attention_mask=mask,
                                             position_ids=torch.from_numpy(pos)[None]).last_hidden_state[0]
                    where = {q: n + i for i, q in enumerate(present)} | {0: n - 1}
                    queries = [where[r * row + c] for r, c in due]  # the token before (r, c)
                    scores.append(torch.log_softmax(reference.lm_head(hidden[queries]).float(), -1))
            guided = scores[0] if len(scores) == 1 else scale * (scores[0] - scores[1]) + scores[1]
            for (r, c), best in zip(due, visual[guided[:, visual].argmax(-1)].tolist()):
                tokens[r * row + c + 1] = best
        images.append([[tokens[r * row + c + 1] for c in range(width)] for r in range(height)])
    return np.array(images)


def unpadded(ids, mask):
    return [row[m.astype(bool)] for row, m in zip(ids, mask)]


def image_grid(out, prompt_width, height, width):
    grid = out[:, prompt_width:prompt_width + (width + 1) * height].reshape(out.shape[0], height, width + 1)
    return grid[:, :, :width]


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("do_sample,guided,window", [(False, False, 3), (False, True, 5), (True, False, 5),
                                                     (True, True, 3)])
def test_a_window_of_a_whole_row_is_sequential_decoding(models, rng, do_sample, guided, window):
    """w = W (3) and w > W: sequential decoding's tokens, greedy and seeded top-k, with and without CFG."""
    _, model = models
    config = model.config
    ids, mask = image_prompts(config, rng, [2, 5])
    settings = dict(max_new_tokens=image_length(2, 3), do_sample=do_sample, top_k=64, seed=5,
                    guidance_scale=3.0 if guided else None)
    negative = dict(negative_input_ids=negative_prompts(config, rng, 2)) if guided else {}
    expected = generate(model, ids, mask, GenerationConfig(**settings), image_size=(2, 3), progress=False,
                        **negative)
    got = generate(model, ids, mask, GenerationConfig(**settings, parallel_window=window), image_size=(2, 3),
                   progress=False, **negative)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_guided_parallel_rows_match_the_pytorch_oracle(models, torch_reference, rng, window):
    """CFG 3.0 + the constraint; the negative prompt longer than the prompt (so the prompt is padded)."""
    reference, model = models
    config = model.config
    ids, mask = image_prompts(config, rng, [2])
    negative, negative_mask = image_prompts(config, rng, [6])
    got = generate(model, ids, mask, GenerationConfig(max_new_tokens=image_length(6, 5), guidance_scale=3.0,
                                                      parallel_window=window),
                   negative_input_ids=negative, negative_attention_mask=negative_mask, image_size=(6, 5),
                   progress=False)
    expected = oracle(torch_reference, reference, config, unpadded(ids, mask), unpadded(negative, negative_mask),
                      6, 5, window, 3.0)
    np.testing.assert_array_equal(image_grid(got, ids.shape[1], 6, 5), expected)
    assert_well_formed(got[0, ids.shape[1]:], config, 6, 5)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_batched_parallel_rows_match_the_pytorch_oracle(models, torch_reference, rng, window):
    """No guidance; a left-padded batch of two prompts of different lengths; a 6x5 image."""
    reference, model = models
    config = model.config
    ids, mask = image_prompts(config, rng, [1, 6])
    got = generate(model, ids, mask, GenerationConfig(max_new_tokens=image_length(6, 5), parallel_window=window),
                   image_size=(6, 5), progress=False)
    expected = oracle(torch_reference, reference, config, unpadded(ids, mask), None, 6, 5, window, None)
    np.testing.assert_array_equal(image_grid(got, ids.shape[1], 6, 5), expected)
    for row in got[:, ids.shape[1]:]:
        assert_well_formed(row, config, 6, 5)


def test_forward_passes_follow_the_formula(models, rng, monkeypatch):
    _, model = models
    config = model.config
    passes = []
    for cls in (GenerationStep, ParallelRowStep):
        construct = cls.construct

        def counting(self, *args, construct=construct):
            passes.append(1)
            return construct(self, *args)

        monkeypatch.setattr(cls, "construct", counting)
    ids, mask = image_prompts(config, rng, [3])
    for height, width, window in [(5, 7, 3), (4, 3, 8), (1, 4, 2), (2, 1, 1), (3, 4, None)]:
        passes.clear()
        out = generate(model, ids, mask, GenerationConfig(max_new_tokens=image_length(height, width),
                                                          parallel_window=window),
                       image_size=(height, width), progress=False)
        assert_well_formed(out[0, ids.shape[1]:], config, height, width)
        lag = width if window is None else min(window, width)
        formula = (width + 1) * height + 3 if window is None else (height - 1) * lag + width
        assert len(passes) == image_passes(height, width, window) == formula
    # Truncated: the first 8 tokens of a 6x5 image at window 2 hold token (0, 4), decided at pass 4.
    passes.clear()
    out = generate(model, ids, mask, GenerationConfig(max_new_tokens=8, parallel_window=2), image_size=(6, 5),
                   progress=False)
    assert len(passes) == 5 and out.shape[1] == ids.shape[1] + 8


def test_schedule_decides_each_token_once_at_its_pass():
    for height, width, window in [(6, 5, 1), (6, 5, 2), (90, 90, 16), (7, 3, 5), (1, 1, 1)]:
        schedule = RowSchedule(height, width, window)
        lag = min(window, width)
        decided = (schedule.fed[1:] + 1).ravel()
        visual = decided[(schedule.fed[1:].ravel() >= 0) & (decided % (width + 1) != 0)]
        assert sorted(visual.tolist() + [1]) == [r * (width + 1) + c + 1 for r in range(height) for c in
                                                 range(width)]
        for p, lanes in enumerate(schedule.fed[1:], 1):
            for offset in lanes[lanes >= 0] + 1:
                r, c = divmod(int(offset) - 1, width + 1)
                assert c == width or p == r * lag + c
        started = [sum(0 <= p - r * lag <= width for r in range(height)) for p in range(1, schedule.passes)]
        assert schedule.lanes == max([1] + started)


@pytest.mark.parametrize("new,eol_ends", [(7, True), (40, False)])
def test_truncation_and_an_early_eos_end_like_sequential_decoding(models, rng, new, eol_ends):
    """max_new_tokens shorter or longer than the image; an eos inside the image (eol) or after it."""
    _, model = models
    config = model.config
    ids, mask = image_prompts(config, rng, [2, 4])
    settings = dict(max_new_tokens=new, eos_token_id=config.eol_token_id if eol_ends else None)
    expected = generate(model, ids, mask, GenerationConfig(**settings), image_size=(3, 4), progress=False)
    got = generate(model, ids, mask, GenerationConfig(**settings, parallel_window=4), image_size=(3, 4),
                   progress=False)
    np.testing.assert_array_equal(got, expected)
    assert got.shape[1] - ids.shape[1] == (5 if eol_ends else image_length(3, 4))


def test_sampled_parallel_rows_are_seeded_and_graph_compiles_a_fixed_number_of_graphs(models, rng, compilations):
    """GRAPH mode: one graph for the prefill and one for every decode pass of an image, whatever its
    size and however many passes; the same sampled tokens as PYNATIVE mode for the same seed, and
    for the same seed again."""
    _, model = models
    config = model.config
    ids, mask = image_prompts(config, rng, [2, 4])
    negative = negative_prompts(config, rng, 2)

    def sampled(size, seed, window=2):
        settings = GenerationConfig(max_new_tokens=image_length(*size), do_sample=True, top_k=64, seed=seed,
                                    guidance_scale=3.0, parallel_window=window)
        return generate(model, ids, mask, settings, negative_input_ids=negative, image_size=size, progress=False)

    first = sampled((3, 4), 7)
    for row in first[:, ids.shape[1]:]:
        assert_well_formed(row, config, 3, 4)
    pynative_big = sampled((6, 5), 7, window=3)

    backend.set_run_mode("graph", "CPU")
    counts = []
    for size, window, expected, fresh in [((3, 4), 2, first, True), ((6, 5), 3, pynative_big, True),
                                          ((6, 5), 3, pynative_big, False)]:
        if fresh:
            generate_module._LAST_STEP.clear()
        compilations.clear()
        np.testing.assert_array_equal(sampled(size, 7, window), expected)
        counts.append(sum(compilations))
    # A 3x4 image (8 passes) and a 6x5 one (20 passes): the prefill and the pass, each once;
    # the same image again: nothing new.
    assert counts == [2, 2, 0], counts


def test_attention_windows_and_scratch_slots_change_no_token(models, torch_reference, rng, monkeypatch):
    """Decode passes read growing windows of the cache (8, 16 slots, then the part before the
    scratch slots) in GRAPH mode; the lanes without a row write after the last window. Greedy
    tokens stay the oracle's, and each window is one graph."""
    reference, model = models
    config = model.config
    monkeypatch.setattr(backend, "_FIRST_WINDOW", 8)
    monkeypatch.setattr(generate_module, "_PROMPT_BUCKET", 1)
    monkeypatch.setattr(generate_module, "_CACHE_BUCKET", 16)
    backend.set_run_mode("graph", "CPU")
    generate_module._LAST_STEP.clear()
    ids, mask = image_prompts(config, rng, [2])
    got = generate(model, ids, mask, GenerationConfig(max_new_tokens=image_length(7, 6), parallel_window=2),
                   image_size=(7, 6), progress=False)
    expected = oracle(torch_reference, reference, config, unpadded(ids, mask), None, 7, 6, 2, None)
    np.testing.assert_array_equal(image_grid(got, ids.shape[1], 7, 6), expected)
    prefill, parallel = generate_module._LAST_STEP.values()
    usable = parallel.step.cache.max_length - RowSchedule(7, 6, 2).lanes
    assert backend.cache_windows(usable) == (8, 16, usable)
    assert len(prefill.compile_cache) == 1 and len(parallel.compile_cache) == 3


def test_parallel_rows_bad_inputs(models, rng):
    _, model = models
    config = model.config
    ids, mask = image_prompts(config, rng, [2, 3])
    with pytest.raises(ValueError, match=r"parallel_window \(None: sequential decoding\) must be an integer >= 1"):
        generate(model, ids, mask, GenerationConfig(parallel_window=0), image_size=(2, 2), progress=False)
    with pytest.raises(ValueError, match="give image_size"):
        generate(model, ids, mask, GenerationConfig(parallel_window=2), progress=False)
    with pytest.raises(ValueError, match="one image size for the whole batch"):
        generate(model, ids, mask, GenerationConfig(parallel_window=2), image_size=[(2, 2), (2, 3)], progress=False)
    text = np.concatenate([ids, ids[:, :1]], 1)
    with pytest.raises(ValueError, match="end with the image token"):
        generate(model, text, np.ones_like(text), GenerationConfig(parallel_window=2), image_size=(2, 2),
                 progress=False)
    with pytest.raises(ValueError, match="scratch slots"):
        generate(model, ids, mask, GenerationConfig(max_new_tokens=image_length(30, 32), parallel_window=1),
                 image_size=(30, 32), progress=False)
