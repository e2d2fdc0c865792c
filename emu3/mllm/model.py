"""Emu3's language model: a Llama-style decoder (GQA, RoPE, RMSNorm, SiLU MLP, untied lm_head).

Two entry points share every layer:
- `Emu3ForCausalLM.construct` runs whole sequences (training, scoring) and returns all logits,
  plus the loss when labels are given;
- `Emu3ForCausalLM.forward_cached` runs a prefill or a decode step against a static, preallocated
  KV cache (emu3.generation.cache), which it updates in place, and returns only the last
  position's logits, so one compiled graph serves every step of a generation.
Weights are in the model dtype; RMSNorm, softmax, RoPE tables and logits are fp32.
"""

import contextlib

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, One, Zero, initializer

from emu3 import backend, weights
from emu3.generation import cache as kv_cache
from emu3.mllm import layouts
from emu3.mllm.config import Emu3Config

# Additive mask value for disallowed attention; the same as transformers' (finfo(float32).min).
_MASKED = float(np.finfo(np.float32).min)


# Random initialisation materialises every weight (minutes and 34 GB for Emu3-8B); from_pretrained
# turns it off so weights stay unallocated (lazy zeros) until the checkpoint's tensors replace them.
_RANDOM_INIT = True


@contextlib.contextmanager
def _deferred_init():
    global _RANDOM_INIT
    _RANDOM_INIT = False
    try:
        yield
    finally:
        _RANDOM_INIT = True


def _weight_init(config):
    return Normal(config.initializer_range) if _RANDOM_INIT else Zero()


def _linear(in_features, out_features, config, dtype):
    # nn.Dense runs MatMul(transpose_b=True): for the lm_head at M=1 on CPU it is ~90x faster than
    # mint.nn.Linear in pynative mode and ~1.4x in graph mode.
    return nn.Dense(in_features, out_features, has_bias=False, dtype=dtype, weight_init=_weight_init(config))


class Emu3RMSNorm(nn.Cell):
    def __init__(self, hidden_size, eps, dtype):
        super().__init__()
        self.weight = Parameter(initializer(One(), (hidden_size,), dtype), name="weight")
        self.eps = eps

    def construct(self, x):
        return backend.rms_norm(x, self.weight, self.eps)


class Emu3Embedding(nn.Cell):
    """Token embedding table (mint.nn.Embedding has no CPU kernel; a gather does)."""

    def __init__(self, config, dtype):
        super().__init__()
        self.weight = Parameter(initializer(_weight_init(config), (config.vocab_size, config.hidden_size), dtype),
                                name="weight")

    def construct(self, input_ids):
        return ops.gather(self.weight, input_ids, 0)


class Emu3RotaryEmbedding(nn.Cell):
    """cos/sin of the rotary position embedding, computed in fp32 from position ids.

    The sin table comes with its first half negated: rotate_half(x) * sin equals
    swap_halves(x) * signed_sin exactly, one gather instead of split, negate and concat.
    """

    def __init__(self, config):
        super().__init__()
        dim = config.head_dim
        # fp32 Pow as in transformers: numpy's pow differs in the last bit for a quarter of the
        # frequencies, which grows to ~1e-3 rad of angle at position 9000.
        exponent = Tensor(np.arange(0, dim, 2, dtype=np.float32)) / dim
        inv_freq = 1.0 / ops.pow(Tensor(config.rope_theta, ms.float32), exponent)
        self.inv_freq = inv_freq / config.rope_factor

    def construct(self, position_ids, dtype):
        """(B, L, D) cos and signed sin."""
        freqs = position_ids.astype(ms.float32)[:, :, None] * self.inv_freq
        cos, sin = ops.cos(freqs), ops.sin(freqs)
        return ops.concat((cos, cos), -1).astype(dtype), ops.concat((-sin, sin), -1).astype(dtype)


def _split_heads(x, heads, head_dim):
    """(B, L, heads * D) -> (B, heads, L, D). For one token (a decode step) that is a reshape: no
    transpose kernel, four fewer per layer and token."""
    b, length, _ = x.shape
    if length == 1:
        return x.reshape(b, heads, 1, head_dim)
    return ops.swapaxes(x.reshape(b, length, heads, head_dim), 1, 2)


def _merge_heads(x):
    """(B, heads, L, D) -> (B, L, heads * D), the inverse of _split_heads."""
    b, heads, length, head_dim = x.shape
    if length == 1:
        return x.reshape(b, 1, heads * head_dim)
    return ops.swapaxes(x, 1, 2).reshape(b, length, heads * head_dim)


def swap_halves_index(head_dim):
    return Tensor(np.roll(np.arange(head_dim), head_dim // 2), ms.int32)


def apply_rotary_pos_emb(q, k, cos, signed_sin, swap_halves):
    """Rotate (B, heads, L, D) q and k by Emu3RotaryEmbedding's (B, L, D) cos and signed sin;
    `swap_halves` is swap_halves_index(D)."""
    cos, signed_sin = cos[:, None], signed_sin[:, None]
    return (q * cos + ops.gather(q, swap_halves, 3) * signed_sin,
            k * cos + ops.gather(k, swap_halves, 3) * signed_sin)


class Emu3Attention(nn.Cell):
    def __init__(self, config, dtype, attn_implementation):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.attn_implementation = attn_implementation
        self.q_proj = _linear(config.hidden_size, self.num_heads * self.head_dim, config, dtype)
        self.k_proj = _linear(config.hidden_size, self.num_kv_heads * self.head_dim, config, dtype)
        self.v_proj = _linear(config.hidden_size, self.num_kv_heads * self.head_dim, config, dtype)
        self.o_proj = _linear(self.num_heads * self.head_dim, config.hidden_size, config, dtype)
        self.swap_halves = swap_halves_index(self.head_dim)

    def core_attention(self, q, k, v, mask):
        """Softmax attention on (B, heads, L, D) q and (B, kv_heads, S, D) k/v; mask additive (B, 1, L, S).

        One method so that sequence parallelism can wrap exactly this part.
        """
        dropout = self.attention_dropout if self.training else 0.0
        return backend.attention(q, k, v, mask, self.attn_implementation, dropout)

    def construct(self, hidden_states, cos, sin, mask, cache=None, layer=0, cache_position=None, window=None):
        """With a KVCache, writes this step's k/v into its `layer` at cache_position and attends
        over the cache's first `window` slots."""
        q = _split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
        k = _split_heads(self.k_proj(hidden_states), self.num_kv_heads, self.head_dim)
        v = _split_heads(self.v_proj(hidden_states), self.num_kv_heads, self.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, self.swap_halves)
        if cache is not None:
            k, v = cache.update(layer, k, v, cache_position, window)
        return self.o_proj(_merge_heads(self.core_attention(q, k, v, mask)))


class Emu3MLP(nn.Cell):
    def __init__(self, config, dtype):
        super().__init__()
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, config, dtype)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, config, dtype)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, config, dtype)

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class Emu3DecoderLayer(nn.Cell):
    def __init__(self, config, dtype, attn_implementation):
        super().__init__()
        self.self_attn = Emu3Attention(config, dtype, attn_implementation)
        self.mlp = Emu3MLP(config, dtype)
        self.input_layernorm = Emu3RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = Emu3RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.dropout = nn.Dropout(p=config.attention_dropout)

    def construct(self, hidden_states, cos, sin, mask, cache=None, layer=0, cache_position=None, window=None):
        attn = self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask, cache, layer, cache_position,
                              window)
        hidden_states = hidden_states + self.dropout(attn)
        return hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


class Emu3Model(nn.Cell):
    """Embedding, decoder layers and final norm (transformers' Emu3TextModel)."""

    def __init__(self, config, dtype, attn_implementation):
        super().__init__()
        self.embed_tokens = Emu3Embedding(config, dtype)
        self.layers = nn.CellList([Emu3DecoderLayer(config, dtype, attn_implementation)
                                   for _ in range(config.num_hidden_layers)])
        self.norm = Emu3RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = Emu3RotaryEmbedding(config)
        self.dtype = dtype

    def construct(self, input_ids, position_ids, mask, cache=None, cache_position=None, window=None):
        hidden_states = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, self.dtype)
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, cos, sin, mask, cache, i, cache_position, window)
        return self.norm(hidden_states)


def _default_position_ids(attention_mask):
    # What transformers' generate uses for left padding: count real tokens; pads get position 1.
    positions = ops.cumsum(attention_mask.astype(ms.int32), -1) - 1
    return ops.where(attention_mask == 0, ops.ones_like(positions), positions)


def _additive(allowed):
    return (1.0 - allowed.astype(ms.float32)) * _MASKED


def _full_mask(attention_mask, length):
    """Additive (B, 1, L, L) mask: causal, and no attention to padded keys."""
    idx = ops.arange(length, dtype=ms.int32)
    allowed = (idx[None, :] <= idx[:, None])[None, None]
    if attention_mask is not None:
        allowed = ops.logical_and(allowed, (attention_mask != 0)[:, None, None, :])
    return _additive(allowed)


def _cached_mask(attention_mask, cache_position):
    """Additive (B, 1, L, S) mask over cache slots: slot <= the query's slot and holding a real token."""
    slots = ops.arange(attention_mask.shape[1], dtype=ms.int32)
    allowed = ops.logical_and((slots[None, :] <= cache_position[:, None])[None, None],
                              (attention_mask != 0)[:, None, None, :])
    return _additive(allowed)


def _check_shape(name, tensor, shape):
    # Shapes are static, so in graph mode this check runs once, at compile time.
    if tensor is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


class Emu3ForCausalLM(nn.Cell):
    """Emu3's language model with its lm_head over the 184,622-token vocabulary."""

    def __init__(self, config: Emu3Config, dtype="fp32", attn_implementation: str = "eager"):
        super().__init__()
        self.config = config
        self.dtype = backend.parse_dtype(dtype)
        self.attn_implementation = backend.resolve_attn_implementation(attn_implementation)
        self.model = Emu3Model(config, self.dtype, self.attn_implementation)
        self.lm_head = _linear(config.hidden_size, config.vocab_size, config, self.dtype)

    def construct(self, input_ids, attention_mask=None, position_ids=None, labels=None):
        """Logits (B, L, V) fp32 for whole sequences; with labels, (loss, logits).

        Without position_ids, positions count the real tokens of each row (left padding safe).
        Labels are shifted inside (token t predicts label t+1); -100 is ignored.
        """
        _check_shape("attention_mask", attention_mask, input_ids.shape)
        _check_shape("position_ids", position_ids, input_ids.shape)
        _check_shape("labels", labels, input_ids.shape)
        if position_ids is None:
            if attention_mask is None:
                position_ids = ops.broadcast_to(ops.arange(input_ids.shape[1], dtype=ms.int32)[None], input_ids.shape)
            else:
                position_ids = _default_position_ids(attention_mask)
        mask = _full_mask(attention_mask, input_ids.shape[1])
        hidden_states = self.model(input_ids, position_ids, mask)
        logits = self.lm_head(hidden_states).astype(ms.float32)
        if labels is None:
            return logits
        return self.loss(logits, labels), logits

    def loss(self, logits, labels):
        """Mean next-token cross entropy over labels != -100 (transformers' ForCausalLMLoss)."""
        vocab = logits.shape[-1]
        shift_logits = logits[:, :-1].reshape(-1, vocab)
        shift_labels = labels[:, 1:].reshape(-1).astype(ms.int32)
        return ops.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="mean")

    def enable_recompute(self):
        """Gradient checkpointing: keep only each decoder layer's input, recompute the rest in backward."""
        for layer in self.model.layers:
            layer.recompute()

    def init_cache(self, batch_size: int, max_length: int) -> kv_cache.KVCache:
        """A zeroed static KV cache for batch_size rows of up to max_length tokens."""
        c = self.config
        if max_length > c.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings "
                             f"{c.max_position_embeddings}")
        return kv_cache.KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_length, c.head_dim,
                                self.dtype)

    def forward_cached(self, input_ids, position_ids, cache_position, attention_mask, cache, window=None):
        """Run L new tokens against the cache (their keys and values are written into it in place):
        returns the last position's logits (B, V) fp32.

        input_ids, position_ids (B, L) int32; cache_position (L,) int32 = the empty slots they go
        to, all below `window` (an int: attention reads only the first `window` slots; default all);
        attention_mask (B, max_length) int32, 1 where a slot holds a real token. In GRAPH mode
        call it from a Cell that holds the cache (KVCache is a Cell of Parameters, not a graph input)
        and give `window` as a Python int: each value is its own graph.
        """
        batch, length = input_ids.shape
        _check_shape("position_ids", position_ids, input_ids.shape)
        _check_shape("cache_position", cache_position, (length,))
        _check_shape("attention_mask", attention_mask, (batch, cache.max_length))
        if cache.batch_size != batch:
            raise ValueError(f"the cache was made for batch size {cache.batch_size}, input_ids has {batch} rows")
        if window is not None and not 0 < window <= cache.max_length:
            raise ValueError(f"window must be in [1, {cache.max_length}] (the cache's length), got {window}")
        mask = _cached_mask(attention_mask if window is None else attention_mask[:, :window], cache_position)
        hidden_states = self.model(input_ids, position_ids, mask, cache, cache_position, window)
        return self.lm_head(hidden_states[:, -1]).astype(ms.float32)

    @classmethod
    def from_pretrained(cls, directory, dtype="fp32", attn_implementation: str = "eager") -> "Emu3ForCausalLM":
        """Load BAAI's original layout (single file or shards) or the transformers -hf layout."""
        config = Emu3Config.from_pretrained(directory)
        with _deferred_init():
            model = cls(config, dtype=dtype, attn_implementation=attn_implementation)
        rename = layouts.rename_for(weights.read_config(directory))
        weights.load_into(model, directory, rename)
        return model

    def save_pretrained(self, directory, max_shard_bytes: int | None = None) -> None:
        """Write BAAI's original layout: config.json and model.safetensors (or shards + index)."""
        tensors = {name: weights.to_numpy(p) for name, p in self.parameters_and_names()}
        weights.write_checkpoint(tensors, directory, self.config.to_dict(), max_shard_bytes)

    def generate(self, input_ids, generation_config=None, logits_processor=None, **kwargs):
        """transformers-style generation: the prompts followed by the new ids (emu3.generation.hf_api)."""
        from emu3.generation import hf_api  # here: emu3.generation imports this module's package

        return hf_api.generate(self, input_ids, generation_config, logits_processor, **kwargs)

    def eval(self) -> "Emu3ForCausalLM":
        """Inference mode (PyTorch's name for set_train(False)); returns the model."""
        self.set_train(False)
        return self
