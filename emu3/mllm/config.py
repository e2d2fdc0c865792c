"""Emu3Config: the hyper-parameters of Emu3's language model, with BAAI's config.json keys.

BAAI's checkpoints (Emu3-Gen, Emu3-Chat, Emu3-Stage1) store these keys flat in config.json. The
transformers "-hf" conversions nest the same keys under "text_config" (the rest of that file
describes the vision tokenizer and the vocabulary map); `from_pretrained` reads either.
"""

from emu3 import weights

# Keys transformers or BAAI write into config.json that say nothing about this model.
_BOOKKEEPING_KEYS = ("architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
                     "_name_or_path", "use_return_dict", "attn_implementation", "_attn_implementation_autoset")
_ROPE_TYPES = ("default", "linear")


class Emu3Config:
    """The Llama-style decoder's shape, RoPE, dropout and special token ids (defaults: Emu3-8B)."""

    model_type = "Emu3"

    def __init__(
        self,
        vocab_size: int = 184622,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 8,
        hidden_act: str = "silu",
        max_position_embeddings: int = 9216,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int = 151643,
        bos_token_id: int = 151849,
        eos_token_id: int = 151850,
        img_token_id: int = 151851,
        boi_token_id: int = 151852,
        eoi_token_id: int = 151853,
        eol_token_id: int = 151846,
        eof_token_id: int = 151847,
        image_area: int = 720 * 720,
        pretraining_tp: int = 1,
        tie_word_embeddings: bool = False,
        rope_theta: float = 1000000.0,
        rope_scaling: dict | None = None,
        attention_dropout: float = 0.1,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        **kwargs,
    ):
        for key in _BOOKKEEPING_KEYS:
            kwargs.pop(key, None)
        if kwargs:
            raise ValueError(f"Emu3Config got unknown keys {sorted(kwargs)}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.img_token_id = img_token_id
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        self.eol_token_id = eol_token_id
        self.eof_token_id = eof_token_id
        self.image_area = image_area
        self.pretraining_tp = pretraining_tp
        self.tie_word_embeddings = tie_word_embeddings
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_dropout = attention_dropout
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self._validate()

    def _validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; Emu3 uses 'silu'")
        if self.tie_word_embeddings or self.attention_bias or self.mlp_bias or self.pretraining_tp != 1:
            raise ValueError("tied embeddings, attention/MLP biases and pretraining_tp != 1 are not part of "
                             "Emu3 and not supported")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: {_ROPE_TYPES})")
            if rope_type == "linear" and not float(self.rope_scaling.get("factor", 0)) > 1.0:
                raise ValueError(f"linear rope_scaling needs a factor > 1, got {self.rope_scaling}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_factor(self) -> float:
        """Positions are divided by this before the rotation (1 without scaling)."""
        if self.rope_scaling is None:
            return 1.0
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        return float(self.rope_scaling["factor"]) if rope_type == "linear" else 1.0

    @classmethod
    def from_dict(cls, data: dict) -> "Emu3Config":
        """From BAAI's flat config.json, or from a transformers -hf config that nests a text_config."""
        if "text_config" in data:
            data = _from_hf(data)
        return cls(**data)

    @classmethod
    def from_pretrained(cls, directory) -> "Emu3Config":
        return cls.from_dict(weights.read_config(directory))

    def to_dict(self) -> dict:
        """BAAI's flat config.json content."""
        out = {"architectures": ["Emu3ForCausalLM"], "model_type": self.model_type}
        out.update({k: v for k, v in vars(self).items() if not k.startswith("_")})
        return out

    def __eq__(self, other):
        return isinstance(other, Emu3Config) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"Emu3Config({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


# The keys of transformers' Emu3TextConfig that Emu3Config shares.
_HF_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
                 "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
                 "tie_word_embeddings", "rope_theta", "rope_scaling", "attention_dropout", "attention_bias",
                 "mlp_bias")
# -hf configs carry the image token ids only inside the vocabulary map.
_HF_VOCAB_TOKENS = {"img_token_id": "<|image token|>", "boi_token_id": "<|image start|>",
                    "eoi_token_id": "<|image end|>", "eol_token_id": "<|extra_200|>",
                    "eof_token_id": "<|extra_201|>"}


def _from_hf(data: dict) -> dict:
    text = data["text_config"] or {}
    out = {k: text[k] for k in _HF_TEXT_KEYS if k in text}
    vocabulary = data.get("vocabulary_map") or {}
    out.update({key: vocabulary[token] for key, token in _HF_VOCAB_TOKENS.items() if token in vocabulary})
    return out
