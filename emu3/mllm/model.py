"""Emu3's language model: a Llama-style decoder (GQA, RoPE, RMSNorm, SiLU MLP, untied lm_head).

Two entry points share every layer:
- `Emu3ForCausalLM.construct` runs whole sequences (training, scoring) and returns all logits,
  plus the loss when labels are given;
- `Emu3ForCausalLM.forward_cached` runs a prefill or a decode step against a static, preallocated
  KV cache (emu3.generation.cache), which it updates in place, and returns only the last
  position's logits, so one compiled graph serves every step of a generation; `hidden_cached`
  stops before the lm_head (image steps need only some of its rows, or none).
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
        """(B, 1, L, D) cos and signed sin: shaped once per forward to broadcast over the heads."""
        b, length = position_ids.shape
        freqs = position_ids.astype(ms.float32).reshape(b, 1, length, 1) * self.inv_freq
        cos, sin = ops.cos(freqs), ops.sin(freqs)
        return ops.concat((cos, cos), -1).astype(dtype), ops.concat((-sin, sin), -1).astype(dtype)


def _split_heads(x, batch, heads, head_dim):
    """(B * L, heads * D) -> (B, heads, L, D). For one token (a decode step) that is a reshape: no
    transpose kernel."""
    length = x.shape[0] // batch
    if length == 1:
        return x.reshape(batch, heads, 1, head_dim)
    return ops.swapaxes(x.reshape(batch, length, heads, head_dim), 1, 2)


def _merge_heads(x):
    """(B, heads, L, D) -> (B * L, heads * D), the inverse of _split_heads."""
    b, heads, length, head_dim = x.shape
    if length == 1:
        return x.reshape(b, heads * head_dim)
    return ops.swapaxes(x, 1, 2).reshape(b * length, heads * head_dim)


def _heads(x, start, count):
    """Heads [start, start + count) of (B, heads, L, D) `x`. A Slice kernel: on MindSpore's CPU
    runtime the StridedSlice of x[:, start:start + count] costs several times more per call."""
    b, _, length, head_dim = x.shape
    return ops.slice(x, (0, start, 0, 0), (b, count, length, head_dim))


def swap_halves_index(head_dim):
    return Tensor(np.roll(np.arange(head_dim), head_dim // 2), ms.int32)


def _rotate(x, cos, signed_sin, swap_halves):
    """Apply RoPE to (B, heads, L, D) `x` with Emu3RotaryEmbedding's (B, 1, L, D) tables;
    `swap_halves` is swap_halves_index(D)."""
    return x * cos + ops.gather(x, swap_halves, 3) * signed_sin


def _fuse(cell, fused: str) -> None:
    """Replace the projections of `cell` that layouts.FUSED[fused] lists by one bias-free nn.Dense
    `cell.<fused>` computing their outputs side by side (weights stacked by output rows): one matmul
    instead of several. Its weight is named like the first part's, with `fused` for the part's name
    (parameter names stay unique in the model)."""
    names = layouts.FUSED[fused]
    parts = [getattr(cell, name) for name in names]
    weight = ops.concat([part.weight for part in parts], 0)
    layer = nn.Dense(weight.shape[1], weight.shape[0], has_bias=False, weight_init=weight, dtype=weight.dtype)
    layer.weight.name = parts[0].weight.name.replace(f".{names[0]}.", f".{fused}.")
    setattr(cell, fused, layer)
    for name in names:
        setattr(cell, name, None)


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
        self.qkv_proj = None  # fuse_projections() replaces q/k/v_proj by it
        self.swap_halves = swap_halves_index(self.head_dim)

    def fuse_projections(self):
        """Replace q_proj, k_proj and v_proj by one qkv_proj (an inference speed-up, same results)."""
        if self.qkv_proj is None:
            _fuse(self, "qkv_proj")

    def core_attention(self, q, k, v, mask):
        """Softmax attention on (B, heads, L, D) q and (B, kv_heads, S, D) k/v; `mask` is
        emu3.backend.attention's boolean map, True where attention is not allowed.

        One method so that sequence parallelism can wrap exactly this part.
        """
        dropout = self.attention_dropout if self.training else 0.0
        return backend.attention(q, k, v, mask, self.attn_implementation, dropout)

    def _rotated_qkv(self, hidden_states, cos, sin):
        b, heads, kv_heads, d = cos.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is None:
            q = _split_heads(self.q_proj(hidden_states), b, heads, d)
            k = _split_heads(self.k_proj(hidden_states), b, kv_heads, d)
            v = _split_heads(self.v_proj(hidden_states), b, kv_heads, d)
            return _rotate(q, cos, sin, self.swap_halves), _rotate(k, cos, sin, self.swap_halves), v
        # q and k are rotated together: one gather, two products and a sum for both.
        qkv = _split_heads(self.qkv_proj(hidden_states), b, heads + 2 * kv_heads, d)
        qk = _rotate(_heads(qkv, 0, heads + kv_heads), cos, sin, self.swap_halves)
        return _heads(qk, 0, heads), _heads(qk, heads, kv_heads), _heads(qkv, heads + kv_heads, kv_heads)

    def construct(self, hidden_states, cos, sin, mask, cache=None, layer=0, cache_position=None, window=None):
        """(B * L, hidden) tokens in and out; cos/sin (B, 1, L, D). With a KVCache, writes this step's
        k/v into its `layer` at cache_position and attends over the cache's first `window` slots."""
        q, k, v = self._rotated_qkv(hidden_states, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, cache_position, window)
        return self.o_proj(_merge_heads(self.core_attention(q, k, v, mask)))


class Emu3MLP(nn.Cell):
    def __init__(self, config, dtype):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, config, dtype)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, config, dtype)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, config, dtype)
        self.gate_up_proj = None  # fuse_projections() replaces gate/up_proj by it

    def fuse_projections(self):
        """Replace gate_proj and up_proj by one gate_up_proj (an inference speed-up, same results)."""
        if self.gate_up_proj is None:
            _fuse(self, "gate_up_proj")

    def construct(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = ops.split(self.gate_up_proj(x), self.intermediate_size, -1)
        return self.down_proj(ops.silu(gate) * up)


class Emu3Dropout(nn.Cell):
    """Dropout in training mode only, drawn from MindSpore's default generator so that recompute
    replays it (backend.apply_dropout)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def construct(self, x):
        return backend.apply_dropout(x, self.p) if self.training else x


class Emu3DecoderLayer(nn.Cell):
    def __init__(self, config, dtype, attn_implementation):
        super().__init__()
        self.self_attn = Emu3Attention(config, dtype, attn_implementation)
        self.mlp = Emu3MLP(config, dtype)
        self.input_layernorm = Emu3RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = Emu3RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.dropout = Emu3Dropout(config.attention_dropout)  # BAAI's residual dropout uses the attention rate

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
        """(B, L, hidden) final hidden states. The layers work on the (B * L, hidden) tokens: 2-D
        inputs save nn.Dense two reshapes per projection."""
        b, length = input_ids.shape
        hidden_states = self.embed_tokens(input_ids.reshape(b * length))
        cos, sin = self.rotary_emb(position_ids, self.dtype)
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, cos, sin, mask, cache, i, cache_position, window)
        return self.norm(hidden_states).reshape(b, length, -1)


def _default_position_ids(attention_mask):
    # What transformers' generate uses for left padding: count real tokens; pads get position 1.
    positions = ops.cumsum(attention_mask.astype(ms.int32), -1) - 1
    return ops.where(attention_mask == 0, ops.ones_like(positions), positions)


# The attention masks below are emu3.backend.attention's boolean map (True: not allowed), built
# once per forward for every layer. A query always attends its own slot, even a padding one: a
# left-padded row's pad queries would otherwise see nothing, which the fused Ascend kernels may
# turn into non-finite outputs, hence non-finite keys and values in the next layers' cache. Real
# tokens never see a padding slot either way, so their results do not change.


def _cached_mask(attention_mask, cache_position):
    """(B, 1, L, S) over cache slots: a query at slot q sees slot s if s == q, or s < q and s holds
    a real token (attention_mask (B, S) is 1 there)."""
    b, slots = attention_mask.shape
    length = cache_position.shape[0]
    slot = ops.arange(slots, dtype=ms.int32).reshape(1, slots)
    query = cache_position.reshape(length, 1)
    masked = ops.logical_or(slot > query, (attention_mask == 0).reshape(b, 1, 1, slots))
    return ops.logical_and(masked, slot != query)


def _full_mask(attention_mask, length):
    """The mask of a whole sequence at positions 0..L-1: causal, no padded keys. (L, L) without an
    attention_mask, else (B, 1, L, L)."""
    position = ops.arange(length, dtype=ms.int32)
    if attention_mask is None:
        return position.reshape(1, length) > position.reshape(length, 1)
    return _cached_mask(attention_mask, position)


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

    def fuse_projections(self) -> "Emu3ForCausalLM":
        """For inference: one matmul for q/k/v and one for gate/up in every layer instead of five
        (their weights stacked by rows; the same results, fewer kernels per decode step).

        Checkpoints keep BAAI's layout: save_pretrained splits the stacked weights again. Training,
        ZeRO-3 and sequence parallelism use the model as loaded, with the split weights. In GRAPH
        mode fuse before the first call: a compiled graph keeps the cells it was compiled with.
        Returns the model.
        """
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        return self

    def enable_recompute(self):
        """Gradient checkpointing: keep only each decoder layer's input, recompute the rest in backward.

        Dropout masks are replayed (they come from MindSpore's default generator, which recompute
        restores). Switch it on after anything that replaces Parameters (ZeRO-3's shards): the
        recompute cell keeps the parameters it sees now.
        """
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

    def forward_cached(self, input_ids, position_ids, cache_position, attention_mask, cache, window=None,
                       all_positions=False):
        """`hidden_cached` and the lm_head: the logits (B, V) fp32 of the last position, or with
        all_positions=True of every position (B, L, V) (parallel row decoding scores several tokens
        per pass)."""
        return self.lm_head(self.hidden_cached(input_ids, position_ids, cache_position, attention_mask, cache,
                                               window, all_positions)).astype(ms.float32)

    def hidden_cached(self, input_ids, position_ids, cache_position, attention_mask, cache, window=None,
                      all_positions=False):
        """Run L new tokens against the cache (their keys and values are written into it in place):
        returns the last position's hidden state (B, hidden) after the final norm, or every
        position's (B, L, hidden) with all_positions=True.

        input_ids, position_ids (B, L) int32; cache_position (L,) int32 = the empty slots they go
        to, all below `window` (an int: attention reads only the first `window` slots; default all;
        a token written at or above `window` is seen by no query);
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
        if window is not None:
            attention_mask = ops.slice(attention_mask, (0, 0), (batch, window))
        mask = _cached_mask(attention_mask, cache_position)
        hidden_states = self.model(input_ids, position_ids, mask, cache, cache_position, window)
        return hidden_states if all_positions else hidden_states[:, -1]

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
        """Write BAAI's original layout: config.json and model.safetensors (or shards + index),
        with fused projections split back into BAAI's tensors."""
        tensors = layouts.split_fused({name: weights.to_numpy(p) for name, p in self.parameters_and_names()},
                                      self.config)
        weights.write_checkpoint(tensors, directory, self.config.to_dict(), max_shard_bytes)

    def generate(self, input_ids, generation_config=None, logits_processor=None, **kwargs):
        """transformers-style generation: the prompts followed by the new ids (emu3.generation.hf_api)."""
        from emu3.generation import hf_api  # here: emu3.generation imports this module's package

        return hf_api.generate(self, input_ids, generation_config, logits_processor, **kwargs)

    def eval(self) -> "Emu3ForCausalLM":
        """Inference mode (PyTorch's name for set_train(False)); returns the model."""
        self.set_train(False)
        return self
