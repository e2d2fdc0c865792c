"""Generation for Emu3: KV-cached decoding, sampling, classifier-free guidance, the image constraint."""

from emu3.generation.constraints import build_prefix_constraint
from emu3.generation.generate import GenerationConfig, generate

__all__ = ["GenerationConfig", "build_prefix_constraint", "generate"]
