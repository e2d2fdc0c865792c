"""Emu3Config: the hyper-parameters of Emu3's language model, with BAAI's config.json keys.

BAAI's checkpoints (Emu3-Gen, Emu3-Chat, Emu3-Stage1) store these keys flat in config.json. The
transformers "-hf" conversions nest the same keys under "text_config" (the rest of that file
describes the vision tokenizer and the vocabulary map); `from_pretrained` reads either.

Every value is checked for its type and range, in Python and from files alike. A config file must
also name every key that decides the model's shape or its special tokens (`REQUIRED_KEYS`,
`REQUIRED_HF_TEXT_KEYS`, `HF_VOCAB_TOKENS`): a missing `hidden_size` is an error, never 4096. The
defaults of the constructor (Emu3-8B's values) serve configs built in Python.
"""

import inspect
import logging

from emu3 import checks, weights

logger = logging.getLogger(__name__)

# Keys transformers or BAAI write into config.json that say nothing about this model.
_BOOKKEEPING_KEYS = ("architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
                     "_name_or_path", "use_return_dict", "attn_implementation", "_attn_implementation_autoset")
_ROPE_TYPES = ("default", "linear")
# What BAAI's config.json and transformers' -hf one say this model is.
MODEL_TYPES = ("Emu3", "emu3")
ARCHITECTURES = ("Emu3ForCausalLM", "Emu3ForConditionalGeneration")

_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings")
_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "img_token_id", "boi_token_id", "eoi_token_id",
               "eol_token_id", "eof_token_id")
_BOOL_KEYS = ("use_cache", "tie_word_embeddings", "attention_bias", "mlp_bias")
# Every BAAI Emu3 config.json has these; the rest may take the constructor's default.
REQUIRED_KEYS = _SIZE_KEYS + ("rms_norm_eps", "rope_theta", "image_area") + _TOKEN_KEYS
# transformers writes these into every -hf text_config; the keys it leaves out equal its defaults,
# which are ours (pad/bos/eos ids included).
REQUIRED_HF_TEXT_KEYS = _SIZE_KEYS + ("rms_norm_eps", "rope_theta")


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
        for key in _SIZE_KEYS + ("image_area", "pretraining_tp"):
            checks.integer(key, getattr(self, key), low=1)
        for key in _TOKEN_KEYS:
            # Only the text ids must lie in the vocabulary: a text-only model (a small test
            # vocabulary) never meets the image ids, and image generation checks them itself.
            text = key in ("pad_token_id", "bos_token_id", "eos_token_id")
            checks.integer(key, getattr(self, key), low=0, high=self.vocab_size - 1 if text else None)
        checks.real("rms_norm_eps", self.rms_norm_eps, low=0.0, low_open=True)
        checks.real("rope_theta", self.rope_theta, low=0.0, low_open=True)
        checks.real("initializer_range", self.initializer_range, low=0.0)
        checks.real("attention_dropout", self.attention_dropout, low=0.0, high=1.0, high_open=True)
        for key in _BOOL_KEYS:
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be null or an object, got {self.rope_scaling!r}")
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
            if rope_type == "linear":
                checks.real("linear rope_scaling's factor", self.rope_scaling.get("factor"), low=1.0, low_open=True)

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
    def from_dict(cls, data: dict, source: str = "config") -> "Emu3Config":
        """From BAAI's flat config.json, or from a transformers -hf config that nests a text_config.

        `source` names the file in errors. The config must describe an Emu3 language model and name
        every required key.
        """
        _check_architecture(data, source)
        if "text_config" in data:
            data = _from_hf(data, source)
        else:
            _require(data, REQUIRED_KEYS, source)
        known = set(inspect.signature(cls.__init__).parameters) | set(_BOOKKEEPING_KEYS)
        unknown = sorted(set(data) - known)
        if unknown:
            # A checkpoint's config.json may carry keys written by other tools; they do not
            # change this model, so they are reported rather than fatal.
            logger.warning("ignoring config keys that Emu3Config does not use: %s", ", ".join(unknown))
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except ValueError as err:
            raise weights.WeightsError(f"{source}: {err}") from None

    @classmethod
    def from_pretrained(cls, directory) -> "Emu3Config":
        return cls.from_dict(weights.read_config(directory), f"{directory}/{weights.CONFIG_FILE}")

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
HF_VOCAB_TOKENS = {"img_token_id": "<|image token|>", "boi_token_id": "<|image start|>",
                   "eoi_token_id": "<|image end|>", "eol_token_id": "<|extra_200|>",
                   "eof_token_id": "<|extra_201|>"}


def _check_architecture(data: dict, source: str) -> None:
    model_type, architectures = data.get("model_type"), data.get("architectures")
    other = model_type is not None and model_type not in MODEL_TYPES
    if architectures is not None:
        other = other or not isinstance(architectures, list) or not set(architectures) <= set(ARCHITECTURES)
    if other:
        raise weights.WeightsError(
            f"{source} describes another model (model_type {model_type!r}, architectures {architectures!r}), not "
            f"Emu3's language model (model_type 'Emu3', architectures ['Emu3ForCausalLM'])")


def _require(data: dict, keys, source: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise weights.WeightsError(f"{source} lacks required keys {missing}: an Emu3 checkpoint's config names "
                                   "them, and a guessed value would load a different model")


def _from_hf(data: dict, source: str) -> dict:
    text, vocabulary = data["text_config"], data.get("vocabulary_map")
    if not isinstance(text, dict) or not isinstance(vocabulary, dict):
        raise weights.WeightsError(f"{source}: a transformers -hf config needs a text_config object and a "
                                   "vocabulary_map object")
    _require(text, REQUIRED_HF_TEXT_KEYS, f"{source} (text_config)")
    _require(vocabulary, list(HF_VOCAB_TOKENS.values()), f"{source} (vocabulary_map)")
    out = {k: text[k] for k in _HF_TEXT_KEYS if k in text}
    out.update({key: vocabulary[token] for key, token in HF_VOCAB_TOKENS.items()})
    return out
