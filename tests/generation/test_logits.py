"""The device-side logits pipeline against transformers' logits processors on random logits."""

from types import SimpleNamespace

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn

from emu3.generation import sampling
from emu3.generation.constraints import ImagePrefixConstraint, build_prefix_constraint, visual_token_ids
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


@pytest.mark.parametrize("height,width", [(3, 4), (2, 1)])
def test_device_constraint_matches_prefix_constrained_processor(torch_reference, tlp, height, width):
    """Every offset from the first image token to past eos, several prompt layouts in one batch."""
    config = EMU3_IDS
    fn = build_prefix_constraint(height, width, config)
    reference = tlp.PrefixConstrainedLogitsProcessor(fn, num_beams=1)
    constraint = ImagePrefixConstraint(config)
    offsets = np.arange(1, (width + 1) * height + 7)
    prompt_lengths = [3, 5]
    rows, row_offsets = [], []
    for n in offsets:  # a row whose last token is n - 1 positions after img: its next offset is n
        for prompt in prompt_lengths:
            row = np.full(prompt + n - 1, 7, np.int64)
            row[prompt - 1] = config.img_token_id
            rows.append(row)
            row_offsets.append(n)
    scores = np.random.default_rng(0).normal(size=(len(rows), config.vocab_size)).astype(np.float32)
    expected = np.concatenate([
        reference(torch_reference.from_numpy(r[None]), torch_reference.from_numpy(s[None])).numpy()
        for r, s in zip(rows, scores)])
    b = len(rows)
    got, visual = constraint(ms.Tensor(scores), ms.Tensor(np.array(row_offsets, np.int32)),
                             ms.Tensor(np.full(b, height, np.int32)), ms.Tensor(np.full(b, width, np.int32)))
    np.testing.assert_array_equal(got.asnumpy(), expected)
    np.testing.assert_array_equal(visual.asnumpy(), np.isfinite(expected).sum(-1) == 32768)


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
    """CFG, constraint and sampling in one cell, as inside the decode step."""

    def __init__(self, config):
        super().__init__()
        self.constraint = ImagePrefixConstraint(config)

    def construct(self, logits, offsets, heights, widths, uniforms):
        scores = classifier_free_guidance(logits, 3.0)
        scores = self.constraint(scores, offsets, heights, widths)[0]
        return sampling.sample(scores, uniforms, 2048, 0.9), sampling.greedy(scores)


def test_pipeline_graph_equals_pynative(run_mode, rng):
    config = EMU3_IDS
    b = 4
    logits = ms.Tensor(rng.normal(size=(2 * b, config.vocab_size)).astype(np.float32))
    args = (logits, ms.Tensor(np.array([1, 5, 16, 17], np.int32)), ms.Tensor(np.full(b, 3, np.int32)),
            ms.Tensor(np.full(b, 4, np.int32)), ms.Tensor(sampling.draw_uniforms(0, 1, b)[0]))
    sampled, best = (t.asnumpy() for t in _Pipeline(config)(*args))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ref_sampled, ref_best = (t.asnumpy() for t in _Pipeline(config)(*args))
    assert np.array_equal(sampled, ref_sampled) and np.array_equal(best, ref_best)
    visual = visual_token_ids(config)
    assert visual[0] <= sampled[0] <= visual[-1] and sampled[1] == config.eol_token_id
    assert sampled[2] == config.eof_token_id and sampled[3] == config.eoi_token_id


def test_sampling_the_visual_columns_equals_sampling_the_vocabulary(rng):
    """Where a visual token is due, sampling the 32768 visual columns picks what the full row would."""
    config = EMU3_IDS
    scores = ms.Tensor(rng.normal(size=(8, config.vocab_size)).astype(np.float32) * 3)
    b = ms.Tensor(np.full(8, 3, np.int32))
    masked, visual = ImagePrefixConstraint(config)(scores, ms.Tensor(np.full(8, 2, np.int32)), b, b)
    assert visual.asnumpy().all()
    u = ms.Tensor(sampling.draw_uniforms(1, 1, 8)[0])
    first = int(visual_token_ids(config)[0])
    columns = ms.ops.narrow(masked, -1, first, 32768)
    for top_k, top_p in [(2048, 1.0), (100, 0.7), (None, 0.9)]:
        full = sampling.sample(masked, u, top_k, top_p).asnumpy()
        assert np.array_equal(full, first + sampling.sample(columns, u, top_k, top_p).asnumpy())
