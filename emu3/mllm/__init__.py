"""Emu3's language model, its text tokenizer and the multimodal processor."""

from emu3.mllm.config import Emu3Config
from emu3.mllm.model import Emu3ForCausalLM
from emu3.mllm.processor import Emu3Processor
from emu3.mllm.tokenizer import Emu3Tokenizer

__all__ = ["Emu3Config", "Emu3ForCausalLM", "Emu3Processor", "Emu3Tokenizer"]
