"""Emu3's language model."""

from emu3.mllm.config import Emu3Config
from emu3.mllm.model import Emu3ForCausalLM

__all__ = ["Emu3Config", "Emu3ForCausalLM"]
