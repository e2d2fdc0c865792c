"""Emu3's vision tokenizer: image/video <-> discrete codes (32768-entry codebook, 8x spatial, 4x temporal)."""

from emu3.tokenizer.config import Emu3VisionVQConfig
from emu3.tokenizer.image_processor import Emu3VisionVQImageProcessor
from emu3.tokenizer.model import Emu3VisionVQModel

__all__ = ["Emu3VisionVQConfig", "Emu3VisionVQImageProcessor", "Emu3VisionVQModel"]
