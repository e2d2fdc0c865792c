"""The device-side logits pipeline against transformers' logits processors on random logits."""

from types import SimpleNamespace

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn

from emu3.generation import sampling
from emu3.generation.constraints import VISUAL, build_prefix_constraint, forced_tokens, visual_token_ids
from emu3.generation.guidance import classifier_free_guidance

# Emu3's special ids and vocabulary size (facts file); only these attributes are read.
EMU3_IDS = SimpleNamespace(vocab_size=184622, pad_token_id=151643, eos_token_id=151850, img_token_id=151851,
                           eoi_token_id=151853, eol_token_id=151846, eof_token_id=151847)


@pytest.fixture(scope="module")
def tlp(torch_reference):
    from transformers.generation import logits_process
    return logits_process


def _logits(rng, rows=6, vocab=500):
    return rng.normal(size=(rows, vocab)).astype(np.float32) * 3


def _same_filter(ours, theirs):
    ours = ours.asnumpy() if isinstance(ours, ms.Tensor) else ours
    theirs = theirs.numpy()
    assert np.array_equal(np.isfinite(ours), np.isfinite(theirs))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6, atol=1e-6)


def test_temperature(rng, torch_reference, tlp):
    x = _logits(rng)
    ref = tlp.TemperatureLogitsWarper(0.7)(None, torch_reference.from_numpy(x))
    _same_filter(sampling.apply_temperature(ms.Tensor(x), 0.7), ref)


@pytest.mark.parametrize("k", [1, 7, 100])
def test_top_k(rng, torch_reference, tlp, k):
    x = _logits(rng)
    ref = tlp.TopKLogitsWarper(k)(None, torch_reference.from_numpy(x))
    _same_filter(sampling.top_k_filter(ms.Tensor(x), k), ref)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.95])
def test_top_p(rng, torch_reference, tlp, p):
    x = _logits(rng)
    ref = tlp.TopPLogitsWarper(p)(None, torch_reference.from_numpy(x))
    _same_filter(sampling.top_p_filter(ms.Tensor(x), p), ref)


@pytest.mark.parametrize("top_k,top_p,temperature", [(20, 1.0, 1.0), (50, 0.8, 0.7), (None, 0.9, 1.3), (None, 1.0, 1.0)])
def test_sample_follows_transformers_distribution(rng, torch_reference, tlp, top_k, top_p, temperature):
    """Given the uniform u, the sampled token is the inverse CDF of transformers' warped distribution."""
    x = _logits(rng, rows=64)
    u = sampling.draw_uniforms(3, 1, 64)[0]
    warped = tlp.TemperatureLogitsWarper(temperature)(None, torch_reference.from_numpy(x))
    if top_k:
        warped = tlp.TopKLogitsWarper(top_k)(None, warped)
    warped = tlp.TopPLogitsWarper(top_p)(None, warped)
    probs = torch_reference.softmax(warped, -1).numpy().astype(np.float64)
    order = np.argsort(-x, -1, kind="stable")
    cdf = np.cumsum(np.take_along_axis(probs, order, -1), -1)
    expected = order[np.arange(64), [np.searchsorted(c, ui * c[-1], side="right") for c, ui in zip(cdf, u)]]
    scores = sampling.apply_temperature(ms.Tensor(x), temperature)
    got = sampling.sample(scores, ms.Tensor(u), top_k, top_p).asnumpy()
    assert np.array_equal(got, expected)
    assert np.all(np.isfinite(warped.numpy()[np.arange(64), got]))


def test_sample_frequencies_match_probabilities(rng):
    x = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)).repeat(4000, 0)
    u = sampling.draw_uniforms(11, 1, 4000)[0]
    got = sampling.sample(ms.Tensor(x), ms.Tensor(u), None, 1.0).asnumpy()
    np.testing.assert_allclose(np.bincount(got, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_row_without_candidates_leaves_the_other_rows_alone(rng, run_mode, top_p):
    """A row whose scores are all -inf (the constraint forces a non-visual token there) once made
    MindSpore's CPU softmax corrupt the other rows' samples: each row must sample as if alone."""
    x = _logits(rng, rows=4)
    u = sampling.draw_uniforms(2, 1, 4)[0]
    alone = [sampling.sample(ms.Tensor(x[i:i + 1]), ms.Tensor(u[i:i + 1]), 20, top_p).asnumpy()[0] for i in (1, 3)]
    x[[0, 2]] = -np.inf
    got = sampling.sample(ms.Tensor(x), ms.Tensor(u), 20, top_p).asnumpy()
    assert got[[1, 3]].tolist() == alone
    assert ((got >= 0) & (got < x.shape[1])).all()


def test_uniforms_are_seeded():
    assert np.array_equal(sampling.draw_uniforms(5, 4, 2), sampling.draw_uniforms(5, 4, 2))
    assert not np.array_equal(sampling.draw_uniforms(5, 4, 2), sampling.draw_uniforms(6, 4, 2))
    assert np.array_equal(sampling.draw_uniforms(5, 4, 2), sampling.draw_uniforms(5, 9, 2)[:4])


def test_greedy(rng):
    x = _logits(rng)
    assert np.array_equal(sampling.greedy(ms.Tensor(x)).asnumpy(), x.argmax(-1))


def test_guidance_matches_unbatched_cfg_processor(rng, torch_reference, tlp):
    from transformers.modeling_outputs import CausalLMOutputWithPast
    cond, uncond = _logits(rng, rows=3), _logits(rng, rows=3)

    def unconditional_model(input_ids, **kwargs):  # the processor's own forward of the negative prompt
        return CausalLMOutputWithPast(logits=torch_reference.from_numpy(uncond)[:, None])

    processor = tlp.UnbatchedClassifierFreeGuidanceLogitsProcessor(
        3.0, unconditional_model, unconditional_ids=torch_reference.zeros(3, 2, dtype=torch_reference.long))
    ref = processor(torch_reference.zeros(3, 4, dtype=torch_reference.long), torch_reference.from_numpy(cond))
    got = classifier_free_guidance(ms.Tensor(np.concatenate([cond, uncond])), 3.0)
    np.testing.assert_allclose(got.asnumpy(), ref.numpy(), rtol=1e-5, atol=1e-4)


def test_forced_tokens_spell_the_image_row_by_row():
    """The table the decode loop reads, against the image written out token by token up to the
    first pad; two rows of different sizes, whose first new tokens are at different offsets from
    their image tokens. (Further on, BAAI's rule puts eol at multiples of w+1; generation emits pad
    there as every row has finished.)"""
    c = EMU3_IDS
    sizes, starts = [(3, 4), (1, 5)], [1, 3]

    def spelled(h, w):  # the tokens at offsets 1, 2, ..., (w+1)h + 4
        return ([VISUAL] * w + [c.eol_token_id]) * h + [c.eof_token_id, c.eoi_token_id, c.eos_token_id,
                                                         c.pad_token_id]

    table = forced_tokens(np.array(starts), np.array([h for h, _ in sizes]), np.array([w for _, w in sizes]), 19, c)
    assert table.shape == (19, 2) and table.dtype == np.int32
    for b, ((h, w), start) in enumerate(zip(sizes, starts)):
        expected = spelled(h, w)[start - 1:]
        assert table[:len(expected), b].tolist() == expected


@pytest.mark.parametrize("height,width", [(3, 4), (2, 1), (2, 2)])
def test_forced_tokens_agree_with_the_prefix_function(height, width):
    """At every offset: VISUAL where the python constraint allows the visual tokens, else its one token
    (including BAAI's precedence of eol, which replaces eoi or eos for widths 1 and 2)."""
    config = EMU3_IDS
    fn = build_prefix_constraint(height, width, config)
    steps = (width + 1) * height + 6
    table = forced_tokens(np.array([1]), np.array([height]), np.array([width]), steps, config)[:, 0]
    visual = visual_token_ids(config).tolist()
    for offset in range(1, steps + 1):
        allowed = fn(0, np.array([7, config.img_token_id] + [7] * (offset - 1)))
        assert (allowed == visual) if table[offset - 1] == VISUAL else allowed == [table[offset - 1]]


def test_prefix_constraint_spells_a_well_formed_image():
    config, height, width = EMU3_IDS, 3, 4
    fn = build_prefix_constraint(height, width, config)
    ids = [5, config.img_token_id]
    for _ in range((width + 1) * height + 6):
        allowed = fn(0, np.array(ids))
        ids.append(allowed[len(ids) % len(allowed)])
    body = np.array(ids[2:])
    visual = set(visual_token_ids(config).tolist())
    for r in range(height):
        row = body[r * (width + 1):(r + 1) * (width + 1)]
        assert all(t in visual for t in row[:width]) and row[width] == config.eol_token_id
    tail = body[(width + 1) * height:]
    assert tail[:3].tolist() == [config.eof_token_id, config.eoi_token_id, config.eos_token_id]
    assert len(visual) == 32768 and min(visual) == 151854 and max(visual) == 184621


def test_constraint_errors():
    fn = build_prefix_constraint(2, 2, EMU3_IDS)
    with pytest.raises(ValueError, match="no image token"):
        fn(0, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="at least 1x1"):
        build_prefix_constraint(0, 4, EMU3_IDS)
    with pytest.raises(ValueError, match="full vocabulary"):
        build_prefix_constraint(2, 2, SimpleNamespace(**{**vars(EMU3_IDS), "vocab_size": 1000}))


class _Pipeline(nn.Cell):
    """Guidance and the choice, in one cell as inside the decode step."""

    def construct(self, logits, uniforms):
        scores = classifier_free_guidance(logits, 3.0)
        return sampling.sample(scores, uniforms, 2048, 0.9), sampling.greedy(scores)


def test_pipeline_graph_equals_pynative(run_mode, rng):
    b = 4
    args = (ms.Tensor(rng.normal(size=(2 * b, 32768)).astype(np.float32)),
            ms.Tensor(sampling.draw_uniforms(0, 1, b)[0]))
    sampled, best = (t.asnumpy() for t in _Pipeline()(*args))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ref_sampled, ref_best = (t.asnumpy() for t in _Pipeline()(*args))
    assert np.array_equal(sampled, ref_sampled) and np.array_equal(best, ref_best)


@pytest.mark.parametrize("guidance", [3.0, None])
def test_choosing_among_the_visual_columns_equals_choosing_in_the_vocabulary(rng, guidance):
    """Where a visual token is due: guidance on log-probabilities of the visual columns only, then
    temperature, top-k, top-p and sampling (or argmax) over them pick the token that the full
    vocabulary with the constraint's mask picks. Log-softmax over fewer columns shifts each branch
    of a row by a constant, and so their guided mix, which none of the later steps sees."""
    config = EMU3_IDS
    rows = 8
    logits = rng.normal(size=(2 * rows if guidance else rows, config.vocab_size)).astype(np.float32) * 3
    mask = np.full(config.vocab_size, -np.inf, np.float32)
    mask[visual_token_ids(config)] = 0.0
    first = int(visual_token_ids(config)[0])
    full = ms.Tensor(logits)
    columns = ms.ops.narrow(full, -1, first, 32768)
    if guidance:
        full, columns = classifier_free_guidance(full, guidance), classifier_free_guidance(columns, guidance)
    full = full + ms.Tensor(mask)
    assert np.array_equal(sampling.greedy(full).asnumpy(), first + sampling.greedy(columns).asnumpy())
    u = ms.Tensor(sampling.draw_uniforms(1, 1, rows)[0])
    for top_k, top_p, temperature in [(2048, 1.0, 1.0), (100, 0.7, 0.6), (None, 0.9, 1.5)]:
        expected = sampling.sample(sampling.apply_temperature(full, temperature), u, top_k, top_p).asnumpy()
        got = sampling.sample(sampling.apply_temperature(columns, temperature), u, top_k, top_p).asnumpy()
        assert np.array_equal(expected, first + got)
