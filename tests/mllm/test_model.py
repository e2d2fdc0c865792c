"""Emu3ForCausalLM against transformers' Emu3 text model (PyTorch) with the same random weights."""

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn

from emu3 import backend
from emu3.mllm import Emu3ForCausalLM, model as model_module
from tests.mllm.tiny import generate_position_ids, left_padded_batch, tiny_config, tiny_model, torch_twin

TOL = 1e-4


def _t(x):
    return ms.Tensor(np.asarray(x), ms.int32)


def test_full_forward_matches_reference(torch_reference, rng):
    torch = torch_reference
    model = tiny_model()
    ref = torch_twin(model, torch)
    ids = rng.integers(0, 512, (2, 12))
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits.numpy()
    out = model(_t(ids)).asnumpy()
    assert out.dtype == np.float32 and out.shape == (2, 12, 512)
    assert np.abs(out - expected).max() < TOL


def test_left_padded_batch_matches_reference(torch_reference, rng):
    torch = torch_reference
    model = tiny_model()
    ref = torch_twin(model, torch)
    ids, mask = left_padded_batch(rng, [10, 6, 3], 512, 10)
    pos = generate_position_ids(mask)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                       position_ids=torch.from_numpy(pos).long()).logits.numpy()
    out = model(_t(ids), _t(mask)).asnumpy()  # default positions follow the same rule
    real = mask.astype(bool)
    assert np.abs(out[real] - expected[real]).max() < TOL
    out_explicit = model(_t(ids), _t(mask), _t(pos)).asnumpy()
    np.testing.assert_array_equal(out_explicit, out)


def test_loss_matches_reference(torch_reference, rng):
    torch = torch_reference
    model = tiny_model()
    ref = torch_twin(model, torch)
    ids = rng.integers(0, 512, (2, 9))
    labels = ids.copy()
    labels[0, :4] = -100
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss.item()
    loss, logits = model(_t(ids), labels=_t(labels))
    assert abs(loss.asnumpy().item() - expected) < TOL
    assert logits.shape == (2, 9, 512)


def _reference_cached(torch, ref, ids, mask, new_tokens):
    """transformers with its DynamicCache: prefill, then one token per step; last logits each time."""
    from transformers import DynamicCache

    pos = generate_position_ids(mask)
    cache = DynamicCache()
    with torch.no_grad():
        out = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                  position_ids=torch.from_numpy(pos).long(), past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1].numpy()]
        for step, tok in enumerate(new_tokens.T):
            mask = np.concatenate([mask, np.ones((len(mask), 1), mask.dtype)], 1)
            pos = generate_position_ids(mask)[:, -1:]
            out = ref(torch.from_numpy(tok[:, None]).long(), attention_mask=torch.from_numpy(mask).long(),
                      position_ids=torch.from_numpy(pos).long(), past_key_values=out.past_key_values,
                      cache_position=torch.tensor([ids.shape[1] + step]), use_cache=True)
            logits.append(out.logits[:, -1].numpy())
    return logits


def _eager_step(model, max_length):
    """forward_cached(input_ids, position_ids, cache_position, attention_mask, window) on a fresh cache."""
    cache = model.init_cache(2, max_length)
    return lambda *args: model.forward_cached(*args[:4], cache, args[4])


def _ours_cached(step_fn, ids, mask, new_tokens, max_length, windows=None):
    """Our static cache: prefill into slots 0..L-1, then one slot per step; last logits each time.
    `windows`: the attention window of each call (default: the whole cache)."""
    b, length = ids.shape
    windows = iter(windows or [None] * (1 + new_tokens.shape[1]))
    slot_mask = np.zeros((b, max_length), np.int32)
    slot_mask[:, :length] = mask
    pos = generate_position_ids(mask)
    outs = [step_fn(_t(ids), _t(pos), _t(np.arange(length)), _t(slot_mask), next(windows)).asnumpy()]
    for step, tok in enumerate(new_tokens.T):
        slot = length + step
        slot_mask[:, slot] = 1
        pos = generate_position_ids(slot_mask[:, :slot + 1])[:, -1:]
        outs.append(step_fn(_t(tok[:, None]), _t(pos), _t([slot]), _t(slot_mask), next(windows)).asnumpy())
    return outs


def test_forward_cached_prefill_and_decode_match_reference(torch_reference, rng):
    torch = torch_reference
    model = tiny_model()
    ref = torch_twin(model, torch)
    ids, mask = left_padded_batch(rng, [7, 4], 512, 7)
    new_tokens = rng.integers(3, 512, (2, 5))
    expected = _reference_cached(torch, ref, ids, mask, new_tokens)
    ours = _ours_cached(_eager_step(model, 16), ids, mask, new_tokens, 16)
    for got, want in zip(ours, expected):
        assert got.shape == (2, 512) and got.dtype == np.float32
        assert np.abs(got - want).max() < TOL
    # Attention over windows of the cache (the prefill and first decode steps in the first 8 slots,
    # then the whole cache) reads the same keys: the same logits.
    windowed = _ours_cached(_eager_step(model, 16), ids, mask, new_tokens, 16, [8, 8, 16, 16, 16, 16])
    for got, want in zip(windowed, expected):
        assert np.abs(got - want).max() < TOL


def test_fused_projections_match_the_split_model_and_reference(torch_reference, rng):
    model = tiny_model()
    ref = torch_twin(model, torch_reference)
    ids, mask = left_padded_batch(rng, [7, 4], 512, 7)
    new_tokens = rng.integers(3, 512, (2, 5))
    split = model(_t(ids), _t(mask)).asnumpy()
    model.fuse_projections()
    real = mask.astype(bool)
    assert np.abs(model(_t(ids), _t(mask)).asnumpy()[real] - split[real]).max() < 1e-6
    expected = _reference_cached(torch_reference, ref, ids, mask, new_tokens)
    for got, want in zip(_ours_cached(_eager_step(model, 16), ids, mask, new_tokens, 16), expected):
        assert np.abs(got - want).max() < TOL


def _empty_rows_give_nan(masked):
    """Softmax over a row whose every key is masked with -inf, as a fused kernel without a finite fill
    value computes it: NaN. Each query row of `masked` (True = not allowed) must allow one key."""
    scores = np.where(masked, -np.inf, 0.0)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.isnan(probs / probs.sum(-1, keepdims=True)).any()


def test_padding_queries_attend_their_own_slot_so_the_cache_stays_finite(rng):
    model = tiny_model()
    ids, mask = left_padded_batch(rng, [7, 2], 512, 7)  # row 1: five pad queries
    slot_mask = np.zeros((2, 16), np.int32)
    slot_mask[:, :7] = mask
    prefill = model_module._cached_mask(_t(slot_mask), _t(np.arange(7))).asnumpy()
    full = model_module._full_mask(_t(mask), 7).asnumpy()
    assert not _empty_rows_give_nan(prefill) and not _empty_rows_give_nan(full)
    # Real queries still see exactly the real slots up to their own.
    real = mask.astype(bool)
    causal = np.tril(np.ones((7, 7), bool))
    np.testing.assert_array_equal(~full[:, 0][real], (causal[None] & real[:, None, :])[real])
    np.testing.assert_array_equal(~prefill[:, 0, :, :7][real], (causal[None] & real[:, None, :])[real])
    cache = model.init_cache(2, 16)
    model.forward_cached(_t(ids), _t(generate_position_ids(mask)), _t(np.arange(7)), _t(slot_mask), cache)
    assert all(np.isfinite(state.asnumpy()).all() for state in cache.states)


class _DecodeStep(nn.Cell):
    def __init__(self, model, cache):
        super().__init__()
        self.model = model
        self.cache = cache

    def construct(self, input_ids, position_ids, cache_position, attention_mask, window):
        return self.model.forward_cached(input_ids, position_ids, cache_position, attention_mask, self.cache, window)


@pytest.mark.parametrize("fused", [False, True])
def test_graph_forward_cached_equals_pynative_without_recompiling(rng, fused):
    model = tiny_model()
    if fused:
        model.fuse_projections()
    ids, mask = left_padded_batch(rng, [6, 3], 512, 6)
    new_tokens = rng.integers(3, 512, (2, 6))
    windows = [8, 8, 8, 16, 16, 16, 16]
    eager = _ours_cached(_eager_step(model, 16), ids, mask, new_tokens, 16, windows)
    backend.set_run_mode("graph", "CPU")
    step = _DecodeStep(model, model.init_cache(2, 16))
    graph = _ours_cached(step, ids, mask, new_tokens, 16, windows)
    # One graph for the prefill shape, one per decode window, however many steps run.
    assert len(step.compile_cache) == 3
    for got, want in zip(graph, eager):
        assert np.abs(got - want).max() < 1e-5


def test_full_vocabulary_forward_and_cached_match_reference(torch_reference, rng):
    torch = torch_reference
    model = tiny_model(vocab_size=184622, pad_token_id=151643, bos_token_id=151849, eos_token_id=151850)
    ref = torch_twin(model, torch)
    ids = rng.integers(0, 184622, (1, 6))
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(model(_t(ids)).asnumpy() - expected).max() < TOL
    cache = model.init_cache(1, 8)
    logits = model.forward_cached(_t(ids), _t(np.arange(6)[None]), _t(np.arange(6)), _t(np.ones((1, 8))), cache)
    assert logits.shape == (1, 184622)
    assert np.abs(logits.asnumpy() - expected[:, -1]).max() < TOL


def test_gradients_match_reference_and_recompute_changes_nothing(torch_reference, rng):
    torch = torch_reference
    model = tiny_model()
    ref = torch_twin(model, torch)
    ids = rng.integers(0, 512, (2, 8))
    ref(torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss.backward()
    expected = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    params = model.trainable_params()

    def loss_fn(x):
        return model(x, labels=x)[0]

    grads = ms.grad(loss_fn, grad_position=None, weights=params)(_t(ids))
    for p, g in zip(params, grads):
        assert np.abs(g.asnumpy() - expected[p.name]).max() < TOL, p.name
    model.enable_recompute()
    grads_rc = ms.grad(loss_fn, grad_position=None, weights=params)(_t(ids))
    for g, g_rc in zip(grads, grads_rc):
        np.testing.assert_allclose(g_rc.asnumpy(), g.asnumpy(), atol=1e-6)


def test_fp16_weights_keep_norms_softmax_and_logits_in_fp32(torch_reference, rng):
    torch = torch_reference
    model = tiny_model(dtype="fp16")
    assert all(p.dtype == ms.float16 for p in model.get_parameters())
    ref = torch_twin(model, torch)  # the same (fp16-rounded) weights, computed in fp32
    ids = rng.integers(0, 512, (2, 10))
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits.numpy()
    out = model(_t(ids))
    assert out.dtype == ms.float32
    assert np.abs(out.asnumpy() - expected).max() < 2e-2


def test_flash_attention_on_cpu_warns_and_falls_back(caplog):
    with caplog.at_level("WARNING"):
        model = Emu3ForCausalLM(tiny_config(), attn_implementation="flash_attention_2")
    assert model.attn_implementation == "eager" and "falling back to 'eager'" in caplog.text
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        Emu3ForCausalLM(tiny_config(), attn_implementation="sdpa")
    with pytest.raises(ValueError, match="bf16"):
        Emu3ForCausalLM(tiny_config(), dtype="bf16")


class _TrainForward(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, input_ids, attention_mask, labels):
        return self.model(input_ids, attention_mask, labels=labels)


def test_graph_full_forward_and_loss_equal_pynative(rng):
    model = tiny_model()
    ids, mask = left_padded_batch(rng, [8, 5], 512, 8)
    loss, logits = model(_t(ids), _t(mask), labels=_t(ids))
    backend.set_run_mode("graph", "CPU")
    loss_g, logits_g = _TrainForward(model)(_t(ids), _t(mask), _t(ids))
    assert abs(loss_g.asnumpy() - loss.asnumpy()) < 1e-6
    assert np.abs(logits_g.asnumpy() - logits.asnumpy()).max() < 1e-5


def test_wrong_shapes_are_clear_errors():
    model = tiny_model()
    ids = _t(np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 5\), got \(2, 4\)"):
        model(ids, _t(np.ones((2, 4))))
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 5\)"):
        model(ids, labels=_t(np.ones((1, 5))))
    cache = model.init_cache(2, 8)
    pos, slots = _t(np.zeros((2, 5))), _t(np.arange(5))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 8\), got \(2, 5\)"):
        model.forward_cached(ids, pos, slots, _t(np.ones((2, 5))), cache)
    with pytest.raises(ValueError, match="batch size 1"):
        model.forward_cached(ids, pos, slots, _t(np.ones((2, 8))), model.init_cache(1, 8))
    with pytest.raises(ValueError, match=r"window must be in \[1, 8\]"):
        model.forward_cached(ids, pos, slots, _t(np.ones((2, 8))), cache, window=9)
    with pytest.raises(ValueError, match="max_position_embeddings 128"):
        model.init_cache(1, 129)


def test_rotary_embedding_matches_reference_at_long_positions(torch_reference, rng):
    torch = torch_reference
    model = tiny_model(num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=9216)  # head dim 64
    ref = torch_twin(model, torch)
    ids = rng.integers(0, 512, (1, 8))
    pos = 9200 + np.arange(8)[None]
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), position_ids=torch.from_numpy(pos)).logits.numpy()
    assert np.abs(model(_t(ids), position_ids=_t(pos)).asnumpy() - expected).max() < TOL


def test_dropout_only_in_training_mode(rng):
    model = tiny_model()
    ids = _t(rng.integers(0, 512, (1, 6)))
    np.testing.assert_array_equal(model(ids).asnumpy(), model(ids).asnumpy())
    model.set_train(True)
    assert np.abs(model(ids).asnumpy() - model(ids).asnumpy()).max() > 1e-3
    model.set_train(False)
