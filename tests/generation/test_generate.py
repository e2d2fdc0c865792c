"""Generation against transformers' generate with the same random weights (greedy, CFG, the image
constraint), seeded sampling, graph mode == pynative, and compilations that don't grow with length."""

import importlib

import numpy as np
import pytest

from emu3 import backend, weights
from emu3.generation import GenerationConfig, build_prefix_constraint, generate
from emu3.generation.constraints import visual_token_ids
from emu3.generation.sampling import draw_uniforms

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


def unused_eos(model, ids, mask, new_tokens):
    """An eos id that greedy decoding of these prompts never emits in `new_tokens` tokens, so a
    generation with it runs to max_new_tokens (eos must be a real id: the loop checks its range)."""
    for eos in range(1000, 1010):
        out = generate(model, ids, mask, GenerationConfig(max_new_tokens=new_tokens, eos_token_id=eos),
                       progress=False)[:, ids.shape[1]:]
        if out.shape[1] == new_tokens and not (out == eos).any():
            return eos
    raise AssertionError("every candidate eos was generated")


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


def test_constrained_greedy_without_guidance_matches_transformers(run_mode, models, torch_reference, rng):
    """Images of two sizes in one batch: at some steps one row's token is forced while the other's is
    a visual one (the visual lm_head computes both, the forced row takes its token)."""
    reference, model = models
    config = model.config
    ids, mask = image_prompts(config, rng, [2, 5])
    sizes = [(2, 4), (3, 3)]  # 13 and 15 new tokens: the first row pads after its eos
    constraints = [build_prefix_constraint(h, w, config) for h, w in sizes]
    with torch_reference.no_grad():
        expected = reference.generate(
            torch_reference.from_numpy(ids).long(), attention_mask=torch_reference.from_numpy(mask).long(),
            max_new_tokens=15, do_sample=False, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
            prefix_allowed_tokens_fn=lambda batch_id, row: constraints[batch_id](batch_id, row)).numpy()
    got = generate(model, ids, mask, GenerationConfig(max_new_tokens=15), image_size=sizes, progress=False)
    np.testing.assert_array_equal(got, expected)
    for row, (h, w) in zip(got[:, ids.shape[1]:], sizes):
        assert_well_formed(row, config, h, w)
    assert got[0, -2:].tolist() == [config.pad_token_id] * 2


def _log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def sampled_reference(torch, reference, prompts, negatives, image_size, settings, new):
    """Seeded text-to-image sampling restated in numpy (float64) over transformers' full-vocabulary
    logits of unpadded rows: guidance on log-probabilities, the constraint, temperature, top-k,
    top-p (transformers' rules), then the token where the row's uniform falls in the cumulative
    distribution of the candidates ranked best first. Also returns how many sampled tokens differ
    from the argmax (so the test is not greedy in disguise)."""
    allowed_fn = build_prefix_constraint(*image_size, EMU3_CONFIG)
    uniforms = draw_uniforms(settings.seed, new, len(prompts))
    rows = [list(p) for p in prompts]
    not_argmax = 0

    def last_logits(tokens):
        with torch.no_grad():
            return reference(torch.tensor([tokens])).logits[0, -1].double().numpy()

    for t in range(new):
        for b, (row, negative) in enumerate(zip(rows, negatives)):
            scores = last_logits(row)
            if settings.guided:
                cond, uncond = _log_softmax(scores), _log_softmax(last_logits(list(negative) + row[len(prompts[b]):]))
                scores = settings.guidance_scale * (cond - uncond) + uncond
            allowed = allowed_fn(b, np.array(row))
            x = np.full_like(scores, -np.inf)
            x[allowed] = scores[allowed] / settings.temperature
            x[x < np.sort(x)[-settings.top_k]] = -np.inf
            ascending = np.sort(x)
            cumulative = np.cumsum(np.exp(ascending - ascending[-1]) / np.exp(ascending - ascending[-1]).sum())
            removed = cumulative <= 1 - settings.top_p
            removed[-1] = False
            x[x < ascending[removed.sum()]] = -np.inf
            order = np.argsort(-x, kind="stable")
            cdf = np.cumsum(np.exp(x[order] - x[order[0]]))
            token = int(order[np.searchsorted(cdf, uniforms[t, b] * cdf[-1], side="right")])
            not_argmax += token != int(np.argmax(x))
            row.append(token)
    return np.array([row[len(p):] for row, p in zip(rows, prompts)]), not_argmax


@pytest.mark.parametrize("guidance_scale", [3.0, None])
def test_seeded_image_sampling_matches_a_numpy_restatement(models, torch_reference, rng, guidance_scale):
    """Top-k/top-p sampling of an image over the visual columns only (and no lm_head at forced
    steps) draws the tokens that sampling the full vocabulary draws from the same uniforms."""
    reference, model = models
    config = model.config
    ids, mask = image_prompts(config, rng, [2, 5])
    negative, _ = image_prompts(config, rng, [3])
    negative = np.repeat(negative, 2, 0)
    settings = GenerationConfig(max_new_tokens=11, do_sample=True, top_k=40, top_p=0.9, temperature=0.7, seed=3,
                                guidance_scale=guidance_scale)
    prompts = [r[m == 1] for r, m in zip(ids, mask)]
    expected, not_argmax = sampled_reference(torch_reference, reference, prompts, negative, (2, 3), settings, 11)
    got = generate(model, ids, mask, settings, negative_input_ids=negative if settings.guided else None,
                   image_size=(2, 3), progress=False)
    np.testing.assert_array_equal(got[:, ids.shape[1]:], expected)
    assert not_argmax >= 4


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


def test_graph_image_compiles_three_graphs_whatever_its_size(models, rng, compilations):
    """Graph mode, text-to-image with guidance: the prefill, the visual-columns step and the forced-token
    step; a larger image with the same cache size compiles nothing more."""
    _, model = models
    config = model.config
    backend.set_run_mode("graph", "CPU")
    ids, mask = image_prompts(config, rng, [3])
    counts = []
    for h, w in [(2, 3), (4, 6)]:
        compilations.clear()
        got = generate(model, ids, mask, GenerationConfig(max_new_tokens=(w + 1) * h + 3, guidance_scale=3.0),
                       negative_input_ids=ids, image_size=(h, w), progress=False)
        assert_well_formed(got[0, ids.shape[1]:], config, h, w)
        counts.append(sum(compilations))
    assert counts == [3, 0], counts


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


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=float("nan"), do_sample=True), r"temperature .* must be a finite number > 0, got nan"),
    (dict(temperature=float("inf")), r"temperature .* got inf"),
    (dict(top_p=float("nan")), r"top_p must be a finite number in \(0, 1\], got nan"),
    (dict(top_p=1.5), r"top_p must be a finite number in \(0, 1\], got 1.5"),
    (dict(max_new_tokens=2.5), r"max_new_tokens must be an integer >= 1, got 2.5"),
    (dict(max_new_tokens="8"), r"max_new_tokens must be an integer >= 1, got '8'"),
    (dict(top_k=True), r"top_k .* must be an integer >= 0, got True"),
    (dict(top_k=-1), r"top_k .* must be an integer >= 0, got -1"),
    (dict(guidance_scale=float("inf")), r"guidance_scale must be a finite number >= 0, got inf"),
    (dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number >= 0, got nan"),
    (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
    (dict(seed=1.0), r"seed must be an integer >= 0, got 1.0"),
    (dict(do_sample="yes"), r"do_sample must be True or False"),
])
def test_generation_config_refuses_non_finite_and_wrong_types(settings, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**settings).validate()


def test_the_default_and_numpy_values_pass():
    GenerationConfig().validate()
    GenerationConfig(max_new_tokens=np.int64(4), top_k=np.int32(2), top_p=np.float32(0.5), seed=np.uint32(7),
                     guidance_scale=np.float64(3.0), do_sample=np.bool_(True)).validate()


@pytest.mark.parametrize("ids, config, message", [
    (np.array([[5, -1, 7]]), GenerationConfig(), r"input_ids holds ids outside the vocabulary \[0, 184622\): "
                                                  r"values from -1 to 7"),
    (np.array([[5, 184622]]), GenerationConfig(), r"outside the vocabulary \[0, 184622\)"),
    (np.array([[5, 6]]), GenerationConfig(eos_token_id=184622), r"eos_token_id must be an integer in \[0, 184621\]"),
    (np.array([[5, 6]]), GenerationConfig(pad_token_id=-3), r"pad_token_id must be an integer in \[0, 184621\]"),
])
def test_token_ids_outside_the_vocabulary_are_refused_before_any_step(models, monkeypatch, ids, config, message):
    _, model = models

    def never(*args, **kwargs):
        raise AssertionError("a generation step was built for a refused request")

    monkeypatch.setattr(generate_module, "_step_for", never)
    with pytest.raises(ValueError, match=message):
        generate(model, ids, config=config, progress=False)
    negative = np.array([[5, 6, 200000]])
    with pytest.raises(ValueError, match=r"negative_input_ids holds ids outside the vocabulary"):
        generate(model, np.array([[5, 6, 7]]), config=GenerationConfig(guidance_scale=3.0),
                 negative_input_ids=negative, progress=False)


def test_fused_projections_keep_cfg_image_tokens_identical_to_transformers(models, torch_reference, rng):
    """The inference commands' model (fuse_projections) in GRAPH mode, left-padded CFG batch."""
    from emu3.mllm.model import Emu3ForCausalLM

    reference, model = models
    config = model.config
    weights_of = dict(model.parameters_and_names())
    fused = Emu3ForCausalLM(config)
    for name, param in fused.parameters_and_names():
        param.set_data(weights_of[name])
    fused.fuse_projections().set_train(False)
    ids, mask = image_prompts(config, rng, [2, 5])
    negative, _ = image_prompts(config, rng, [3, 3])
    expected = reference_generate(torch_reference, reference, ids, mask, 24, config.eos_token_id, negative,
                                  (HEIGHT, WIDTH))
    got = generate(fused, ids, mask, GenerationConfig(max_new_tokens=24, guidance_scale=3.0, mode="graph"),
                   negative_input_ids=negative, image_size=(HEIGHT, WIDTH), progress=False)
    np.testing.assert_array_equal(got, expected)
