"""A tiny Emu3 language model and its PyTorch twin with the same weights, for parity tests."""

import numpy as np
import mindspore as ms

from emu3.mllm import Emu3Config, Emu3ForCausalLM

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(**overrides) -> Emu3Config:
    return Emu3Config(**{**TINY, **overrides})


def tiny_model(seed=0, dtype="fp32", **overrides) -> Emu3ForCausalLM:
    """A tiny model with reproducible random weights (RMSNorm weights randomised too)."""
    model = Emu3ForCausalLM(tiny_config(**overrides), dtype=dtype)
    rng = np.random.default_rng(seed)
    for name, p in model.parameters_and_names():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            value = 1.0 + 0.1 * rng.standard_normal(p.shape)
        else:
            value = 0.05 * rng.standard_normal(p.shape)
        p.set_data(ms.Tensor(value.astype(np.float32)).astype(p.dtype))
    model.set_train(False)
    return model


def torch_twin(model, torch):
    """transformers' Emu3ForCausalLM (eager attention) holding `model`'s weights in fp32."""
    from transformers import Emu3TextConfig
    from transformers.models.emu3.modeling_emu3 import Emu3ForCausalLM as TorchEmu3

    c = model.config
    cfg = Emu3TextConfig(**{k: getattr(c, k) for k in TINY}, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                         rope_scaling=c.rope_scaling, attention_dropout=c.attention_dropout,
                         attn_implementation="eager")
    ref = TorchEmu3(cfg).eval()
    state = {n: torch.from_numpy(p.astype(ms.float32).asnumpy()) for n, p in model.parameters_and_names()}
    ref.load_state_dict(state, strict=True)
    return ref


def left_padded_batch(rng, lengths, vocab, total):
    """ids and mask (B, total) with each row's real tokens at the right end (left padding)."""
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(3, vocab, n)
        mask[row, total - n:] = 1
    return ids, mask


def generate_position_ids(mask):
    """transformers' generate rule for left padding: cumsum(mask) - 1, pads at position 1."""
    pos = np.cumsum(mask, -1) - 1
    pos[mask == 0] = 1
    return pos.astype(np.int32)
