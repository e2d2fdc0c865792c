"""emu3-mindspore: BAAI's Emu3 (vision tokenizer, 8.5B LLM, generation, SFT) in MindSpore."""

__version__ = "0.1.0"
