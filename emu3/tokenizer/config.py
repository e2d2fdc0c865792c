"""Emu3VisionVQConfig: the architecture of BAAI's Emu3-VisionTokenizer, with its config.json keys."""

from dataclasses import asdict, dataclass, field, fields

from emu3 import checks
from emu3.weights import WeightsError

# Keys a transformers/BAAI config.json carries that say nothing about the architecture.
METADATA_KEYS = frozenset(
    {"architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path"}
)
MODEL_TYPE = "Emu3VisionVQ"


@dataclass
class Emu3VisionVQConfig:
    """BAAI's Emu3-VisionTokenizer configuration (defaults: the released 271M-parameter model)."""

    codebook_size: int = 32768
    embed_dim: int = 4
    z_channels: int = 4
    double_z: bool = False
    in_channels: int = 3
    out_channels: int = 3
    temporal_downsample_factor: int = 4
    ch: int = 256
    ch_mult: list = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list = field(default_factory=lambda: [3])
    dropout: float = 0.0

    def __post_init__(self):
        for key in ("codebook_size", "embed_dim", "z_channels", "in_channels", "out_channels",
                    "temporal_downsample_factor", "ch", "num_res_blocks"):
            checks.integer(key, getattr(self, key), low=1)
        for key, low in (("ch_mult", 1), ("attn_resolutions", 0)):
            values = getattr(self, key)
            if not isinstance(values, (list, tuple)) or not values and key == "ch_mult":
                raise ValueError(f"{key} must be a list of integers, got {values!r}")
            for value in values:
                checks.integer(f"every entry of {key}", value, low=low)
        checks.real("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if not isinstance(self.double_z, bool):
            raise ValueError(f"double_z must be true or false, got {self.double_z!r}")
        self.ch_mult = list(self.ch_mult)
        self.attn_resolutions = list(self.attn_resolutions)
        problems = []
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        if any(w % 32 for w in widths):
            problems.append(f"ch * ch_mult must be multiples of 32 (GroupNorm has 32 groups), got {widths}")
        tf = self.temporal_downsample_factor
        if tf < 1 or tf & (tf - 1):
            problems.append(f"temporal_downsample_factor must be a power of 2, got {tf}")
        if self.double_z:
            problems.append("double_z=True is not supported (Emu3's tokenizer quantises z_channels directly)")
        if self.embed_dim != self.z_channels:
            problems.append(f"embed_dim ({self.embed_dim}) must equal z_channels ({self.z_channels})")
        if problems:
            raise ValueError("invalid Emu3VisionVQConfig: " + "; ".join(problems))

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def arch_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "Emu3VisionVQConfig":
        """Build from BAAI's keys; `source` names the file in errors. Every key must be known."""
        if values.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise WeightsError(f"{source} describes another model (model_type {values['model_type']!r}), not "
                               f"Emu3's vision tokenizer (model_type {MODEL_TYPE!r})")
        keys = set(values) - METADATA_KEYS
        unknown = sorted(keys - set(cls.arch_keys()))
        missing = sorted(set(cls.arch_keys()) - keys)
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown keys {unknown}")
            if missing:
                parts.append(f"missing keys {missing}")
            raise WeightsError(
                f"{source} is not an Emu3-VisionTokenizer config: " + ", ".join(parts)
                + f". Expected exactly these keys: {cls.arch_keys()}"
            )
        try:
            return cls(**{k: values[k] for k in cls.arch_keys()})
        except (TypeError, ValueError) as err:
            raise WeightsError(f"{source}: {err}") from None

    @classmethod
    def from_pretrained(cls, directory) -> "Emu3VisionVQConfig":
        """Read a checkpoint directory's `config.json`: BAAI's keys or transformers' (-hf) ones."""
        from emu3.tokenizer.layouts import read_config  # layouts builds on this module

        return read_config(directory)

    def to_dict(self) -> dict:
        """BAAI's config.json content (architecture keys plus model_type)."""
        return {**asdict(self), "architectures": ["Emu3VisionVQModel"], "model_type": MODEL_TYPE}
